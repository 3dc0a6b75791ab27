"""SDXL tokenization/encoding: real CLIP ids, chunking to 150/225 tokens, penultimate states, pooling."""

from __future__ import annotations

import pytest
import torch

from library.sdxl.loading import SdxlModels
from library.sdxl.text import encode_prompts, encode_sdxl_text, tokenize_sdxl

ASTRONAUT = [49406, 320, 1125, 539, 550, 18376, 49407]


def test_tokenize_real_ids_and_padding(tiny: SdxlModels) -> None:
    ids1, ids2 = tokenize_sdxl(tiny, ["a photo of an astronaut"])
    assert ids1.shape == ids2.shape == (1, 1, 77)
    assert ids1[0, 0, :7].tolist() == ASTRONAUT and ids2[0, 0, :7].tolist() == ASTRONAUT
    assert set(ids1[0, 0, 7:].tolist()) == {49407}  # TE1 pads with EOS
    assert set(ids2[0, 0, 7:].tolist()) == {0}  # TE2 pads with "!" (id 0)


def test_chunking_225_tokens(tiny: SdxlModels) -> None:
    words = " ".join(f"w{i}" for i in range(40))  # "w12" -> 2 tokens each: ~120 tokens of text
    full = tiny.tokenizer_1(words).input_ids[1:-1]
    assert 75 < len(full) < 150
    ids1, ids2 = tokenize_sdxl(tiny, [words, "a photo of an astronaut"], max_token_length=225)
    assert ids1.shape == ids2.shape == (2, 3, 77)
    for ids, pad in ((ids1, 49407), (ids2, 0)):
        w = ids[0]
        assert (w[:, 0] == 49406).all()
        assert w[0, 1:76].tolist() == full[:75]
        assert w[1, 1 : 1 + len(full) - 75].tolist() == full[75:]
        assert w[0, 76].item() == 49407  # text runs on past window 0 -> EOS
        assert w[1, 1 + len(full) - 75].item() == 49407  # the caption's own EOS
        assert w[1, 76].item() == pad
        assert w[2, 1].item() == 49407  # empty window still has an EOS for pooling
        assert w[2, 76].item() == pad
    # short caption: first window like the 77-token case, others empty
    assert ids2[1, 0, :7].tolist() == ASTRONAUT
    with pytest.raises(ValueError, match="max_token_length must be one of 75, 150, 225"):
        tokenize_sdxl(tiny, ["x"], max_token_length=100)


def test_encode_matches_penultimate_states_and_pooled(tiny: SdxlModels) -> None:
    ids1, ids2 = tokenize_sdxl(tiny, ["a photo of an astronaut", "a red cube"])
    with torch.no_grad():
        ctx, pooled = encode_sdxl_text(tiny, ids1, ids2)
        h1 = tiny.text_encoder_1(ids1[:, 0], output_hidden_states=True).hidden_states
        o2 = tiny.text_encoder_2(ids2[:, 0], output_hidden_states=True)
    assert len(h1) == tiny.text_encoder_1.config.num_hidden_layers + 1
    assert ctx.shape == (2, 77, 64) and pooled.shape == (2, 32)
    torch.testing.assert_close(ctx[..., :32], h1[-2])
    torch.testing.assert_close(ctx[..., 32:], o2.hidden_states[-2])
    assert not torch.allclose(ctx[..., :32], h1[-1], atol=1e-3)  # not the last layer
    # pooled: final-LN state at the first EOS (index 6 for the astronaut) through the projection
    manual = tiny.text_encoder_2.text_projection(o2.last_hidden_state[0, 6])
    torch.testing.assert_close(pooled[0], manual)
    torch.testing.assert_close(pooled, o2.text_embeds)


def test_encode_long_prompt_joins_windows(tiny: SdxlModels) -> None:
    words = " ".join(f"w{i}" for i in range(40))
    ids1, ids2 = tokenize_sdxl(tiny, [words], max_token_length=150)
    ctx, pooled = encode_prompts(tiny, [words], max_token_length=150)
    assert ctx.shape == (1, 152, 64)
    with torch.no_grad():
        w0 = tiny.text_encoder_1(ids1[:, 0], output_hidden_states=True).hidden_states[-2]
        w1 = tiny.text_encoder_1(ids1[:, 1], output_hidden_states=True).hidden_states[-2]
        p0 = tiny.text_encoder_2(ids2[:, 0]).text_embeds
    torch.testing.assert_close(ctx[0, :76, :32], w0[0, :76])
    torch.testing.assert_close(ctx[0, 76:151, :32], w1[0, 1:76])
    torch.testing.assert_close(ctx[0, 151, :32], w1[0, 76])
    torch.testing.assert_close(pooled, p0)  # pooled from the first window


