"""SDXL prompt tokenization and text encoding, the same for training, caching and generation.

Context = concat(TE1 penultimate hidden state, TE2 penultimate hidden state) on features, with no
final LayerNorm; pooled = TE2 final-LN hidden state at the first EOS, through text_projection.
Long prompts (max_token_length 150/225) are cut into 2/3 chunks of BOS + 75 tokens + EOS/PAD,
encoded separately and re-joined as BOS + each chunk's 75 middle tokens + the last chunk's end.
"""

from __future__ import annotations

import re
from typing import Any

import torch

CHUNK = 75  # tokens between BOS and EOS in one CLIP window of 77
BOS_ID = 49406
EOS_ID = 49407
VALID_MAX_TOKEN_LENGTHS = (None, 75, 150, 225)


def num_chunks(max_token_length: int | None) -> int:
    if max_token_length not in VALID_MAX_TOKEN_LENGTHS:
        raise ValueError(f"max_token_length must be one of 75, 150, 225 (or unset), got {max_token_length!r}")
    return 1 if max_token_length is None else max_token_length // CHUNK


def _chunk_ids(ids: torch.Tensor, n: int, pad_id: int) -> torch.Tensor:
    """(B, 75n+2) ids -> (B, n, 77) windows, each BOS + 75 tokens + EOS/PAD."""
    b = ids.shape[0]
    if n == 1:
        return ids[:, None, :]
    windows = []
    bos = torch.full((b, 1), BOS_ID, dtype=ids.dtype)
    for i in range(n):
        mid = ids[:, 1 + CHUNK * i : 1 + CHUNK * (i + 1)].clone()
        if pad_id == EOS_ID:
            last = torch.full((b, 1), EOS_ID, dtype=ids.dtype)
        else:
            # text running past this window ends it with EOS; a finished text ends with PAD
            runs_on = (mid[:, -1] != EOS_ID) & (mid[:, -1] != pad_id)
            last = torch.where(runs_on, EOS_ID, pad_id)[:, None].to(ids.dtype)
            # an all-padding window gets an EOS up front so pooling still finds one
            empty = mid[:, 0] == pad_id
            mid[:, 0] = torch.where(empty, EOS_ID, mid[:, 0])
        windows.append(torch.cat([bos, mid, last], dim=1))
    return torch.stack(windows, dim=1)


def tokenize_one(tokenizer: Any, captions: list[str], max_token_length: int | None = None) -> torch.Tensor:
    """Token ids (B, n_chunks, 77) for one tokenizer."""
    n = num_chunks(max_token_length)
    length = CHUNK * n + 2
    ids = tokenizer(
        list(captions), padding="max_length", truncation=True, max_length=length, return_tensors="pt"
    ).input_ids
    return _chunk_ids(ids, n, tokenizer.pad_token_id)


def tokenize_sdxl(
    tokenizers: Any, captions: list[str] | str, max_token_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids1, ids2), each (B, n_chunks, 77), n_chunks = 1/2/3 for max_token_length None|75/150/225.
    `tokenizers` is an SdxlModels or a pair (tokenizer_1, tokenizer_2)."""
    if isinstance(captions, str):
        captions = [captions]
    t1, t2 = (
        (tokenizers.tokenizer_1, tokenizers.tokenizer_2) if hasattr(tokenizers, "tokenizer_1") else tokenizers
    )
    return tokenize_one(t1, captions, max_token_length), tokenize_one(t2, captions, max_token_length)


def _join_chunks(h: torch.Tensor) -> torch.Tensor:
    """(B, n, 77, C) -> (B, 75n+2, C): BOS of the first window, 75 middles of each, last token of the last."""
    if h.shape[1] == 1:
        return h[:, 0]
    parts = [h[:, 0, :1]] + [h[:, i, 1:-1] for i in range(h.shape[1])] + [h[:, -1, -1:]]
    return torch.cat(parts, dim=1)


def _as_3d(ids: torch.Tensor) -> torch.Tensor:
    if ids.ndim == 2:
        return ids[:, None, :]
    if ids.ndim != 3:
        raise ValueError(f"token ids must be (B, 77) or (B, n_chunks, 77), got shape {tuple(ids.shape)}")
    return ids


EMB_NORMALIZE_MODES = ("original", "abs", "none")


def _apply_weights(h: torch.Tensor, weights: torch.Tensor, mode: str) -> torch.Tensor:
    """Scale hidden states (B, L, C) per token; "original"/"abs" keep each prompt's (abs) mean."""
    if mode not in EMB_NORMALIZE_MODES:
        raise ValueError(f"emb_normalize_mode must be one of {', '.join(EMB_NORMALIZE_MODES)}, got {mode!r}")
    w = weights.to(h.device, h.dtype)[..., None]
    if mode == "none":
        return h * w
    measure = (
        (lambda t: t.float().abs().mean(dim=(-2, -1)))
        if mode == "abs"
        else (lambda t: t.float().mean(dim=(-2, -1)))
    )
    before = measure(h)
    out = h * w
    return out * (before / measure(out)).to(h.dtype)[:, None, None]


