"""Paint-with-words (eDiff-I §4.3, docs/architecture.md §1):

    softmax((Q K^T + w A) / sqrt(d)) V,   w = w' log(1 + sigma) max(Q K^T)

checked on `SpatialAttention` directly (attention probabilities recomputed
from the module's own weights, and that recomputation pinned to the module's
output), on the phrase -> token mapping of both tokenizers, on the input
validation (errors name the offending field) and through the pipeline.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ediffi.paint import (
    DEFAULT_STRENGTH,
    PaintWithWordsError,
    Region,
    build_pww_inputs,
    parse_color,
    parse_region_arg,
    phrase_span,
    tokens_in_span,
)
from ediffi.pipeline import GenerationRequest, encode_request, generate
from ediffi.unet import SpatialAttention

CHANNELS, CONTEXT_DIM, HEADS, GROUPS = 16, 8, 2, 4
L = 6  # context tokens
PAINTED = [2, 3]  # token columns of the painted phrase
H = W = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py: the cores are shared


# --------------------------------------------------------------------------
# SpatialAttention: the attention equation itself
# --------------------------------------------------------------------------


def _attention() -> SpatialAttention:
    torch.manual_seed(0)
    return SpatialAttention(CHANNELS, CONTEXT_DIM, HEADS, GROUPS).eval()


def _inputs(batch: int = 1, seed: int = 1, mask_size: int = H):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, CHANNELS, H, W, generator=g)
    context = torch.randn(batch, L, CONTEXT_DIM, generator=g)
    context_mask = torch.ones(batch, L, dtype=torch.bool)
    context_mask[:, -1] = False  # a padding token
    pww_mask = torch.zeros(batch, L, mask_size, mask_size)
    pww_mask[:, PAINTED, :, : mask_size // 2] = 1.0  # left half of the canvas
    sigma = torch.full((batch,), 5.0)
    return x, context, context_mask, sigma, pww_mask


def cross_attention(attn: SpatialAttention, x, context, context_mask, sigma, pww_mask, strength, batch_max=False):
    """Recompute the module's forward pass from its weights, with the paper's
    equation written out independently. Returns (output, cross-attention
    probabilities [B, heads, hw, 1 + L], Q K^T). `batch_max` takes max(Q K^T)
    over the whole batch instead (the pitfall), to show the tests can fail."""
    b, c, h, w = x.shape
    tokens = attn.norm_self(x).flatten(2).transpose(1, 2)
    q, k, v = (attn._heads(t) for t in attn.qkv(tokens).chunk(3, dim=2))
    x = x + attn.proj_self(attn._merge(F.scaled_dot_product_attention(q, k, v))).transpose(1, 2).view(b, c, h, w)

    tokens = attn.norm_cross(x).flatten(2).transpose(1, 2)
    q = attn._heads(attn.q(tokens))
    k_ctx, v_ctx = attn.kv(context).chunk(2, dim=2)
    k = attn._heads(torch.cat([attn.null_kv[0].expand(b, 1, c), k_ctx], dim=1))
    v = attn._heads(torch.cat([attn.null_kv[1].expand(b, 1, c), v_ctx], dim=1))
    qk = q @ k.transpose(-1, -2)  # [B, heads, hw, 1 + L]

    mask = F.interpolate(pww_mask, size=(h, w), mode="area") if pww_mask.shape[-2:] != (h, w) else pww_mask
    a = torch.zeros(b, h * w, 1 + context.shape[1])
    a[:, :, 1:] = mask.flatten(2).transpose(1, 2)  # the null key is never painted
    peak = qk.amax() * torch.ones(b) if batch_max else qk.flatten(1).amax(dim=1)
    weight = strength * torch.log1p(sigma) * peak
    logits = (qk + weight[:, None, None, None] * a[:, None]) / math.sqrt(attn.head_dim)
    keep = torch.cat([torch.ones(b, 1, dtype=torch.bool), context_mask.bool()], dim=1)
    logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
    probs = logits.softmax(dim=-1)
    out = x + attn.proj_cross(attn._merge(probs @ v)).transpose(1, 2).view(b, c, h, w)
    return out, probs, qk


@torch.no_grad()
@pytest.mark.parametrize("mask_size", [H, 2 * H], ids=["same-resolution", "resized-mask"])
def test_recomputed_attention_matches_the_module(mask_size):
    attn = _attention()
    x, context, context_mask, sigma, pww_mask = _inputs(batch=2, mask_size=mask_size)
    pww_mask[1] = torch.rand(L, mask_size, mask_size, generator=torch.Generator().manual_seed(5))  # soft, irregular
    strength = torch.tensor([0.4, 1.5])
    expected, _, _ = cross_attention(attn, x, context, context_mask, sigma, pww_mask, strength)
    got = attn(x, context, context_mask, sigma, pww_mask, strength)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("mask_size", [H, 2 * H], ids=["same-resolution", "resized-mask"])
def test_painted_tokens_gain_attention_inside_the_mask_only(mask_size):
    attn = _attention()
    x, context, context_mask, sigma, pww_mask = _inputs(mask_size=mask_size)
    _, plain, qk = cross_attention(attn, x, context, context_mask, sigma, pww_mask, torch.zeros(1))
    _, painted, _ = cross_attention(attn, x, context, context_mask, sigma, pww_mask, torch.tensor([DEFAULT_STRENGTH]))
    assert qk.max() > 0, "precondition: a positive max(QK^T), so w > 0"

    columns = [1 + t for t in PAINTED]  # key 0 is the null key
    inside = torch.zeros(H, W, dtype=torch.bool)
    inside[:, : W // 2] = True
    inside = inside.flatten()
    mass_plain = plain[..., columns].sum(-1)  # [1, heads, hw]
    mass_painted = painted[..., columns].sum(-1)
    # Every inside query, in every head, moves mass onto the painted tokens...
    assert torch.all(mass_painted[..., inside] > mass_plain[..., inside] + 1e-4)
    # ...and the outside queries' attention is untouched.
    torch.testing.assert_close(painted[..., ~inside, :], plain[..., ~inside, :], rtol=0, atol=0)
    # The padding token gets nothing, painted or not.
    assert painted[..., -1].max() == 0

    # The module itself: output pixels outside the mask are exactly unchanged,
    # pixels inside it change.
    out_plain = attn(x, context, context_mask, sigma, pww_mask, torch.zeros(1))
    out_painted = attn(x, context, context_mask, sigma, pww_mask, torch.tensor([DEFAULT_STRENGTH]))
    left, right = out_painted[..., : W // 2], out_painted[..., W // 2 :]
    assert torch.equal(right, out_plain[..., W // 2 :])
    assert (left - out_plain[..., : W // 2]).abs().max() > 1e-3


@torch.no_grad()
def test_strength_scales_with_log1p_sigma():
    """w = w' log(1 + sigma) max(QK^T): at sigma -> 0 painting fades away."""
    attn = _attention()
    x, context, context_mask, _, pww_mask = _inputs()
    strength = torch.tensor([1.0])
    plain = attn(x, context, context_mask, torch.tensor([5.0]), pww_mask, torch.zeros(1))
    high = attn(x, context, context_mask, torch.tensor([5.0]), pww_mask, strength)
    low = attn(x, context, context_mask, torch.tensor([0.0]), pww_mask, strength)
    assert torch.equal(low, plain)
    assert not torch.equal(high, plain)


