"""Caption -> Anima DiT context: Qwen3 states (masked rows zeroed) + T5 ids -> LLM adapter (T5-masked rows zeroed).

Split in three steps so the trainer can cache the text-encoder outputs (the adapter is part of the DiT and
is never cached): `tokenize_anima_captions` -> `encode_qwen3` -> `Anima.run_llm_adapter`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase, Qwen3Model

from library.anima.loading import AnimaModels


@dataclass
class AnimaTokens:
    qwen_ids: torch.Tensor  # (B, Lq) int64, right-padded with <|endoftext|>
    qwen_mask: torch.Tensor  # (B, Lq) int64
    t5_ids: torch.Tensor  # (B, Lt) int64, `</s>` appended, pad 0
    t5_mask: torch.Tensor  # (B, Lt) int64


def tokenize_anima_captions(
    qwen_tokenizer: PreTrainedTokenizerBase,
    t5_tokenizer: PreTrainedTokenizerBase,
    captions: list[str],
    qwen_max_length: int = 512,
    t5_max_length: int = 512,
) -> AnimaTokens:
    """Raw captions (no chat template); both sides right-padded to a fixed length with truncation."""
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise TypeError(f"captions must be a list of str; got {type(captions).__name__}")
    # Qwen adds no BOS/EOS; T5 appends </s> itself.
    q = qwen_tokenizer(
        list(captions),
        padding="max_length",
        max_length=qwen_max_length,
        truncation=True,
        add_special_tokens=False,
        return_tensors="pt",
    )
    t = t5_tokenizer(
        list(captions), padding="max_length", max_length=t5_max_length, truncation=True, return_tensors="pt"
    )
    return AnimaTokens(q["input_ids"], q["attention_mask"], t["input_ids"], t["attention_mask"])


def encode_qwen3(
    text_encoder: Qwen3Model, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Qwen3 `last_hidden_state` (after the final norm) with rows where the mask is 0 set to 0."""
    dev = next(text_encoder.parameters()).device
    ids, mask = input_ids.to(dev), attention_mask.to(dev)
    with torch.no_grad():
        out = text_encoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return torch.where(mask.bool()[..., None], out, out.new_zeros(()))  # where(): NaN-safe for empty prompts


def encode_anima_prompts(
    models: AnimaModels, captions: list[str], max_length: int = 512, t5_max_length: int | None = None
) -> torch.Tensor:
    """Captions -> DiT cross-attention context (B, L_t5, D) in the DiT's dtype, on the DiT's device."""
    toks = tokenize_anima_captions(
        models.qwen_tokenizer,
        models.t5_tokenizer,
        captions,
        max_length,
        max_length if t5_max_length is None else t5_max_length,
    )
    states = encode_qwen3(models.text_encoder, toks.qwen_ids, toks.qwen_mask)
    dit = models.dit
    with torch.no_grad():
        return dit.run_llm_adapter(
            states.to(dit.device, dit.dtype),
            toks.t5_ids.to(dit.device),
            toks.t5_mask.to(dit.device),
            toks.qwen_mask.to(dit.device),
        )
