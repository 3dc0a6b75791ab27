"""Training-step maths vs hand-computed numbers: schedule, SNR weights, targets, losses, noise."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from library.sdxl.loss import (
    LossConfig,
    apply_snr_weightings,
    elementwise_loss,
    huber_c_for,
    make_noise_scheduler,
    min_snr_weight,
    sample_noise,
    sample_timesteps,
    sdxl_time_ids,
    sdxl_training_step_loss,
    snr_of,
    v_target,
)


def hand_alphas_cumprod() -> list[float]:
    """scaled_linear: β_t = (√0.00085 + t/999·(√0.012 − √0.00085))², ᾱ_t = Π(1 − β)."""
    a, b = math.sqrt(0.00085), math.sqrt(0.012)
    out, prod = [], 1.0
    for t in range(1000):
        beta = (a + t / 999 * (b - a)) ** 2
        prod *= 1 - beta
        out.append(prod)
    return out


AC = hand_alphas_cumprod()


def test_schedule_matches_hand_computation() -> None:
    s = make_noise_scheduler()
    for t in (0, 1, 250, 500, 999):
        assert s.alphas_cumprod[t].item() == pytest.approx(AC[t], rel=1e-5)
    assert AC[0] == pytest.approx(0.99915)
    snr = snr_of(s, torch.tensor([0, 500, 999]))
    for i, t in enumerate((0, 500, 999)):
        # ᾱ is stored in float32 (as in training), so 1 − ᾱ near t=0 carries ~3e-5 relative error
        assert snr[i].item() == pytest.approx(AC[t] / (1 - AC[t]), rel=1e-4)
    zt = make_noise_scheduler(zero_terminal_snr=True)
    assert zt.alphas_cumprod[-1].item() < 1e-6  # terminal SNR ≈ 0


def test_min_snr_weights_at_known_timesteps() -> None:
    s = make_noise_scheduler()
    t = torch.tensor([10, 300, 999])
    snr = snr_of(s, t)
    hand = [AC[i] / (1 - AC[i]) for i in (10, 300, 999)]
    w_eps = min_snr_weight(snr, 5.0)
    w_v = min_snr_weight(snr, 5.0, v_prediction=True)
    for i, h in enumerate(hand):
        assert w_eps[i].item() == pytest.approx(min(h, 5.0) / h, rel=1e-5)
        assert w_v[i].item() == pytest.approx(min(h, 5.0) / (h + 1), rel=1e-5)
    assert hand[0] > 5 and hand[2] < 5  # the clip is active at t=10, not at t=999
    assert w_eps[2].item() == pytest.approx(1.0)
    loss = torch.ones(3)
    out = apply_snr_weightings(loss, snr, LossConfig(min_snr_gamma=5.0, debiased_estimation_loss=True))
    for i, h in enumerate(hand):
        assert out[i].item() == pytest.approx(min(h, 5.0) / h / math.sqrt(min(h, 1000.0)), rel=1e-5)


def test_v_target_and_losses() -> None:
    s = make_noise_scheduler(v_parameterization=True)
    x0 = torch.full((1, 1, 2, 2), 2.0)
    eps = torch.full((1, 1, 2, 2), -1.0)
    v = v_target(s, x0, eps, torch.tensor([400]))
    expect = math.sqrt(AC[400]) * -1.0 - math.sqrt(1 - AC[400]) * 2.0
    torch.testing.assert_close(v, torch.full_like(v, expect), rtol=1e-5, atol=1e-6)

    pred, tgt = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])
    assert elementwise_loss(pred, tgt, "l2").tolist() == [[1.0, 4.0]]
    assert elementwise_loss(pred, tgt, "l1").tolist() == [[1.0, 2.0]]
    c = torch.tensor([0.5])
    hub = elementwise_loss(pred, tgt, "huber", c)[0]
    sm = elementwise_loss(pred, tgt, "smooth_l1", c)[0]
    assert hub[0].item() == pytest.approx(2 * 0.5 * (math.sqrt(1.25) - 0.5))
    assert hub[1].item() == pytest.approx(2 * 0.5 * (math.sqrt(4.25) - 0.5))
    assert sm[0].item() == pytest.approx(2 * (math.sqrt(1.25) - 0.5))
    with pytest.raises(ValueError, match="loss_type must be one of l2, l1, huber, smooth_l1"):
        elementwise_loss(pred, tgt, "l3")
    # huber threshold schedules
    t = torch.tensor([0, 999])
    assert huber_c_for(s, t, "l2") is None
    assert huber_c_for(s, t, "huber", "constant", 0.1).tolist() == pytest.approx([0.1, 0.1])
    exp = huber_c_for(s, t, "huber", "exponential", 0.1)
    assert exp[0].item() == pytest.approx(1.0) and exp[1].item() == pytest.approx(
        0.1 ** (999 / 1000), rel=1e-5
    )
    snr_c = huber_c_for(s, t, "huber", "snr", 0.1)
    sig = math.sqrt((1 - AC[999]) / AC[999])
    assert snr_c[1].item() == pytest.approx(0.9 / (1 + sig) ** 2 + 0.1, rel=1e-5)
    # huber_scale scales the constant/exponential schedules, not the snr one (as sd-scripts)
    assert huber_c_for(s, t, "huber", "constant", 0.1, 2.0).tolist() == pytest.approx([0.2, 0.2])
    assert torch.equal(huber_c_for(s, t, "huber", "snr", 0.1, 2.0), snr_c)


def test_noise_offset_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    lat = torch.zeros(256, 4, 32, 32)
    plain = sample_noise(lat, generator=g)
    off = sample_noise(lat, noise_offset=0.1, generator=g)
    std_plain = plain.mean(dim=(2, 3)).std().item()
    std_off = off.mean(dim=(2, 3)).std().item()
    assert std_plain == pytest.approx(1 / 32, rel=0.1)
    assert std_off == pytest.approx(math.sqrt(0.01 + 1 / 1024), rel=0.1)
    # adaptive scale: a bright latent gets a larger offset
    bright = torch.full((256, 4, 32, 32), 2.0)
    ada = sample_noise(bright, noise_offset=0.1, adaptive_noise_scale=0.05, generator=g)
    assert ada.mean(dim=(2, 3)).std().item() == pytest.approx(math.sqrt(0.2**2 + 1 / 1024), rel=0.1)
    multi = sample_noise(lat[:8], multires_noise_iterations=4, generator=g)
    assert multi.std().item() == pytest.approx(1.0, rel=1e-4)
    both = sample_noise(lat[:8], noise_offset=0.1, multires_noise_iterations=4, generator=g)
    assert both.std().item() == pytest.approx(1.0, rel=1e-4)  # pyramid renormalises after the offset
    # a negative adaptive scale cannot push the offset below zero
    neg = sample_noise(bright, noise_offset=0.1, adaptive_noise_scale=-1.0, generator=g)
    assert neg.mean(dim=(2, 3)).std().item() == pytest.approx(1 / 32, rel=0.1)


def test_timesteps_and_time_ids() -> None:
    g = torch.Generator().manual_seed(1)
    t = sample_timesteps(5000, 100, 200, generator=g)
    assert t.device.type == "cpu" and t.dtype == torch.long
    assert t.min().item() == 100 and t.max().item() == 199
    with pytest.raises(ValueError, match="min_timestep"):
        sample_timesteps(1, 500, 400)
    assert sample_timesteps(3, 700, 700).tolist() == [700, 700, 700]
    ids = sdxl_time_ids([(768, 1024), (512, 512)], (0, 32), (1024, 1024))
    assert ids.tolist() == [[768, 1024, 0, 32, 1024, 1024], [512, 512, 0, 32, 1024, 1024]]


def test_training_step_loss_equals_manual(clip_tokenizer_dir: Path) -> None:
    from library.sdxl.loading import build_tiny_sdxl_models

    unet = build_tiny_sdxl_models(clip_tokenizer_dir).unet
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ctx = torch.randn(2, 77, 64, generator=torch.Generator().manual_seed(4))
    pooled = torch.randn(2, 32, generator=torch.Generator().manual_seed(5))
    tid = sdxl_time_ids((64, 64), (0, 0), (64, 64)).expand(2, 6)
    t = torch.tensor([100, 900])
    args = LossConfig()
    with torch.no_grad():
        loss = sdxl_training_step_loss(
            unet, lat, ctx, pooled, tid, args, generator=torch.Generator().manual_seed(7), timesteps=t
        )
        noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(7))
        ac = torch.tensor([AC[100], AC[900]]).view(2, 1, 1, 1).float()
        noisy = ac.sqrt() * lat + (1 - ac).sqrt() * noise
        pred = unet(noisy, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": tid}).sample
        manual = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(loss, manual, rtol=1e-4, atol=1e-6)
        # min-SNR and per-sample weights multiply exactly that loss
        w = sdxl_training_step_loss(
            unet,
            lat,
            ctx,
            pooled,
            tid,
            LossConfig(min_snr_gamma=5.0),
            generator=torch.Generator().manual_seed(7),
            timesteps=t,
            loss_weights=torch.tensor([1.0, 0.5]),
        )
        snr = torch.tensor([AC[i] / (1 - AC[i]) for i in (100, 900)])
        expect = manual * torch.tensor([1.0, 0.5]) * torch.minimum(snr, torch.tensor(5.0)) / snr
        torch.testing.assert_close(w, expect.float(), rtol=1e-4, atol=1e-6)
        # random timesteps: deterministic for a generator seed, finite
        a = sdxl_training_step_loss(
            unet, lat, ctx, pooled, tid, args, generator=torch.Generator().manual_seed(9)
        )
        b = sdxl_training_step_loss(
            unet, lat, ctx, pooled, tid, args, generator=torch.Generator().manual_seed(9)
        )
        assert torch.equal(a, b) and torch.isfinite(a).all() and a.shape == (2,)


def test_loss_config_from_parsed_flags() -> None:
    """Absent flags and None (argparse's unset) keep sd-scripts' defaults; given values pass through typed."""
    cfg = LossConfig.from_args(
        SimpleNamespace(min_snr_gamma=5.0, multires_noise_discount=None, loss_type="huber", unrelated=1)
    )
    assert cfg.min_snr_gamma == 5.0 and cfg.loss_type == "huber"
    assert cfg.multires_noise_discount == 0.3 and cfg.max_timestep == 1000 and cfg.huber_schedule == "snr"
    assert LossConfig.from_args(None) == LossConfig()
