"""bench/mem_peak.py on a hand-made snapshot in torch's format (torch.cuda.memory._snapshot()).

The run it describes, in MiB (M = 2**20 bytes; every request counts rounded up to 512 bytes):
  before recording: P1 100 (still live at the end, no stack), P2 50 (freed during the trace)
  0 alloc A1 10 (networks/loha.py)      -> 160
  1 alloc A1b 6 (networks/loha.py)      -> 166
  2 alloc mark "warmup", 3 its free     -> 166
  4 alloc A2 300 (diffusers via bench)  -> 466   <- the peak
  5 free P2                             -> 416
  6 alloc A3 20 M + 3 bytes (torch)     -> 436 + 512 B
  7 free A2, 8 its free_completed       -> 136 + 512 B (the completion does not count again)
  9 alloc mark "measured", 10 its free  -> steady state before it: P1, A1, A1b, A3
  11 alloc A4 5 at A2's old address, 12 its free_completed only (free request not recorded)
  13 alloc A5 40                        -> 176 + 512 B, the snapshot's live blocks: P1 A1 A1b A3 A5
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
M = 2**20


def _load():
    spec = importlib.util.spec_from_file_location("mem_peak", ROOT / "bench" / "mem_peak.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


mp = _load()

REPO = "/repo"
NET = {"filename": "/repo/networks/loha.py", "line": 10, "name": "forward"}
BENCH = {"filename": "/repo/bench/bench_train_step.py", "line": 120, "name": "call"}
TORCH = {"filename": "/env/lib/python3.12/site-packages/torch/nn/functional.py", "line": 5, "name": "linear"}
DIFF = {
    "filename": "/env/lib/python3.12/site-packages/diffusers/models/attention.py",
    "line": 7,
    "name": "forward",
}
MARK = {"filename": "/repo/bench/mem_record.py", "line": 20, "name": "mem_mark"}
CPP = {"filename": "??", "line": 0, "name": "c10::cuda::CUDACachingAllocator::malloc"}

P1, P2, A1, A1B, A2, A3, A4, A5, MK = 0x1000, 0x9000000, 0x20000000, 0x21000000, 0x30000000, 0x40000000, 0x30000000, 0x50000000, 0x100  # fmt: skip


def _ev(action, addr, size, frames=()):
    return {"action": action, "addr": addr, "size": size, "stream": 0, "frames": list(frames), "time_us": 0}


EVENTS = [
    _ev("alloc", A1, 10 * M, [CPP, TORCH, NET, BENCH]),
    _ev("alloc", A1B, 6 * M, [NET, BENCH]),
    _ev("alloc", MK, 1, [MARK]),
    _ev("free_requested", MK, 1, [MARK]),
    _ev("alloc", A2, 300 * M, [DIFF, BENCH]),
    _ev("free_requested", P2, 50 * M, [NET]),  # context="alloc": the free carries the allocation's stack
    _ev("alloc", A3, 20 * M + 3, [TORCH]),
    _ev("free_requested", A2, 300 * M, [DIFF, BENCH]),
    _ev("free_completed", A2, 300 * M, [DIFF, BENCH]),
    _ev("alloc", MK, 1, [MARK]),
    _ev("free_requested", MK, 1, [MARK]),
    _ev("alloc", A4, 5 * M, [NET]),
    _ev("free_completed", A4, 5 * M, [NET]),
    _ev("alloc", A5, 40 * M, [NET, BENCH]),
]


def _block(size, state, frames=(), address=None, requested=None):
    b = {"size": size, "requested_size": size if requested is None else requested, "state": state}
    b["frames"] = list(frames)
    if address is not None:
        b["address"] = address
    return b


def _snapshot(events=EVENTS):
    # the first segment's blocks carry no address: they lie back to back from the segment's address
    seg1 = {"device": 0, "address": P1, "total_size": 102 * M, "stream": 0, "segment_type": "large",
            "blocks": [_block(100 * M, "active_allocated"), _block(2 * M, "inactive")]}  # fmt: skip
    live = [(A1, 10 * M, [CPP, TORCH, NET, BENCH]), (A1B, 6 * M, [NET, BENCH]),
            (A3, 20 * M + 3, [TORCH]), (A5, 40 * M, [NET, BENCH])]  # fmt: skip
    blocks = [_block(mp.granule(n), "active_allocated", f, a, n) for a, n, f in live]
    seg2 = {"device": 0, "address": A1, "total_size": 1024 * M, "stream": 0, "segment_type": "large",
            "blocks": blocks + [_block(7 * M, "active_awaiting_free", [NET], 0x60000000)]}  # fmt: skip
    other = {"device": 1, "address": 0x7000000, "total_size": 4 * M, "stream": 0, "segment_type": "large",
             "blocks": [_block(4 * M, "active_allocated", [], 0x7000000)]}  # fmt: skip
    return {"segments": [seg1, seg2, other], "device_traces": [list(events), []]}


def test_granule_and_size_classes():
    assert [mp.granule(n) for n in (1, 512, 513, 20 * M + 3)] == [512, 512, 1024, 20 * M + 512]
    got = [mp.size_class(n) for n in (1000, 64 * 1024, M, 16 * M - 1, 16 * M, 256 * M)]
    assert got == ["<64KiB", "64KiB-1MiB", "1-16MiB", "1-16MiB", "16-256MiB", ">=256MiB"]


def test_where_prefers_this_repository_then_torch():
    assert mp.where([CPP, TORCH, NET, BENCH], [REPO]) == "networks/loha.py:10 forward"
    assert mp.where([CPP, DIFF, TORCH], [REPO]) == "torch/nn/functional.py:5 linear"
    assert mp.where([DIFF], [REPO]) == "diffusers/models/attention.py:7 forward"
    assert mp.where([CPP], [REPO]) == "(no stack)"


def test_timeline_totals_follow_the_allocated_count():
    tl = mp.build_timeline(_snapshot())
    assert tl.initial_bytes == 150 * M  # P1 (live at the end) and P2 (freed at event 5)
    mib = [t / M for t in tl.after]
    g = 512 / M
    assert mib == [160, 166, 166 + g, 166, 466, 416, 436 + g, 136 + g, 136 + g, 136 + 2 * g, 136 + g,
                   141 + g, 136 + g, 176 + g]  # fmt: skip
    assert tl.end_bytes == 176 * M + 512 and tl.consistent  # the awaiting-free block and device 1 not counted
    assert tl.peak() == (466 * M, 4)
    assert tl.peak(start=5) == (466 * M, 4)  # already there before event 5
    assert tl.peak(start=6) == (436 * M + 512, 6)
    assert sorted(a.addr for a in tl.live_at(4)) == [P1, P2, A1, A1B, A2]
    assert sorted(a.addr for a in tl.live_at(-1)) == [P1, P2]


def test_report_peak_groups_and_steady_state():
    r = mp.report(_snapshot(), roots=[REPO], mark_func="mem_mark")
    assert r["peak_mib"] == 466.0 and r["window"] == "from the warmup mark" and r["consistent"]
    assert r["phase"] == "warmup (captures included)" and r["events"] == len(EVENTS)
    assert r["peak_alloc"] == {"where": "bench/bench_train_step.py:120 call", "mib": 300.0}
    assert r["live_mib"] == 466.0 and r["rest_mib"] == 0.0
    assert r["groups"] == [
        {"where": "bench/bench_train_step.py:120 call", "size": ">=256MiB", "mib": 300.0, "count": 1,
         "inner": "diffusers/models/attention.py:7 forward"},
        {"where": "(no stack) [before recording]", "size": "16-256MiB", "mib": 100.0, "count": 1},
        {"where": "networks/loha.py:10 forward [before recording]", "size": "16-256MiB", "mib": 50.0,
         "count": 1},
        {"where": "networks/loha.py:10 forward", "size": "1-16MiB", "mib": 16.0, "count": 2,
         "inner": "torch/nn/functional.py:5 linear"},
    ]  # fmt: skip
    steady = r["steady"]  # just before the "measured" mark: P1, A1, A1b, A3 (the marks left out)
    assert steady["live_mib"] == round((136 * M + 512) / M, 2)
    assert [(g["where"], g["mib"], g["count"]) for g in steady["groups"]] == [
        ("(no stack) [before recording]", 100.0, 1),
        ("torch/nn/functional.py:5 linear", 20.0, 1),
        ("networks/loha.py:10 forward", 16.0, 2),
    ]


def test_marks_are_found_by_function_name_and_size():
    assert mp.find_marks(EVENTS, "mem_mark") == [2, 9]
    assert mp.find_marks(EVENTS, "mem_mark", size=1) == [2, 9]
    assert mp.find_marks(EVENTS, "mem_mark", size=2) == []
    assert mp.find_marks(EVENTS, "forward", size=10 * M) == [0]  # the free events are never marks


def test_top_limits_the_groups_and_counts_the_rest():
    r = mp.report(_snapshot(), roots=[REPO], mark_func="mem_mark", top=2)
    assert [g["mib"] for g in r["groups"]] == [300.0, 100.0] and r["rest_mib"] == 66.0


def test_lost_oldest_events_become_live_since_before_recording():
    """The ring buffer dropped events 0-3: A1 and A1b have no alloc event left, the warmup mark is gone."""
    r = mp.report(_snapshot(EVENTS[4:]), roots=[REPO], mark_func="mem_mark", mark_names=("measured",))
    assert r["window"] == "from the oldest kept event" and r["consistent"]
    assert r["peak_mib"] == 466.0 and r["phase"] == "warmup (captures included)"
    by = {(g["where"], g["size"]): (g["mib"], g["count"]) for g in r["groups"]}
    old = "networks/loha.py:10 forward [before recording]"
    assert by[(old, "16-256MiB")] == (50.0, 1)  # P2, freed in the kept events: the free's stack
    assert by[(old, "1-16MiB")] == (16.0, 2)  # A1 and A1b, live at the end: the blocks' stacks
    assert not any(w == "networks/loha.py:10 forward" for w, _ in by)


def test_an_empty_trace_reports_the_live_blocks():
    r = mp.report(_snapshot([]), roots=[REPO])
    assert r["peak_mib"] == round((176 * M + 512) / M, 2) and r["events"] == 0 and r["consistent"]
    assert "peak_alloc" not in r and "steady" not in r and "phase" not in r
