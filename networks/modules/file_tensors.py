"""An adapter's tensors as a file holds them: keys without the `lora_name.` prefix, σ baked into one
factor, α as a 0-d fp32 tensor. Strict loading: every mismatch names the full key."""

from __future__ import annotations

import logging

import torch

from networks.modules.alpha import file_alpha

logger = logging.getLogger(__name__)


class FileTensorsMixin:
    """Mixed into AdapterModule (needs `named_parameters`, `scalar`, `rank`, `_set_alpha`)."""

    lora_name: str
    algo: str
    rank: int
    alpha_value: float
    scale: float
    scalar: torch.nn.Parameter | None

    def scalar_bake_name(self) -> str:
        """The factor that carries σ in a file (σ·factor, so the file needs no σ key)."""
        raise NotImplementedError

    def normalize_file_tensor(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """Hook for accepted alternative layouts (e.g. LyCORIS 4-D 1×1 `lokr_w2`)."""
        return t

    def file_tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Tensors to save (keys without the lora_name prefix): σ baked, alpha 0-d fp32."""
        out: dict[str, torch.Tensor] = {}
        bake = self.scalar_bake_name() if self.scalar is not None else None
        for name, p in self.named_parameters():
            if name == "scalar":
                continue
            t = p.detach()
            target = dtype if dtype is not None else p.dtype
            if name == bake:  # σ·factor in fp32, then one cast
                t = t.float() * self.scalar.detach().float()
            out[name] = t.to(target) if t.dtype != target else t.clone()
        out["alpha"] = torch.tensor(self.alpha_value, dtype=torch.float32)
        return {k: v.contiguous() for k, v in out.items()}

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Strictly copy a module's file tensors in; errors name the full key."""
        own = {n: p for n, p in self.named_parameters() if n != "scalar"}
        for key in tensors:
            if key != "alpha" and key not in own:
                raise KeyError(
                    f"{self.lora_name}.{key}: unexpected key for this {self.algo} module "
                    f"(expected {sorted(own)} + alpha)"
                )
        for name, p in own.items():
            if name not in tensors:
                raise KeyError(f"{self.lora_name}.{name}: missing from the weights")
            t = self.normalize_file_tensor(name, tensors[name])
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(
                    f"{self.lora_name}.{name}: shape {tuple(t.shape)} in the weights does not match "
                    f"the network's {tuple(p.shape)}"
                )
            with torch.no_grad():
                p.copy_(t.to(device=p.device, dtype=p.dtype))
        if self.scalar is not None:  # files carry σ baked into the factors
            with torch.no_grad():
                self.scalar.fill_(1.0)
        if "alpha" in tensors:
            a = file_alpha(self.lora_name, tensors, self.rank)
            if not self.alpha_is_ignored():
                self._set_alpha(a, self.rank, a / self.rank)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # type: ignore[no-untyped-def]
        # accept the alternative file layouts in nn.Module.load_state_dict too (gen_img's path)
        for name in list(self._parameters):
            key = prefix + name
            if key in state_dict:
                state_dict[key] = self.normalize_file_tensor(name, state_dict[key])
        if prefix + "alpha" in state_dict:  # alpha is recorded as a Python float for the scale
            a = float(state_dict[prefix + "alpha"].float())
            if a != 0.0 and not self.alpha_is_ignored():
                self.alpha_value = a
                self.scale = a / self.rank
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
