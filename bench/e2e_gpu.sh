#!/usr/bin/env bash
# The GPU machine's end-to-end run (issue 17). Needs .whl/ and baselines/sd-scripts carried with the call
# (see docs/benchmarks.md "End-to-end CLI benchmark"). Usage: bash bench/e2e_gpu.sh PART... (in order)
#   sdxl      SDXL LoHa/LoKr batch 4, 4 bucket shapes: ours eager + graph, sd-scripts eager
#   sdxl_def  SDXL LoKr (ALGOS) batch 4: ours graph step, sd-scripts eager (DEF_BUDGET s each, 150)
#   curve     SDXL LoKr batch 1, 8 bucket shapes, 56 steps: ours eager vs graph (the evidence the graph
#             step needs before GRAPH_STEP_IS_DEFAULT turns it on: loss curve, captures, peak memory)
#   anima     Anima LoKr batch 2: ours eager + graph, sd-scripts eager
#   anima_def Anima LoKr batch 2: ours graph step and graph + --torch_compile (ANIMA_MODES)
#   b1        SDXL LoHa/LoKr (ALGOS) batch 1, 4 bucket shapes: ours default step (B1_MODES), sd-scripts eager
#   ours      our runs only: MODELS (sdxl), ALGOS (lokr), BATCHES (SDXL, 4), MODES (graph); Anima batch 2
#   floors    issue 20: bench_train_step.py, each algorithm's graph-replayed step over its no-adapter floor
#             (SDXL batch 4, Anima batch 2, 1024², bf16, no fp8; one process per variant; rows in $OUT/floors.jsonl)
#   loha      issue 20: the LoHa kernels' CUDA tests, bench_loha_delta.py (with --sweep of the
#             tilings; $OUT/loha_delta.jsonl), then the LoHa graph step with LOHA_KERNEL=off and =on
#             interleaved twice (rows in $OUT/loha_step.jsonl)
#   mem       issue 17: what is live at the peak of allocated memory (bench_train_step.py --mem_peak), SDXL
#             batch 4, 1024², bf16, as the trainer runs it (fp8 base, AdamW8bit with the flat update):
#             LoHa and LoKr, each graph step (the floors flags, first call of a shape eager) and eager step;
#             3 warm-up + 2 measured steps, 90 s per variant (MEM_TIMEOUT), the newest MEM_ENTRIES (10^6)
#             allocator events kept; one row per variant in $OUT/mem_peak.jsonl
#   gputests  the CUDA-only tests of the graph step, --torch_compile and the Triton kernels (pytest; skipped
#             on the CPU CI; about 4 minutes, give the call room)
# Steady s/it leaves out the first WARMUP (8) of STEPS (16) steps: each bucket shape's first step runs
# eagerly and its second captures the graph, so with 4 shapes the replays start by step 9.
# SAMPLE_EVERY=N samples one 1024² prompt (20 steps) every N steps in every run (sampling at real size).
# PROFILE_STEP=K profiles step K+1 of every run (torch.profiler: kernel time per group, in the summary).
# BUDGET-style limits count from the first run, after the one-time model and dataset writing.
# TAG=name suffixes every run's name (variants of one command side by side, e.g. an env switch).
# CACHE=off runs without --cache_latents / --cache_text_encoder_outputs (default on).
# Results accumulate in /tmp/e2e (e2e.jsonl; e2e_summary.md covers every run there) and are copied to $OUT.
set -uo pipefail
out=${OUT:-/tmp/e2e_out}
mkdir -p "$out"
if [ ! -d /tmp/site ]; then
  I="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target"
  $I /tmp/site .whl/common/*.whl .whl/test/*.whl
  $I /tmp/site_sd .whl/sd/*.whl
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
B="python3 bench/bench_e2e.py --scale real --out /tmp/e2e --sd_scripts_path baselines/sd-scripts
   --sd_pythonpath /tmp/site_sd --cache ${CACHE:-on} --warmup ${WARMUP:-8} --run_timeout ${RUN_TIMEOUT:-150} --profile_step ${PROFILE_STEP:-0}
   --sample_every ${SAMPLE_EVERY:-0} ${TAG:+--tag $TAG}"
for part in "$@"; do
  case $part in
    sdxl) $B --models sdxl --algos ${ALGOS:-loha,lokr} --batches 4 --modes eager,graph --impl ours,sd-scripts \
            --steps ${STEPS:-16} --budget_s ${BUDGET:-330} ;;
    sdxl_def) $B --models sdxl --algos ${ALGOS:-lokr} --batches 4 --modes graph --impl ours --steps ${STEPS:-16} \
            --budget_s ${DEF_BUDGET:-150} && $B --models sdxl --algos ${ALGOS:-lokr} --batches 4 --modes eager \
            --impl sd-scripts --steps ${STEPS:-16} --budget_s ${DEF_BUDGET:-150} ;;
    curve) $B --models sdxl --algos lokr --batches 1 --shapes 8 --modes eager,graph --impl ours \
            --steps 56 --budget_s ${CURVE_BUDGET:-280} ;;
    anima) $B --models anima --algos ${ALGOS:-lokr} --anima_batches 2 --modes eager,graph \
            --impl ours,sd-scripts --steps ${STEPS:-16} --budget_s ${BUDGET:-300} ;;
    anima_def) $B --models anima --algos lokr --anima_batches 2 --modes ${ANIMA_MODES:-graph,compile} --impl ours \
            --steps ${STEPS:-16} --budget_s ${ANIMA_BUDGET:-160} ;;
    b1) $B --models sdxl --algos ${ALGOS:-loha,lokr} --batches 1 --modes ${B1_MODES:-default} --impl ours \
            --steps ${STEPS:-16} --budget_s ${B1_BUDGET:-150} && $B --models sdxl --algos ${ALGOS:-loha,lokr} --batches 1 \
            --modes eager --impl sd-scripts --steps ${STEPS:-16} --budget_s ${B1_BUDGET:-150} ;;
    ours) $B --models ${MODELS:-sdxl} --algos ${ALGOS:-lokr} --batches ${BATCHES:-4} --anima_batches 2 \
            --modes ${MODES:-graph} --impl ours --steps ${STEPS:-16} --budget_s ${BUDGET:-300} ;;
    floors) N=graph=1:gcrng=0:mode=graph
            for run in "--variants floor:$N,ours-lora:$N,ours-lokr:$N,ours-loha:$N" \
                "--batch 2 --variants anima-floor:$N,anima-lora:$N,anima-lokr:$N,anima-loha:$N"; do
              python3 bench/bench_train_step.py --steps 8 --warmup 3 --variant_timeout 150 $run | grep "^{\|^SUMMARY" | tee -a "$out/floors.jsonl"
            done ;;
    mem) N=graph=1:gcrng=0:mode=graph T=opt=adamw8bit:fp8=1
         python3 bench/bench_train_step.py --mem_peak --mem_entries ${MEM_ENTRIES:-1000000} --steps 2 --warmup 3 \
           --variant_timeout ${MEM_TIMEOUT:-90} --variants \
           ours-loha:$N:ecalls=1:$T,ours-loha:$T,ours-lokr:$N:ecalls=1:$T,ours-lokr:$T \
           | grep "^{" | tee -a "$out/mem_peak.jsonl" ;;
    loha) timeout 150 python3 -m pytest -q -p no:cacheprovider tests/networks/test_loha_delta_kernel.py
          timeout 200 python3 bench/bench_loha_delta.py --sweep --out "$out/loha_delta.jsonl"
          N=graph=1:gcrng=0:mode=graph
          for k in off on off on; do
            LOHA_KERNEL=$k python3 bench/bench_train_step.py --steps 8 --warmup 3 --variant_timeout 120 \
              --variants ours-loha:$N | grep "^{" | sed "s/^{/{\"loha_kernel\": \"$k\", /" | tee -a "$out/loha_step.jsonl"
          done ;;
    gputests) python3 -m pytest -q -rs -p no:cacheprovider tests/training/test_cuda_graph.py \
            tests/training/test_cuda_graph_fallback.py tests/training/test_step_mode.py \
            tests/training/test_train_compile.py tests/anima/test_anima_kernels.py tests/anima/test_modulated_norm.py \
            tests/networks/test_fp8_dequant_kernel.py tests/networks/test_fused_fp8.py tests/networks/test_loha_delta_kernel.py ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac 2>&1 | grep --line-buffered -v "it/s\]" | tee -a "$out/e2e_gpu.log"
  # after every part: a call cut off at its time limit still brings back the parts that finished
  cp /tmp/e2e/e2e.jsonl /tmp/e2e/e2e_summary.md "$out/" 2>/dev/null
  mkdir -p "$out/logs" && cp /tmp/e2e/logs/*.log "$out/logs/" 2>/dev/null
done
true
