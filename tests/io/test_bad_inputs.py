"""Every bad input, fault and interruption ends in one clear line, and nothing is lost.

One row per case: the script runs inside its real error boundary (``library.io.errors``) with argv, and
the row checks the exit status, that no traceback was printed (except for the internal-bug row, where
it must be), that the message names the input, and that the pre-existing output file is byte-identical
with no temp or partial file beside it. A pickle's payload would create a marker file: it never does.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import anima_minimal_inference
import anima_train_network
import gen_img
import sdxl_train_network
from library.io.errors import EXIT_BUG, EXIT_INTERRUPTED, run_cli
from library.sdxl.loading import load_sdxl_models, save_sdxl_diffusers
from library.sdxl.trainer import SdxlArchitecture
from networks import atomic_io
from networks import convert_anima_lora_to_comfy as converter

PRE = b"the previous output: must stay byte-identical"
ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "2",
         "--max_train_steps", "1", "--cache_latents", "--learning_rate", "1e-3"]  # fmt: skip


class _Payload:
    """Unpickling this creates the marker file: the proof that a pickle was never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def env(tiny, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("bad")
    e = {"d": d, "tiny": tiny, "marker": d / "PAYLOAD_RAN"}
    net = {"lora_unet_x.lora_down.weight": torch.ones(4, 8), "lora_unet_x.lora_up.weight": torch.ones(8, 4)}
    save_file(net, str(d / "ok.safetensors"))
    data = (d / "ok.safetensors").read_bytes()
    (d / "cut.safetensors").write_bytes(data[: len(data) - 40])
    (d / "empty.safetensors").write_bytes(b"")
    (d / "image.safetensors").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (d / "folder.safetensors").mkdir()
    with open(d / "evil.pt", "wb") as f:
        pickle.dump({"w": _Payload(e["marker"])}, f)
    torch.save({"w": _Payload(e["marker"])}, d / "evil_torch.ckpt")
    shutil.copy(d / "evil.pt", d / "evil.ckpt")
    # a diffusers SDXL folder whose unet weights were cut short
    folder = d / "sdxl_diffusers"
    save_sdxl_diffusers(load_sdxl_models(str(tiny["ckpt"]), tokenizer_dir=str(tiny["tok"])), folder)
    unet_file = next((folder / "unet").glob("*.safetensors"))
    unet_file.write_bytes(unet_file.read_bytes()[:1000])
    # a real state folder (dim 4, AdamW) and damaged or older copies of it
    code = _exit(sdxl_train_network.main, _sdxl(tiny, d / "trained", *TRAIN, "--save_state"), "t")
    assert code == 0
    state = d / "trained" / "net-state"
    for name in ("legacy", "cut_net", "cut_opt"):
        shutil.copytree(state, d / f"state_{name}")
    (d / "state_legacy" / "run_settings.json").unlink()  # written before run_settings.json existed
    for name, file in (("cut_net", "network.safetensors"), ("cut_opt", "optimizer.bin")):
        f = d / f"state_{name}" / file
        f.write_bytes(f.read_bytes()[:-100])
    (d / "state_empty").mkdir()
    (d / "no_images" / "1_thing").mkdir(parents=True)
    (d / "no_images" / "1_thing" / "notes.txt").write_text("not an image")
    (d / "a_file").write_bytes(PRE)
    (d / "bad_type.toml").write_text('max_train_steps = "two"\n')
    (d / "bad_bool.toml").write_text('cache_latents = "yes"\n')
    e["state"] = state
    return e


def _sdxl(tiny, out: Path, *extra: str) -> list[str]:  # noqa: F811
    return ["--pretrained_model_name_or_path", str(tiny["ckpt"]), "--tokenizer_cache_dir", str(tiny["tok"]),
            "--dataset_config", str(tiny["toml"]), "--output_dir", str(out), "--output_name", "net",
            "--max_data_loader_n_workers", "0", "--seed", "42", *extra]  # fmt: skip


def _exit(main: Callable, argv: list[str], prog: str, input_status: int = 1) -> int:
    with pytest.raises(SystemExit) as info:
        run_cli(main, argv, prog=prog, input_status=input_status)
    return info.value.code


# ------------------------------------------------------------------------------------------ the table
@dataclass
class Case:
    id: str
    script: str  # sdxl | anima | anima_inf | gen_img | convert
    argv: Callable[[dict, Path], list[str]]  # (env, out dir) -> argv
    status: int
    says: tuple[str, ...]  # all in the output: the input's name and what is wrong
    setup: Callable[[dict, pytest.MonkeyPatch], None] | None = None
    files_after: tuple[str, ...] = ("net.safetensors",)  # the out dir's listing afterwards
    bug: bool = False  # an internal error: the traceback must be there
    untouched: Callable[[dict, Path], Path] = field(default=lambda e, out: out / "net.safetensors")


def _t(*extra: str, base: tuple[str, ...] = tuple(TRAIN)) -> Callable[[dict, Path], list[str]]:
    """SDXL trainer argv; ``{d}`` in a token is the env folder."""
    return lambda e, out: _sdxl(e["tiny"], out, *base, *(x.format(d=e["d"]) for x in extra))


def _anima(flag: str, bad: str) -> Callable[[dict, Path], list[str]]:
    def argv(e: dict, out: Path) -> list[str]:
        ok = str(e["d"] / "ok.safetensors")
        a = {"--pretrained_model_name_or_path": ok, "--qwen3": ok, "--vae": ok}
        a[flag] = str(e["d"] / bad)
        return [*sum(([k, v] for k, v in a.items()), []), "--dataset_config", str(e["tiny"]["toml"]),
                "--network_module", "networks.lora", "--output_dir", str(out), "--output_name", "net"]  # fmt: skip

    return argv


def _inf(*extra: str) -> Callable[[dict, Path], list[str]]:
    def argv(e: dict, out: Path) -> list[str]:
        ok = str(e["d"] / "ok.safetensors")
        return ["--dit", ok, "--vae", ok, "--text_encoder", ok, "--prompt", "a cat", "--save_path", str(out),
                *(x.format(d=e["d"]) for x in extra)]  # fmt: skip

    return argv


def _gen(*extra: str) -> Callable[[dict, Path], list[str]]:
    def argv(e: dict, out: Path) -> list[str]:
        t = e["tiny"]
        return ["--ckpt", str(t["ckpt"]), "--tokenizer_dir", str(t["tok"]), "--W", "32", "--H", "32", "--steps",
                "1", "--prompt", "a cat", "--outdir", str(out), *(x.format(d=e["d"]) for x in extra)]  # fmt: skip

    return argv


def _conv(src: str, dst: str | None = None) -> Callable[[dict, Path], list[str]]:
    return lambda e, out: ["--input", str(e["d"] / src), "--output", str(out / "net.safetensors") if dst is None
                           else str(e["d"] / dst)]  # fmt: skip


def _no_space(e: dict, mp: pytest.MonkeyPatch) -> None:
    mp.setattr(atomic_io, "free_bytes", lambda folder: 4096)


def _disk_fills(e: dict, mp: pytest.MonkeyPatch) -> None:
    """The disk fills during the write (the free-space check passed): the writer fails half-way."""
    import networks.network_io as nio

    def full(tensors, tmp, metadata=None):
        Path(tmp).write_bytes(b"\0" * 3000)
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    mp.setattr(nio, "save_file", full)


def _sigint_at_step(n: int, times: int) -> Callable[[dict, pytest.MonkeyPatch], None]:
    def setup(e: dict, mp: pytest.MonkeyPatch) -> None:
        real, calls = SdxlArchitecture.per_sample_loss, [0]

        def loss(self, ctx, batch):
            calls[0] += 1
            if calls[0] == n:
                for _ in range(times):
                    signal.raise_signal(signal.SIGINT)
            return real(self, ctx, batch)

        mp.setattr(SdxlArchitecture, "per_sample_loss", loss)

    return setup


def _bug(e: dict, mp: pytest.MonkeyPatch) -> None:
    import library.training.run as tl

    def broken(name):
        raise KeyError("an internal slip")

    mp.setattr(tl, "import_network_module", broken)


CUT_NET_SAYS = ("--network_weights", "cut.safetensors", "truncated")
CASES = [
    # 1. unreadable files
    Case("net-cut", "sdxl", _t("--network_weights", "{d}/cut.safetensors"), 1, CUT_NET_SAYS),
    Case("net-empty", "sdxl", _t("--network_weights", "{d}/empty.safetensors"), 1, ("empty.safetensors", "empty")),
    Case("net-pickle", "sdxl", _t("--network_weights", "{d}/evil.pt"), 1, ("evil.pt", "pickle", "refused")),
    Case("net-torch-pickle", "sdxl", _t("--network_weights", "{d}/evil_torch.ckpt"), 1,
         ("evil_torch.ckpt", "Python objects", "refused")),
    Case("net-folder", "sdxl", _t("--network_weights", "{d}/folder.safetensors"), 1, ("folder.safetensors", "folder")),
    Case("net-foreign", "sdxl", _t("--network_weights", "{d}/image.safetensors"), 1, ("image.safetensors", "PNG")),
    Case("base-weights-cut", "sdxl", _t("--base_weights", "{d}/cut.safetensors"), 1,
         ("--base_weights", "cut.safetensors", "truncated")),
    Case("sdxl-ckpt-cut", "sdxl", _t("--pretrained_model_name_or_path", "{d}/cut.safetensors"), 1,
         ("--pretrained_model_name_or_path", "cut.safetensors", "truncated")),
    Case("sdxl-ckpt-pickle", "sdxl", _t("--pretrained_model_name_or_path", "{d}/evil.ckpt"), 1,
         ("--pretrained_model_name_or_path", "evil.ckpt", "pickle")),
    Case("sdxl-diffusers-cut-unet", "sdxl", _t("--pretrained_model_name_or_path", "{d}/sdxl_diffusers"), 1,
         ("sdxl_diffusers/unet/diffusion_pytorch_model.safetensors", "truncated")),
    Case("anima-dit-cut", "anima", _anima("--pretrained_model_name_or_path", "cut.safetensors"), 1,
         ("--pretrained_model_name_or_path", "cut.safetensors", "truncated")),
    Case("anima-qwen3-pickle", "anima", _anima("--qwen3", "evil.pt"), 1, ("--qwen3", "evil.pt", "pickle")),
    Case("inf-dit-cut", "anima_inf", _inf("--dit", "{d}/cut.safetensors"), 2, ("DiT", "cut.safetensors", "truncated")),
    Case("inf-lora-pickle", "anima_inf", _inf("--lora_weight", "{d}/evil.pt"), 2, ("--lora_weight", "evil.pt")),
    Case("inf-lora-torch", "anima_inf", _inf("--lora_weight", "{d}/evil_torch.ckpt"), 2,
         ("--lora_weight", "evil_torch.ckpt", "PyTorch")),
    Case("inf-lora-empty", "anima_inf", _inf("--lora_weight", "{d}/empty.safetensors"), 2,
         ("--lora_weight", "empty.safetensors", "empty")),
    Case("gen-net-cut", "gen_img", _gen("--network_module", "networks.lora", "--network_weights", "{d}/cut.safetensors"),
         2, CUT_NET_SAYS),
    Case("gen-ckpt-pickle", "gen_img", _gen("--ckpt", "{d}/evil.ckpt"), 2, ("evil.ckpt", "pickle")),
    Case("convert-cut", "convert", _conv("cut.safetensors"), 1, ("--input", "cut.safetensors", "truncated")),
    Case("convert-pickle", "convert", _conv("evil.pt"), 1, ("--input", "evil.pt", "pickle")),
    Case("convert-empty", "convert", _conv("empty.safetensors"), 1, ("--input", "empty.safetensors", "empty")),
    # 2. a full disk, found before writing (size known) and while writing
    Case("no-space-network", "sdxl", _t(), 1, ("net.safetensors", "no space left", "needs about"), _no_space),
    Case("no-space-state", "sdxl", _t("--save_state"), 1, ("net-state", "no space left", "needs about"), _no_space),
    Case("disk-fills-mid-write", "sdxl", _t(), 1, ("net.safetensors", "no space left", "needs about"),
         _disk_fills),
    # 3. Ctrl-C: once = finish the step, save, exit 130; twice = stop at once
    Case("ctrl-c-once", "sdxl", _t("--max_train_steps", "4"), EXIT_INTERRUPTED,
         ("step 2/4", "net-step00000002.safetensors", "--resume", "net-step00000002-state"), _sigint_at_step(2, 1),
         files_after=("net-step00000002-state", "net-step00000002.safetensors", "net.safetensors")),
    Case("ctrl-c-twice", "sdxl", _t("--max_train_steps", "4"), EXIT_INTERRUPTED, ("Ctrl-C", "at once"),
         _sigint_at_step(2, 2)),
    # 4. resume mismatches: named before any model loads, except the older state without run_settings.json
    Case("resume-empty", "sdxl", _t("--resume", "{d}/state_empty"), 1,
         ("--resume", "state_empty", "not a --save_state folder", "optimizer.bin")),
    Case("resume-dim", "sdxl", _t("--resume", "{d}/trained/net-state", "--network_dim", "2"), 1,
         ("--resume", "net-state", "--network_dim 4", "--network_dim 2")),
    Case("resume-algorithm", "sdxl", _t("--resume", "{d}/trained/net-state", "--network_module", "networks.loha"), 1,
         ("--resume", "net-state", "--network_module networks.lora", "--network_module networks.loha")),
    Case("resume-optimizer", "sdxl", _t("--resume", "{d}/trained/net-state", "--optimizer_type", "SGDNesterov"), 1,
         ("--resume", "net-state", "--optimizer_type AdamW", "--optimizer_type SGD")),
    Case("resume-module-set", "sdxl", _t("--resume", "{d}/trained/net-state", "--network_train_unet_only"), 1,
         ("--resume", "net-state", "--network_train_unet_only")),
    Case("resume-older-state-dim", "sdxl", _t("--resume", "{d}/state_legacy", "--network_dim", "2"), 1,
         ("--resume", "state_legacy", "differ in shape", "saved [4,")),
    Case("resume-older-state-modules", "sdxl", _t("--resume", "{d}/state_legacy", "--network_train_unet_only"), 1,
         ("--resume", "state_legacy", "have no place in this network")),
    Case("resume-older-state-optimizer", "sdxl",
         _t("--resume", "{d}/state_legacy", "--optimizer_type", "SGDNesterov"), 1,
         ("--resume", "state_legacy", "another optimizer's", "lacks dampening, momentum", "SGD(")),
    Case("resume-cut-network", "sdxl", _t("--resume", "{d}/state_cut_net"), 1,
         ("--resume", "state_cut_net/network.safetensors", "truncated")),
    Case("resume-cut-optimizer", "sdxl", _t("--resume", "{d}/state_cut_opt"), 1,
         ("--resume", "state_cut_opt/optimizer.bin", "truncated or damaged")),
    # 5. --config_file values pass the command line's conversion
    Case("config-type", "sdxl", _t("--config_file", "{d}/bad_type.toml"), 1,
         ("--config_file", "bad_type.toml", "max_train_steps", "expected an integer")),
    Case("config-bool", "sdxl", _t("--config_file", "{d}/bad_bool.toml"), 1,
         ("bad_bool.toml", "cache_latents", "expected true or false")),
    # 6. silently accepted before
    Case("output-name-escapes", "sdxl", _t("--output_name", "../escaped"), 1, ("--output_name", "../escaped")),
    Case("output-name-subfolder", "sdxl", _t("--output_name", "sub/r"), 1, ("--output_name", "sub/r")),
    Case("convert-output-is-input", "convert", _conv("ok.safetensors", "ok.safetensors"), 1,
         ("--output", "ok.safetensors", "--input"), untouched=lambda e, out: e["d"] / "ok.safetensors",
         files_after=()),
    Case("negative-alpha-warns", "sdxl", _t("--network_alpha", "-2"), 0, ("--network_alpha -2", "flips the sign")),
    # 7. no images: the line names the folder
    Case("no-images", "sdxl", _t("--dataset_config", "", "--train_data_dir", "{d}/no_images", "--resolution", "64"), 1,
         ("no_images/1_thing", "no training images")),
    # permission / not a folder, and an internal error (its traceback is kept)
    Case("output-dir-not-writable", "sdxl", _t("--output_dir", "{d}/a_file/out"), 1,
         ("--output_dir", "a_file/out", "not writable"), untouched=lambda e, out: e["d"] / "a_file", files_after=()),
    Case("internal-bug", "sdxl", _t(), EXIT_BUG, ("internal error (KeyError)", "bug"), _bug, bug=True),
]  # fmt: skip


def _run(case: Case, argv: list[str]) -> int:
    if case.script == "sdxl":
        return _exit(sdxl_train_network.main, argv, "sdxl_train_network.py")
    if case.script == "anima":
        return _exit(anima_train_network.main, argv, "anima_train_network.py")
    if case.script == "anima_inf":
        return _exit(anima_minimal_inference.main, argv, "anima_minimal_inference.py", input_status=2)
    if case.script == "convert":
        return _exit(converter.main, argv, "convert_anima_lora_to_comfy.py")
    return gen_img.main(argv)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, env, tmp_path, capsys, caplog, monkeypatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "net.safetensors").write_bytes(PRE)
    kept = case.untouched(env, out)
    before = kept.read_bytes()
    if case.setup:
        case.setup(env, monkeypatch)
    status = _run(case, case.argv(env, out))
    err = capsys.readouterr().err
    text = err + caplog.text
    assert status == case.status, text
    assert ("Traceback" in err) == case.bug, err
    for word in case.says:
        assert word in text, f"{word!r} not in {text!r}"
    if status not in (0, EXIT_BUG):  # one line from the boundary, and it is the last one
        prog = f"{'gen_img' if case.script == 'gen_img' else ''}"
        mine = [ln for ln in err.splitlines() if ln.split(":")[0].endswith(".py") and prog in ln]
        assert len(mine) == 1 and err.strip().splitlines()[-1] == mine[0], err
    if status != 0:
        assert kept.read_bytes() == before  # byte-identical
    if out.exists() and kept.parent == out:
        assert sorted(p.name for p in out.iterdir()) == sorted(case.files_after)
    assert not any(p.name.startswith(".") for p in tmp_path.rglob("*")), "a temp or partial file was left"
    assert not env["marker"].exists(), "a pickle payload ran"