@torch.no_grad()
def test_unconditional_rows_are_unpainted():
    """Strength 0 or an all-zero mask (what unconditional rows get) equals no
    paint at all, also next to a painted row in the same batch."""
    attn = _attention()
    x, context, context_mask, sigma, pww_mask = _inputs(batch=2)
    zero_mask = torch.zeros_like(pww_mask)
    none = attn(x, context, context_mask, sigma, zero_mask, torch.zeros(2))
    zero_strength = attn(x, context, context_mask, sigma, pww_mask, torch.zeros(2))
    zero_area = attn(x, context, context_mask, sigma, zero_mask, torch.full((2,), 0.8))
    assert torch.equal(zero_strength, none)
    assert torch.equal(zero_area, none)
    # Row 0 painted, row 1 unconditional (strength 0): row 1 unaffected.
    mixed = attn(x, context, context_mask, sigma, pww_mask, torch.tensor([0.8, 0.0]))
    torch.testing.assert_close(mixed[1], none[1], rtol=0, atol=1e-6)
    assert (mixed[0] - none[0]).abs().max() > 1e-3


@torch.no_grad()
def test_max_is_per_sample_not_per_batch():
    attn = _attention()
    x, context, context_mask, sigma, pww_mask = _inputs(batch=4)
    g = torch.Generator().manual_seed(7)
    # Other rows: different inputs, much larger activations, different masks,
    # strengths and noise levels.
    x[1:] = torch.randn(3, CHANNELS, H, W, generator=g) * 20
    context[1:] = torch.randn(3, L, CONTEXT_DIM, generator=g) * 10
    pww_mask[1:] = torch.rand(3, L, H, W, generator=g)
    sigma[1:] = torch.tensor([80.0, 0.5, 12.0])
    strength = torch.tensor([0.4, 2.0, 0.1, 1.0])

    alone = attn(x[:1], context[:1], context_mask[:1], sigma[:1], pww_mask[:1], strength[:1])
    batched = attn(x, context, context_mask, sigma, pww_mask, strength)
    torch.testing.assert_close(batched[:1], alone, rtol=0, atol=1e-5)

    # The test can fail: a batch-wide max would move row 0 well beyond 1e-5.
    batch_max, _, _ = cross_attention(attn, x, context, context_mask, sigma, pww_mask, strength, batch_max=True)
    assert (batch_max[0] - alone[0]).abs().max() > 1e-3