def test_text_encoder_gradients_flow(tiny: SdxlModels) -> None:
    ids1, ids2 = tokenize_sdxl(tiny, ["a cat"])
    w = tiny.text_encoder_1.encoder.layers[0].mlp.fc1.weight
    w.requires_grad_(True)
    try:
        ctx, _ = encode_sdxl_text(tiny, ids1, ids2)
        ctx.sum().backward()
        assert w.grad is not None and w.grad.abs().sum() > 0
    finally:
        w.requires_grad_(False)
        w.grad = None


def test_parse_prompt_weights() -> None:
    from library.sdxl.text import parse_prompt_weights

    got = parse_prompt_weights("a (cat) [dog] (bird:1.5) \\(lit\\)")
    assert [t for t, _ in got] == ["a ", "cat", " ", "dog", " ", "bird", " (lit)"]
    assert [round(w, 6) for _, w in got] == [1.0, 1.1, 1.0, round(1 / 1.1, 6), 1.0, 1.5, 1.0]
    assert parse_prompt_weights("((x))") == [("x", pytest.approx(1.21))]
    assert parse_prompt_weights("(a [b]:2) c") == [("a ", 2.0), ("b", pytest.approx(2 / 1.1)), (" c", 1.0)]
    assert parse_prompt_weights("a:b (open") == [("a:b ", 1.0), ("open", pytest.approx(1.1))]


def test_weighted_tokens_and_encoding(tiny: SdxlModels) -> None:
    from library.sdxl.text import tokenize_sdxl_weighted

    plain1, plain2 = tokenize_sdxl(tiny, ["a photo of an astronaut"])
    w1, w2, w = tokenize_sdxl_weighted(tiny, ["a photo of an astronaut"])
    assert torch.equal(w1, plain1) and torch.equal(w2, plain2) and (w == 1).all()
    ids1, ids2, w = tokenize_sdxl_weighted(tiny, ["a photo of (an astronaut:1.5)"])
    assert torch.equal(ids1, plain1) and torch.equal(ids2, plain2)
    assert w[0, 0, :7].tolist() == [1.0, 1.0, 1.0, 1.0, 1.5, 1.5, 1.0]
    with torch.no_grad():
        base, pooled = encode_sdxl_text(tiny, ids1, ids2)
        none, pooled_w = encode_sdxl_text(tiny, ids1, ids2, weights=w, emb_normalize_mode="none")
        orig, _ = encode_sdxl_text(tiny, ids1, ids2, weights=w, emb_normalize_mode="original")
    torch.testing.assert_close(none, base * w[0, 0][None, :, None])
    torch.testing.assert_close(pooled_w, pooled)  # pooled is not weighted
    for sl in (slice(0, 32), slice(32, 64)):  # each encoder's mean is preserved
        assert orig[0, :, sl].mean().item() == pytest.approx(base[0, :, sl].mean().item(), rel=1e-4)
    assert not torch.allclose(orig, base)
    # 150-token windows carry the weights too
    i1, i2, w150 = tokenize_sdxl_weighted(tiny, ["(x:2) " + "y " * 80], max_token_length=150)
    assert w150.shape == (1, 2, 77) and w150[0, 0, 1].item() == 2.0 and w150[0, 1, 1].item() == 1.0
    with torch.no_grad():
        plain, _ = encode_sdxl_text(tiny, i1, i2)
        weighted, _ = encode_sdxl_text(tiny, i1, i2, weights=w150, emb_normalize_mode="none")
    assert weighted.shape == (1, 152, 64)
    torch.testing.assert_close(weighted[0, 1], plain[0, 1] * 2)
    torch.testing.assert_close(weighted[0, 2:], plain[0, 2:])


def test_encode_through_wrapped_encoders(tiny: SdxlModels) -> None:
    """Encoders wrapped like accelerate/DDP wraps trained modules (`.module`) give the same result."""

    class Wrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.module = inner

        def forward(self, *a, **k):  # noqa: ANN002, ANN003
            return self.module(*a, **k)

    ids1, ids2 = tokenize_sdxl(tiny, ["a cat"])
    with torch.no_grad():
        ref = encode_sdxl_text(tiny, ids1, ids2)
        wrapped = encode_sdxl_text((Wrapper(tiny.text_encoder_1), Wrapper(tiny.text_encoder_2)), ids1, ids2)
    torch.testing.assert_close(wrapped[0], ref[0])
    torch.testing.assert_close(wrapped[1], ref[1])