# ------------------------------------------------------------------------------------ Ctrl-C, resumed
def test_interrupted_run_resumes_to_the_uninterrupted_result(env, tmp_path, capsys, monkeypatch) -> None:
    """The state saved by a first Ctrl-C, resumed with the printed command, ends bit-identical to a run
    that was never interrupted."""
    t = env["tiny"]
    argv = _sdxl(t, tmp_path / "full", *TRAIN, "--max_train_steps", "3")
    assert _exit(sdxl_train_network.main, argv, "t") == 0
    _sigint_at_step(2, 1)(env, monkeypatch)
    cut = _sdxl(t, tmp_path / "cut", *TRAIN, "--max_train_steps", "3")
    assert _exit(sdxl_train_network.main, cut, "t") == EXIT_INTERRUPTED
    monkeypatch.undo()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    command = line.split("to resume: ", 1)[1]
    launcher = "accelerate launch sdxl_train_network.py "
    assert command.startswith(launcher)
    import shlex

    resumed = shlex.split(command[len(launcher) :])
    assert resumed[-2:] == ["--resume", str(tmp_path / "cut" / "net-step00000002-state")]
    assert _exit(sdxl_train_network.main, resumed, "t") == 0
    a = load_file(str(tmp_path / "full" / "net.safetensors"))
    b = load_file(str(tmp_path / "cut" / "net.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ atomic writes
def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch) -> None:
    target = tmp_path / "x.safetensors"
    target.write_bytes(PRE)

    def half_then_full(tmp: str) -> None:
        Path(tmp).write_bytes(b"\0" * 5000)
        raise RuntimeError("safetensors: No space left on device (os error 28)")

    with pytest.raises(atomic_io.NoSpaceError, match=r"x\.safetensors: could not be written.*0\.0 MiB were"):
        atomic_io.atomic_write(target, half_then_full)
    state = tmp_path / "s-state"
    state.mkdir()
    (state / "a.txt").write_text("old")

    def torch_writer_fails(tmp: Path) -> None:
        (tmp / "optimizer.bin").write_bytes(b"\0" * 100)
        monkeypatch.setattr(atomic_io, "free_bytes", lambda folder: 0)  # the disk is full now
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    with pytest.raises(atomic_io.NoSpaceError, match=r"s-state: could not be written"):
        atomic_io.atomic_dir(state, torch_writer_fails)
    assert target.read_bytes() == PRE and (state / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-state", "x.safetensors"]


# ------------------------------------------------------------------------------- the real __main__
SCRIPTS = [
    ("sdxl_train_network.py", _t("--network_weights", "{d}/evil.pt"), 1, "evil.pt"),
    ("anima_train_network.py", _anima("--qwen3", "cut.safetensors"), 1, "cut.safetensors"),
    ("anima_minimal_inference.py", _inf("--lora_weight", "{d}/cut.safetensors"), 2, "cut.safetensors"),
    ("gen_img.py", _gen("--ckpt", "{d}/evil_torch.ckpt"), 2, "evil_torch.ckpt"),
    ("networks/convert_anima_lora_to_comfy.py", _conv("evil.pt"), 1, "evil.pt"),
]


@pytest.mark.parametrize("script,argv,status,name", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_script_entry_points_use_the_boundary(script, argv, status, name, env, tmp_path) -> None:
    run = subprocess.run([sys.executable, str(ROOT / script), *argv(env, tmp_path)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)  # fmt: skip
    assert run.returncode == status, run.stderr
    assert "Traceback" not in run.stderr and name in run.stderr.strip().splitlines()[-1], run.stderr
    assert not env["marker"].exists()
