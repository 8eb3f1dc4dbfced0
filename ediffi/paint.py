"""Paint-with-words inputs (eDiff-I §4.3): a colour map plus regions
`{color "#rrggbb", phrase, strength}` become the denoiser inputs
`pww_mask [L, H, W]` and `pww_strength` (docs/architecture.md §3).

Each phrase is located in the prompt by characters, then mapped to the tokens
of *each* tokenizer through the tokenizer's own offsets (never by guessing
how a tokenizer splits words). The mask of a region is put in the columns of
its phrase's tokens: T5 tokens at [0, L_t5), CLIP tokens at [L_t5, L).

Per-region strengths are folded into the mask: `pww_strength` is the largest
region strength w' and each region's mask is scaled by w'_region / w', so
`w A` in the attention equals sum_r w'_r log(1+sigma) max(QK^T) M_r.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# The request rules (regions, colours, phrase lookup, aspect) live in the torch-free spec; re-exported here.
from ediffi.spec import (  # noqa: F401
    DEFAULT_STRENGTH,
    MAX_STRENGTH,
    REGIONS_FIELD,
    PaintWithWordsError,
    Region,
    check_color_map_aspect,
    parse_color,
    parse_region_arg,
    phrase_span,
    region_field,
)


def tokens_in_span(offsets: list[tuple[int, int]], span: tuple[int, int]) -> list[int]:
    """Indices of tokens whose character offsets overlap span; special and
    padding tokens have empty offsets (start == end) and never match."""
    start, end = span
    return [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]


def region_masks(color_map: Image.Image, regions: list[Region], height: int, width: int) -> np.ndarray:
    """[R, height, width] float masks: exact-colour pixels of each region,
    area-resized to the canvas (soft edges)."""
    check_color_map_aspect(color_map.width, color_map.height, width, height)
    pixels = np.asarray(color_map.convert("RGB"), dtype=np.int16)
    masks = []
    for i, region in enumerate(regions):
        try:
            rgb = region.rgb
        except ValueError as exc:
            raise PaintWithWordsError(region_field(i, "color"), str(exc)) from None
        hit = np.all(pixels == np.array(rgb, dtype=np.int16), axis=-1)
        if not hit.any():
            raise PaintWithWordsError(region_field(i, "color"), f"colour {region.color} does not occur in the colour map")
        mask = Image.fromarray((hit * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BOX)
        masks.append(np.asarray(mask, dtype=np.float32) / 255.0)
    return np.stack(masks)


def build_pww_inputs(
    prompt: str,
    regions: list[Region],
    color_map: Image.Image,
    t5_offsets: list[tuple[int, int]],
    clip_offsets: list[tuple[int, int]],
    height: int,
    width: int,
) -> tuple[torch.Tensor, float]:
    """(pww_mask [L_t5 + L_clip, height, width], pww_strength) for one prompt."""
    if not regions:
        raise PaintWithWordsError(REGIONS_FIELD, "at least one region is required")
    for i, region in enumerate(regions):
        if not (0.0 <= region.strength <= MAX_STRENGTH):
            raise PaintWithWordsError(region_field(i, "strength"), f"must be within [0, {MAX_STRENGTH:g}]")
    spans = [phrase_span(prompt, r.phrase, region_field(i, "phrase")) for i, r in enumerate(regions)]
    masks = region_masks(color_map, regions, height, width)
    strength = max(r.strength for r in regions)
    length = len(t5_offsets) + len(clip_offsets)
    pww = np.zeros((length, height, width), dtype=np.float32)
    for i, (region, span, mask) in enumerate(zip(regions, spans, masks)):
        columns = tokens_in_span(t5_offsets, span) + [len(t5_offsets) + j for j in tokens_in_span(clip_offsets, span)]
        if not columns:
            raise PaintWithWordsError(
                region_field(i, "phrase"), f"phrase {region.phrase!r} was truncated away by the tokenizer"
            )
        scale = region.strength / strength if strength > 0 else 0.0
        for col in columns:
            pww[col] = np.maximum(pww[col], mask * scale)
    return torch.from_numpy(pww), float(strength)


class PaintWithWordsAttnProcessor:
    """A diffusers attention processor with the paint-with-words bias in
    cross-attention (eDiff-I §4.3, the same equation as `unet.SpatialAttention`):

        softmax((Q K^T + w A) / sqrt(d)) V,   w = w' log(1 + sigma) max(Q K^T)

    with max(Q K^T) per sample (over heads, queries and keys of that row),
    A the request's `pww_mask [B, L, h, w]` resized to this layer's
    resolution. It gets `pww=(mask, strength, sigma)` through the UNet's
    cross_attention_kwargs; self-attention, and calls without it, run
    diffusers' own processor unchanged. Rows with strength 0 (unconditional
    rows, unpainted requests) get exactly the plain attention logits."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.plain = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, pww=None, **kwargs):
        if pww is None or encoder_hidden_states is None or attn.is_cross_attention is False:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        mask, strength, sigma = pww
        if hidden_states.ndim != 3 or attn.norm_cross or attn.residual_connection or attn.spatial_norm is not None:
            raise ValueError("paint-with-words supports the SD/SDXL transformer-block cross-attention layout only")
        b, tokens, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        heads = attn.heads
        split = lambda t: t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
        query, key, value = split(query), split(key), split(value)
        out = self.attention_probs(query, key, attn.scale, mask, strength, sigma) @ value
        out = out.transpose(1, 2).reshape(b, tokens, -1).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor

    @staticmethod
    def attention_probs(query, key, scale, mask, strength, sigma) -> torch.Tensor:
        """softmax((Q K^T + w A) * scale) [B, heads, tokens, L], w per row."""
        logits = query @ key.transpose(-1, -2)  # Q K^T
        area = resize_pww_mask_to_tokens(mask, query.shape[2]).to(logits.dtype)  # [B, tokens, L]
        per_sample_max = logits.detach().amax(dim=(1, 2, 3))  # max(Q K^T) of each row alone
        weight = strength.to(logits.dtype) * torch.log1p(sigma.to(logits.dtype)) * per_sample_max
        return ((logits + weight[:, None, None, None] * area[:, None]) * scale).softmax(dim=-1)


