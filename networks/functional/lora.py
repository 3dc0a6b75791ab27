"""LoRA ΔW: up · (mid ·) down, reshaped like the base weight."""

from __future__ import annotations

import torch

from .common import Scale


def lora_delta_weight(
    down: torch.Tensor, up: torch.Tensor, scale: Scale, mid: torch.Tensor | None = None
) -> torch.Tensor:
    """ΔW = scale · up · down (LoRA / LoCon), shaped like W.

    down: (r, I) or conv (r, I, kh, kw); up: (O, r) or (O, r, 1, 1).
    With `mid` (LoCon Tucker, (r, r, kh, kw)) down is (r, I[, 1, 1]) and
    ΔW[o,i,x,y] = Σ_{p,q} up[o,p]·mid[p,q,x,y]·down[q,i].
    Returns (O, I) when down is 2-D and there is no mid, else (O, I, kh, kw).
    """
    rank = down.shape[0]
    if up.dim() not in (2, 4) or up.shape[1] != rank or (up.dim() == 4 and up.shape[2:] != (1, 1)):
        raise ValueError(
            f"lora_delta_weight: up of shape {tuple(up.shape)} does not match down {tuple(down.shape)}; "
            "expected up (O, r) or (O, r, 1, 1) with r = down.shape[0]"
        )
    up2 = up.reshape(up.shape[0], rank)
    if mid is not None:
        down2 = down.reshape(rank, -1)
        if mid.dim() != 4 or mid.shape[:2] != (up2.shape[1], rank):
            raise ValueError(
                f"lora_delta_weight: mid of shape {tuple(mid.shape)} is not (r, r, kh, kw) with r = {rank}"
            )
        # Scale the smallest factor (up is O×r, the core r×r×K) before contracting.
        core = torch.einsum("pqxy,qi->pixy", mid, down2)
        return torch.einsum("op,pixy->oixy", up2 * scale, core)
    delta = (up2 * scale) @ down.reshape(rank, -1)
    if down.dim() == 2 and up.dim() == 2:
        return delta
    if down.dim() == 2:
        return delta[:, :, None, None]
    return delta.reshape(up.shape[0], *down.shape[1:])
