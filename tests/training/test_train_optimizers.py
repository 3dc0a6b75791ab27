"""Optimizer selection by sd-scripts names, --optimizer_args, and scheduler curves with warmup."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from library.training.args import add_training_arguments
from library.training.optimizers import build_optimizer, build_scheduler, parse_optimizer_args


def _args(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_training_arguments(parser)
    args = parser.parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(8, 8))]


def test_parse_optimizer_args_literals():
    got = parse_optimizer_args(
        ["weight_decay=0.01", "betas=0.9,0.999", "relative_step=False", "eps=(1e-30, 1e-3)"]
    )
    assert got == {"weight_decay": 0.01, "betas": (0.9, 0.999), "relative_step": False, "eps": (1e-30, 1e-3)}
    with pytest.raises(ValueError, match="exactly one '='"):
        parse_optimizer_args(["a=b=c"])


@pytest.mark.parametrize(
    "name, cls_name",
    [("", "AdamW"), ("adamw", "AdamW"), ("AdamW8bit", "AdamW8bit"), ("Lion8bit", "Lion8bit"),
     ("SGDNesterov", "SGD"), ("Adafactor", "Adafactor"), ("Prodigy", "Prodigy"), ("Lion", "Lion"),
     ("torch.optim.RMSprop", "RMSprop"), ("RAdam", "RAdam")],
)  # fmt: skip
def test_optimizer_types_build_and_step(name, cls_name):
    args = _args(optimizer_type=name, learning_rate=1e-2)
    params = _params()
    before = params[0].detach().clone()
    _, desc, opt = build_optimizer(args, [{"params": params, "lr": 1e-2}])
    # bitsandbytes' classes come with the flat 8-bit update mixed in (library/training/flat_8bit.py)
    mro = [c.__name__ for c in type(opt).__mro__]
    assert mro[0] == cls_name or mro[:3] == [f"Flat{cls_name}", "FlatBlockwise8bit", cls_name]
    assert desc.split("(")[0].endswith(cls_name)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert not torch.equal(before, params[0].detach())  # the step moved the weights


def test_sgd_nesterov_defaults_and_args():
    _, desc, opt = build_optimizer(
        _args(optimizer_type="SGDNesterov", optimizer_args=["momentum=0.5"]), _params()
    )
    assert opt.param_groups[0]["nesterov"] is True and opt.param_groups[0]["momentum"] == 0.5
    assert desc == "torch.optim.sgd.SGD(momentum=0.5,nesterov=True)"


def test_adafactor_relative_step_switches_scheduler():
    args = _args(optimizer_type="Adafactor", learning_rate=1e-3)
    _, _, opt = build_optimizer(args, [{"params": _params(), "lr": 5e-3}])
    assert args.lr_scheduler == "adafactor:0.001"
    sched = build_scheduler(args, opt)
    assert type(sched).__name__ == "AdafactorSchedule"


def test_unknown_optimizer_and_bad_args():
    with pytest.raises(ValueError, match="'NoSuchOpt': unknown"):
        build_optimizer(_args(optimizer_type="NoSuchOpt"), _params())
    with pytest.raises(ImportError, match="cannot import module 'nosuchpkg'"):
        build_optimizer(_args(optimizer_type="nosuchpkg.Opt"), _params())
    with pytest.raises(ValueError, match="not accepted by AdamW"):
        build_optimizer(_args(optimizer_args=["bogus=1"]), _params())


def _lrs(name, steps=10, warmup="0", **kw):
    args = _args(lr_scheduler=name, max_train_steps=steps, lr_warmup_steps=warmup, learning_rate=1.0, **kw)
    _, _, opt = build_optimizer(args, _params())
    sched = build_scheduler(args, opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_scheduler_curves():
    assert _lrs("constant") == [1.0] * 10
    assert _lrs("linear") == pytest.approx([1 - i / 10 for i in range(10)])
    assert _lrs("cosine") == pytest.approx([0.5 * (1 + math.cos(math.pi * i / 10)) for i in range(10)])
    assert _lrs("constant_with_warmup", warmup="4")[:6] == pytest.approx([0, 0.25, 0.5, 0.75, 1, 1])
    assert _lrs("linear", warmup="0.2")[:3] == pytest.approx([0, 0.5, 1.0])  # ratio warmup: 2 of 10 steps
    assert _lrs("polynomial", lr_scheduler_power=2.0)[5] == pytest.approx(
        ((1 - 5 / 10) ** 2) * (1 - 1e-7) + 1e-7
    )
    restarts = _lrs("cosine_with_restarts", lr_scheduler_num_cycles=2)
    assert restarts[0] == pytest.approx(1.0) and restarts[5] == pytest.approx(1.0)  # restarted mid-way
    with pytest.raises(ValueError, match="--lr_scheduler 'nope'"):
        _lrs("nope")


def test_scheduler_length_scales_with_processes():
    args = _args(lr_scheduler="linear", max_train_steps=10, learning_rate=1.0)
    _, _, opt = build_optimizer(args, _params())
    sched = build_scheduler(args, opt, num_processes=2)
    for _ in range(10):  # accelerate steps the scheduler once per process per update
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