@torch.no_grad()
def test_denoiser_row_is_batch_invariant_with_paint(tiny_model, color_map):
    """Through the whole expert network (per-row sigma, pww at every attention
    layer): a painted row alone equals that row inside a mixed batch."""
    request = GenerationRequest(
        "a red circle and a blue square", guidance_scale=3.0, color_map=color_map,
        regions=[Region("#ff0000", "red circle", 1.0), Region("#0000ff", "blue square", 0.5)],
    )
    cond = encode_request(tiny_model, request)  # rows: painted cond, uncond
    other = encode_request(tiny_model, GenerationRequest("two green triangles", color_map=color_map,
                                                         regions=[Region("#0000ff", "green triangles", 3.0)]))
    expert = tiny_model.stages["base"].experts["base0"]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 16, 16, generator=g)
    x[1:] *= 10
    batch = dict(
        x=x,
        sigma=torch.tensor([5.0, 40.0, 5.0, 2.0]),
        context=torch.cat([cond.context[:1], other.context[:1] * 5, cond.context[1:], other.context[1:]]),
        context_mask=torch.cat([cond.context_mask[:1], other.context_mask[:1], cond.context_mask[1:], other.context_mask[1:]]),
        pooled=torch.cat([cond.pooled[:1], other.pooled[:1], cond.pooled[1:], other.pooled[1:]]),
        pww_mask=torch.cat([cond.pww_masks["base"][:1], other.pww_masks["base"][:1], cond.pww_masks["base"][1:],
                            other.pww_masks["base"][1:]]),
        pww_strength=torch.tensor([1.0, 3.0, 0.0, 0.0]),
    )
    out = expert(**batch)
    alone = expert(**{k: v[:1] for k, v in batch.items()})
    torch.testing.assert_close(out[:1], alone, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------
# Phrases -> tokens, in both tokenizers, by offsets
# --------------------------------------------------------------------------


def _offsets(tokenizer, prompt, length=None):
    kwargs = dict(padding="max_length", truncation=True, max_length=length) if length else {}
    return [tuple(p) for p in tokenizer(prompt, return_offsets_mapping=True, **kwargs)["offset_mapping"]]


def _words(tokenizer, prompt, indices):
    ids = tokenizer(prompt)["input_ids"]
    return [tokenizer.convert_ids_to_tokens(ids[i]) for i in indices]


def test_phrase_span_first_whole_word_case_insensitive():
    prompt = "A Red circle and a red circle"
    assert phrase_span(prompt, "red circle", "f") == (2, 12)  # first of two, case differs
    assert phrase_span(prompt, "RED CIRCLE", "f") == (2, 12)
    assert phrase_span(prompt, "  red  ", "f") == (2, 5)  # surrounding spaces ignored
    assert phrase_span("a reddish red tree", "red", "f") == (10, 13)  # whole words only
    assert phrase_span("a bored red tree", "red", "f") == (8, 11)
    assert phrase_span("a", "A", "f") == (0, 1)
    with pytest.raises(PaintWithWordsError) as err:
        phrase_span("a reddish tree", "red", "paint_with_words.regions[3].phrase")
    assert err.value.field == "paint_with_words.regions[3].phrase"
    with pytest.raises(PaintWithWordsError, match="empty"):
        phrase_span("a red tree", "  ", "f")


@pytest.mark.parametrize(
    "phrase, t5_tokens, clip_tokens",
    [
        # T5 has no BOS; CLIP starts with <|startoftext|>, so indices shift by 1.
        ("red circle", [1, 2], [2, 3]),
        ("RED SQUARE", [5, 6], [6, 7]),
        ("red", [1], [2]),  # appears twice: the first occurrence only
        ("a", [0], [1]),  # span starts at 0, like the (0, 0) offsets of specials
    ],
)
def test_tokens_in_span_for_both_tokenizers(tiny_model, phrase, t5_tokens, clip_tokens):
    enc = tiny_model.encoders
    prompt = "A Red circle and a red square"
    span = phrase_span(prompt, phrase, "f")
    for tokenizer, expected in ((enc.t5_tokenizer, t5_tokens), (enc.clip_tokenizer, clip_tokens)):
        offsets = _offsets(tokenizer, prompt, length=16)  # padded as the encoder pads
        got = tokens_in_span(offsets, span)
        assert got == expected
        assert [w.lower() for w in _words(tokenizer, prompt, got)] == phrase.lower().split()


def test_special_and_padding_tokens_never_match():
    offsets = [(0, 0), (0, 1), (2, 5), (0, 0), (0, 0)]
    assert tokens_in_span(offsets, (0, 1)) == [1]
    assert tokens_in_span(offsets, (0, 5)) == [1, 2]
    assert tokens_in_span(offsets, (6, 9)) == []
    # An empty offset inside the span (as some tokenizers give added tokens).
    assert tokens_in_span([(0, 0), (2, 5), (3, 3), (6, 9)], (2, 5)) == [1]


def _map(width=32, height=32):
    """Left half red, right half blue, a green dot in the top right corner."""
    image = Image.new("RGB", (width, height), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, width // 2, height))
    image.paste((0, 0, 255), (width // 2, 0, width, height))
    image.paste((0, 255, 0), (width - 2, 0, width, 2))
    return image


@pytest.fixture
def color_map():
    return _map()


def test_build_pww_inputs_puts_masks_in_phrase_columns(tiny_model, color_map):
    enc = tiny_model.encoders
    prompt = "a red circle and a blue square"
    text = enc.encode_text([prompt])
    regions = [Region("#ff0000", "red circle", 0.8), Region("#0000ff", "Blue Square", 0.4)]
    mask, strength = build_pww_inputs(prompt, regions, color_map, text.t5_offsets[0], text.clip_offsets[0], 16, 16)
    lt5 = enc.t5_length
    assert mask.shape == (enc.context_length, 16, 16)
    assert strength == pytest.approx(0.8)  # the largest region strength
    red_cols = [1, 2, lt5 + 2, lt5 + 3]
    blue_cols = [5, 6, lt5 + 6, lt5 + 7]
    for col in red_cols:
        assert torch.all(mask[col, :, :8] == 1.0) and torch.all(mask[col, :, 8:] == 0.0)
    for col in blue_cols:  # scaled by its strength relative to the largest
        assert torch.allclose(mask[col, 2:, 8:], torch.full((14, 8), 0.5)) and torch.all(mask[col, :, :8] == 0)
    others = sorted(set(range(enc.context_length)) - set(red_cols) - set(blue_cols))
    assert torch.all(mask[others] == 0)


@pytest.mark.parametrize(
    "regions, image, field, words",
    [
        ([Region("#ff0000", "red circle"), Region("#0000ff", "green star")], _map(),
         "paint_with_words.regions[1].phrase", ["green star"]),
        ([Region("#ff0000", "red circle"), Region("#ffff00", "blue square")], _map(),
         "paint_with_words.regions[1].color", ["#ffff00"]),
        ([Region("#ff0000", "red circle")], _map(64, 32), "paint_with_words.color_map", ["64x32"]),
        ([Region("#ff00", "red circle")], _map(), "paint_with_words.regions[0].color", ["#ff00"]),
        ([Region("red", "red circle")], _map(), "paint_with_words.regions[0].color", ["red"]),
        ([Region("#ff0000", "red circle", 11.0)], _map(), "paint_with_words.regions[0].strength", []),
        ([], _map(), "paint_with_words.regions", []),
    ],
    ids=["phrase-absent", "colour-absent", "wrong-aspect", "short-hex", "named-colour", "strength", "no-regions"],
)
def test_errors_name_the_field(tiny_model, regions, image, field, words):
    enc = tiny_model.encoders
    prompt = "a red circle and a blue square"
    text = enc.encode_text([prompt])
    with pytest.raises(PaintWithWordsError) as err:
        build_pww_inputs(prompt, regions, image, text.t5_offsets[0], text.clip_offsets[0], 16, 16)
    assert err.value.field == field
    assert str(err.value).startswith(field + ":")
    for word in words:
        assert word in str(err.value)


def test_pipeline_reports_paint_errors_with_the_field(tiny_model, color_map):
    request = GenerationRequest("a red circle", color_map=color_map, regions=[Region("#ff0000", "purple house")])
    with pytest.raises(PaintWithWordsError) as err:
        encode_request(tiny_model, request)
    assert err.value.field == "paint_with_words.regions[0].phrase"
    assert "purple house" in str(err.value)


def test_parse_color():
    assert parse_color("#ff8000") == (255, 128, 0)
    assert parse_color("#FF8000") == (255, 128, 0)
    for bad in ("ff8000", "#ff80", "#gg0000", "#ff80000", "red"):
        with pytest.raises(ValueError):
            parse_color(bad)


@pytest.mark.parametrize(
    "arg, region",
    [
        ("#ff0000=red circle", Region("#ff0000", "red circle", DEFAULT_STRENGTH)),
        ("#ff0000=red circle:0.8", Region("#ff0000", "red circle", 0.8)),
        ("#FF0000= red circle :2", Region("#ff0000", "red circle", 2.0)),
        ("#00ff00=time: noon", Region("#00ff00", "time: noon", DEFAULT_STRENGTH)),
    ],
)
def test_parse_region_arg(arg, region):
    assert parse_region_arg(arg) == region


@pytest.mark.parametrize("arg", ["red circle", "#ff00=red circle", "blue=sky"])
def test_parse_region_arg_rejects_bad_forms(arg):
    with pytest.raises(ValueError):
        parse_region_arg(arg)


# --------------------------------------------------------------------------
# Through the pipeline
# --------------------------------------------------------------------------


def test_encode_request_paints_conditional_rows_only(tiny_model, color_map):
    enc = tiny_model.encoders
    request = GenerationRequest(
        "a red circle and a blue square", n=2, guidance_scale=3.0, color_map=color_map,
        regions=[Region("#ff0000", "red circle", 0.7)],
    )
    cond = encode_request(tiny_model, request)
    assert cond.guided
    assert cond.pww_strength.tolist() == pytest.approx([0.7, 0.7, 0.0, 0.0])
    lt5 = enc.t5_length
    for stage in tiny_model.config.stages:
        masks = cond.pww_masks[stage.name]
        size = stage.image_size
        assert masks.shape == (4, enc.context_length, size, size)
        assert torch.all(masks[2:] == 0), "unconditional rows must get A = 0"
        for row in masks[:2]:
            assert torch.all(row[[1, 2, lt5 + 2, lt5 + 3], :, : size // 2] == 1)
            assert row.sum() == pytest.approx(4 * size * size / 2)


def test_unused_text_encoder_gets_no_paint(tiny_model, color_map):
    lt5 = tiny_model.encoders.t5_length
    request = GenerationRequest(
        "a red circle", guidance_scale=1.0, color_map=color_map, regions=[Region("#ff0000", "red circle")],
        encoders=frozenset({"clip_text"}),
    )
    masks = encode_request(tiny_model, request).pww_masks["base"]
    assert torch.all(masks[:, :lt5] == 0) and masks[:, lt5:].sum() > 0


def test_painted_request_changes_the_image(tiny_model, color_map):
    base = dict(prompt="a red circle and a blue square", steps=3, seed=5, sampler="euler")
    plain = np.asarray(generate(tiny_model, GenerationRequest(**base))[0])
    painted_request = GenerationRequest(**base, color_map=color_map, regions=[Region("#ff0000", "red circle", 2.0)])
    painted = np.asarray(generate(tiny_model, painted_request)[0])
    again = np.asarray(generate(tiny_model, painted_request)[0])
    assert painted.shape == plain.shape == (32, 32, 3)
    assert np.array_equal(painted, again)
    assert np.abs(painted.astype(int) - plain.astype(int)).max() > 8
