"""Pure ΔW maths and custom autograd for LoRA, LoHa and LoKr (no nn.Module state here)."""

from .common import (
    apply_weight,
    autocast_like_forward,
    conv_padded_input,
    save_autocast_state,
    scaled_grad,
)
from .loha import (
    HadaWeight,
    HadaWeightTucker,
    KhatriRaoLinear,
    khatri_rao_factors,
    loha_delta_weight,
    loha_khatri_rao_conv,
    loha_khatri_rao_linear,
    tucker_half,
)
from .lokr import (
    KronBypassLinear,
    factorization,
    lokr_bypass_linear,
    lokr_delta_weight,
    make_w1,
    make_w2,
)
from .lora import lora_delta_weight

__all__ = [
    "KronBypassLinear",
    "HadaWeight",
    "HadaWeightTucker",
    "KhatriRaoLinear",
    "apply_weight",
    "autocast_like_forward",
    "conv_padded_input",
    "factorization",
    "khatri_rao_factors",
    "loha_delta_weight",
    "loha_khatri_rao_conv",
    "loha_khatri_rao_linear",
    "lokr_bypass_linear",
    "lokr_delta_weight",
    "lora_delta_weight",
    "make_w1",
    "make_w2",
    "save_autocast_state",
    "scaled_grad",
    "tucker_half",
]