def encode_sdxl_text(
    models_or_encoders: Any,
    ids1: torch.Tensor,
    ids2: torch.Tensor,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    weights: torch.Tensor | None = None,
    emb_normalize_mode: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(context (B, L, C1+C2), pooled (B, P)), L = 77 or 75n+2. Gradients flow if the encoders
    need them (TE LoRA training); wrap in torch.no_grad() otherwise. `weights` (same shape as the
    ids, from tokenize_sdxl_weighted) scale both hidden states per token (pooled is unweighted)."""
    if hasattr(models_or_encoders, "text_encoder_1"):
        te1, te2 = models_or_encoders.text_encoder_1, models_or_encoders.text_encoder_2
    else:
        te1, te2 = models_or_encoders
    ids1, ids2 = _as_3d(ids1), _as_3d(ids2)
    if ids1.shape != ids2.shape:
        raise ValueError(f"ids1 {tuple(ids1.shape)} and ids2 {tuple(ids2.shape)} must have the same shape")
    b, n, w = ids1.shape
    dev = device if device is not None else next(te1.parameters()).device
    flat1 = ids1.reshape(b * n, w).to(dev)
    flat2 = ids2.reshape(b * n, w).to(dev)
    out1 = te1(flat1, output_hidden_states=True)
    h1 = out1.hidden_states[-2]  # penultimate layer (hidden_states[11] of 12), no final LN
    out2 = te2(flat2, output_hidden_states=True)
    h2 = out2.hidden_states[-2]
    # pooled: final-LN state at the first EOS of the first window, through the projection
    last = out2.last_hidden_state.reshape(b, n, w, -1)[:, 0]
    eos_pos = (ids2[:, 0].to(dev) == EOS_ID).int().argmax(dim=-1)
    # forward through the (possibly DDP-wrapped) module, but reach the projection on the inner one
    projection = getattr(te2, "module", te2).text_projection
    pooled = projection(last[torch.arange(b, device=last.device), eos_pos])
    h1 = _join_chunks(h1.reshape(b, n, w, -1))
    h2 = _join_chunks(h2.reshape(b, n, w, -1))
    if weights is not None:  # on the joined sequence, so "original" keeps the whole prompt's mean
        joined_w = _join_chunks(_as_3d(weights).reshape(b, n, w, 1))[..., 0]
        h1 = _apply_weights(h1, joined_w, emb_normalize_mode)
        h2 = _apply_weights(h2, joined_w, emb_normalize_mode)
    context = torch.cat([h1, h2.to(h1.dtype)], dim=-1)
    if dtype is not None:
        context, pooled = context.to(dtype), pooled.to(dtype)
    return context, pooled


def encode_prompts(
    models: Any,
    prompts: list[str],
    max_token_length: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    emb_normalize_mode: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize + encode in one call (no gradients): (context, pooled). With emb_normalize_mode
    ("original" | "abs" | "none") "(text:1.2)" weights are parsed and applied; None = plain text."""
    with torch.no_grad():
        if emb_normalize_mode is None:
            ids1, ids2 = tokenize_sdxl(models, prompts, max_token_length)
            return encode_sdxl_text(models, ids1, ids2, device=device, dtype=dtype)
        ids1, ids2, w = tokenize_sdxl_weighted(models, prompts, max_token_length)
        return encode_sdxl_text(
            models, ids1, ids2, device, dtype, weights=w, emb_normalize_mode=emb_normalize_mode
        )


# ------------------------------------------------------------------ prompt weights "(a:1.2) [b]"

_WEIGHT_CLOSE = re.compile(r":\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)")
ATTN_UP = 1.1


def parse_prompt_weights(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs: "(x)" ×1.1, "[x]" ÷1.1, "(x:1.3)" ×1.3, nesting
    multiplies, "\\(" is a literal bracket, an unclosed bracket applies to the rest."""
    runs: list[list[Any]] = []
    stack: list[tuple[str, int]] = []
    buf: list[str] = []

    def flush() -> None:
        if buf:
            runs.append(["".join(buf), 1.0])
            buf.clear()

    def close(start: int, factor: float) -> None:
        flush()
        for r in runs[start:]:
            r[1] *= factor

    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            buf.append(text[i + 1])
            i += 2
            continue
        if ch in "([":
            flush()
            stack.append((ch, len(runs)))
        elif ch == ":" and stack and stack[-1][0] == "(" and (m := _WEIGHT_CLOSE.match(text, i)):
            close(stack.pop()[1], float(m[1]))
            i = m.end()
            continue
        elif ch == ")" and stack and stack[-1][0] == "(":
            close(stack.pop()[1], ATTN_UP)
        elif ch == "]" and stack and stack[-1][0] == "[":
            close(stack.pop()[1], 1 / ATTN_UP)
        else:
            buf.append(ch)
        i += 1
    flush()
    for kind, start in reversed(stack):
        close(start, ATTN_UP if kind == "(" else 1 / ATTN_UP)
    merged: list[tuple[str, float]] = []
    for t, w in runs:
        if merged and merged[-1][1] == w:
            merged[-1] = (merged[-1][0] + t, w)
        elif t:
            merged.append((t, w))
    return merged or [("", 1.0)]


def _weighted_ids(tokenizer: Any, caption: str, n: int) -> tuple[list[int], list[float]]:
    ids: list[int] = []
    ws: list[float] = []
    for text, weight in parse_prompt_weights(caption):
        toks = tokenizer(text, add_special_tokens=False).input_ids
        ids += toks
        ws += [weight] * len(toks)
    ids, ws = ids[: CHUNK * n], ws[: CHUNK * n]
    pad = CHUNK * n - len(ids)
    # pad is EOS for TE1 (so the caption's EOS is just the first pad) and "!" for TE2
    return [BOS_ID] + ids + [EOS_ID] + [tokenizer.pad_token_id] * pad, [1.0] + ws + [1.0] * (pad + 1)


def tokenize_sdxl_weighted(
    tokenizers: Any, captions: list[str] | str, max_token_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids1, ids2, weights), each (B, n_chunks, 77), with "(text:1.2)"-style weights parsed out;
    a caption without brackets gives the same ids as tokenize_sdxl and weights of 1."""
    if isinstance(captions, str):
        captions = [captions]
    t1, t2 = (
        (tokenizers.tokenizer_1, tokenizers.tokenizer_2) if hasattr(tokenizers, "tokenizer_1") else tokenizers
    )
    n = num_chunks(max_token_length)
    out = []
    for tok in (t1, t2):
        rows = [_weighted_ids(tok, c, n) for c in captions]
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
        ws = torch.tensor([r[1] for r in rows], dtype=torch.float32)
        out.append((_chunk_ids(ids, n, tok.pad_token_id), _chunk_weights(ws, n)))
    return out[0][0], out[1][0], out[0][1]


def _chunk_weights(ws: torch.Tensor, n: int) -> torch.Tensor:
    if n == 1:
        return ws[:, None, :]
    one = torch.ones((ws.shape[0], 1))
    return torch.stack(
        [torch.cat([one, ws[:, 1 + CHUNK * i : 1 + CHUNK * (i + 1)], one], 1) for i in range(n)], 1
    )