def resize_pww_mask_to_tokens(mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """[B, L, h, w] at latent resolution -> [B, tokens, L] at an attention
    layer's resolution (h/f x w/f with f a power of two; diffusers'
    downsampling rounds odd sizes up)."""
    h, w = mask.shape[-2:]
    factor = 1
    while math.ceil(h / factor) * math.ceil(w / factor) > tokens:
        factor *= 2
    size = (math.ceil(h / factor), math.ceil(w / factor))
    if size[0] * size[1] != tokens:
        raise ValueError(f"cannot place a {h}x{w} paint-with-words mask on {tokens} attention tokens")
    if size != (h, w):
        mask = F.interpolate(mask, size=size, mode="area")
    return mask.flatten(2).transpose(1, 2)


class PaintWithWordsAddedKVAttnProcessor:
    """Paint-with-words in DeepFloyd IF's attention (diffusers'
    `AttnAddedKVProcessor2_0`, the SimpleCrossAttn blocks): one softmax over
    the text tokens' keys (add_k_proj of the T5 states) followed by the
    image tokens' own keys. The bias w A (eDiff-I §4.3, w = w' log(1 + sigma)
    max(Q K^T), max per sample over the text columns) goes into the text
    columns only; image columns and rows with strength 0 are unchanged."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnAddedKVProcessor2_0

        self.plain = AttnAddedKVProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, pww=None, **kwargs):
        if pww is None or encoder_hidden_states is None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask)
        if attention_mask is not None:
            raise ValueError("paint-with-words in added-KV attention takes no attention mask (IF's pipelines pass none)")
        probs, value = self._attend(attn, hidden_states, encoder_hidden_states, pww)
        b, tokens = probs.shape[0], probs.shape[2]
        out = (probs @ value).transpose(1, 2).reshape(b, tokens, -1).to(hidden_states.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out.transpose(-1, -2).reshape(hidden_states.shape) + hidden_states

    def probabilities(self, attn, hidden_states, encoder_hidden_states, pww) -> torch.Tensor:
        """The attention weights [B, heads, tokens, L_text (+ tokens)] (tests)."""
        return self._attend(attn, hidden_states, encoder_hidden_states, pww)[0]

    def _attend(self, attn, hidden_states, encoder_hidden_states, pww):
        mask, strength, sigma = pww
        b, channels = hidden_states.shape[:2]
        hidden_states = hidden_states.view(b, channels, -1).transpose(1, 2)
        tokens = hidden_states.shape[1]
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        heads = attn.heads
        split = lambda t: t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
        query = split(attn.to_q(hidden_states))
        key, value = split(attn.add_k_proj(encoder_hidden_states)), split(attn.add_v_proj(encoder_hidden_states))
        text_tokens = key.shape[2]
        if not attn.only_cross_attention:
            key = torch.cat([key, split(attn.to_k(hidden_states))], dim=2)
            value = torch.cat([value, split(attn.to_v(hidden_states))], dim=2)
        logits = query @ key.transpose(-1, -2)  # [B, heads, tokens, L_text (+ tokens)]
        area = resize_pww_mask_to_tokens(mask, tokens).to(logits.dtype)  # [B, tokens, L_text]
        per_sample_max = logits[..., :text_tokens].detach().amax(dim=(1, 2, 3))
        weight = strength.to(logits.dtype) * torch.log1p(sigma.to(logits.dtype)) * per_sample_max
        bias = F.pad(weight[:, None, None, None] * area[:, None], (0, logits.shape[-1] - text_tokens))
        return ((logits + bias) * attn.scale).softmax(dim=-1), value


def install_pww_processors(unet) -> None:
    """Give every attention layer of a diffusers UNet the paint-with-words
    processor for its layout (it defers to the plain one when not painting):
    added-KV layers (IF) get the added-KV variant."""
    processors = {}
    for name, processor in unet.attn_processors.items():
        added_kv = type(processor).__name__.startswith("AttnAddedKV")
        processors[name] = PaintWithWordsAddedKVAttnProcessor() if added_kv else PaintWithWordsAttnProcessor()
    unet.set_attn_processor(processors)
