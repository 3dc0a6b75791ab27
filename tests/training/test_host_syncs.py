"""A training step makes one host read, after its update is queued (tests/helpers/host_syncs.py).

Any earlier read or blocking upload made once the denoiser's forward is queued would make the host wait
for the forward on CUDA and leave the GPU idle while the host queues the backward. Uploads of the batch
before the forward are fine: the queue then holds at most the previous step's update.
"""

from __future__ import annotations

import pytest

import sdxl_train_network
from library.training.run import TrainingRun
from tests.helpers.host_syncs import probe_steps
from tests.helpers.train_sdxl import _argv, tiny  # noqa: F401 - fixture

ONE_READ = [("tolist", "library/training/steps.py")]


def _after_forward(syncs) -> list[list[tuple[str, str]]]:  # type: ignore[no-untyped-def]
    return [[(call, site.rsplit(":", 1)[0]) for call, site in step] for step in syncs.after_forward()]


@pytest.mark.parametrize(
    "flags",
    [
        ("--network_module", "networks.lokr", "--gradient_checkpointing"),
        # every per-timestep loss option: SNR weights and the Huber threshold are made before the forward
        ("--network_module", "networks.loha", "--min_snr_gamma", "5", "--debiased_estimation_loss",
         "--loss_type", "huber", "--huber_schedule", "snr", "--max_grad_norm", "1.0"),
    ],
    ids=["lokr-gc", "loha-snr-huber"],
)  # fmt: skip
def test_sdxl_step_reads_the_host_once_after_its_update(tiny, tmp_path, flags):  # noqa: F811
    common = ["--network_dim", "4", "--network_alpha", "2", "--optimizer_type", "AdamW", "--max_train_steps", "3",
              "--cache_latents", "--cache_text_encoder_outputs", "--network_train_unet_only"]  # fmt: skip
    with probe_steps(TrainingRun, "train_step", lambda run: run.unet) as syncs:
        sdxl_train_network.main(_argv(tiny, tmp_path / "out", *common, *flags))
    assert len(syncs.steps) == 3
    assert _after_forward(syncs) == [ONE_READ] * 3
    # the probe sees the uploads made before the forward, so it would see a late one too
    before = [(e.call, e.site) for e in syncs.steps[0] if not e.after_forward]
    assert any(call == "to" and site.startswith("library/sdxl/") for call, site in before), before


def test_probe_sees_a_read_and_an_upload_after_the_forward():
    import torch

    class Run:
        unet = torch.nn.Linear(2, 2)

        def train_step(self, x):
            t = torch.tensor([1.0], device="cpu")  # before the forward: an upload, allowed
            y = self.unet(x + t)
            w = torch.ones(2).to(y)  # after it: an upload, caught
            return (y * w).sum().item()  # and a read

    with probe_steps(Run, "train_step", lambda run: run.unet) as syncs:
        Run().train_step(torch.zeros(2))
    assert [e.after_forward for e in syncs.steps[0]] == [False, True, True]
    assert [e.call for e in syncs.steps[0]] == ["torch.tensor", "to", "item"]
