"""Paint-with-words inputs (eDiff-I §4.3): a colour map plus regions
`{color "#rrggbb", phrase, strength}` become the denoiser inputs
`pww_mask [L, H, W]` and `pww_strength` (DESIGN §3).

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
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ediffi.failure import InputError

DEFAULT_STRENGTH = 0.4
_HEX_COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")
# A colour map must match the canvas aspect within this relative tolerance.
_ASPECT_TOLERANCE = 0.02


class PaintWithWordsError(InputError):
    """Invalid paint-with-words input; `field` names the offending field."""


@dataclass(frozen=True)
class Region:
    color: str  # "#rrggbb"
    phrase: str
    strength: float = DEFAULT_STRENGTH

    @property
    def rgb(self) -> tuple[int, int, int]:
        return parse_color(self.color)


def parse_color(color: str) -> tuple[int, int, int]:
    if not _HEX_COLOR.match(color):
        raise ValueError(f"colour {color!r} is not of the form #rrggbb")
    return tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def parse_region_arg(arg: str) -> Region:
    """CLI form '#rrggbb=phrase[:strength]'."""
    if "=" not in arg:
        raise ValueError(f"region {arg!r} must look like '#rrggbb=phrase[:strength]'")
    color, rest = arg.split("=", 1)
    phrase, strength = rest, DEFAULT_STRENGTH
    if ":" in rest:
        head, tail = rest.rsplit(":", 1)
        try:
            phrase, strength = head, float(tail)
        except ValueError:
            phrase = rest
    parse_color(color)
    return Region(color=color.lower(), phrase=phrase.strip(), strength=strength)


def phrase_span(prompt: str, phrase: str, field: str) -> tuple[int, int]:
    """Character span of the first whole-word, case-insensitive occurrence."""
    if not phrase.strip():
        raise PaintWithWordsError(field, "phrase is empty")
    match = re.search(r"(?<!\w)" + re.escape(phrase.strip()) + r"(?!\w)", prompt, flags=re.IGNORECASE)
    if match is None:
        raise PaintWithWordsError(field, f"phrase {phrase!r} does not occur in the prompt {prompt!r}")
    return match.span()


def tokens_in_span(offsets: list[tuple[int, int]], span: tuple[int, int]) -> list[int]:
    """Indices of tokens whose character offsets overlap span; special and
    padding tokens have empty offsets (start == end) and never match."""
    start, end = span
    return [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]


def check_aspect(color_map: Image.Image, height: int, width: int) -> None:
    map_aspect = color_map.width / color_map.height
    want = width / height
    if abs(map_aspect - want) / want > _ASPECT_TOLERANCE:
        raise PaintWithWordsError(
            "paint_with_words.color_map",
            f"colour map is {color_map.width}x{color_map.height} (aspect {map_aspect:.3f}) but the canvas aspect is {want:.3f}",
        )


def region_masks(color_map: Image.Image, regions: list[Region], height: int, width: int) -> np.ndarray:
    """[R, height, width] float masks: exact-colour pixels of each region,
    area-resized to the canvas (soft edges)."""
    check_aspect(color_map, height, width)
    pixels = np.asarray(color_map.convert("RGB"), dtype=np.int16)
    masks = []
    for i, region in enumerate(regions):
        try:
            rgb = region.rgb
        except ValueError as exc:
            raise PaintWithWordsError(f"paint_with_words.regions[{i}].color", str(exc)) from None
        hit = np.all(pixels == np.array(rgb, dtype=np.int16), axis=-1)
        if not hit.any():
            raise PaintWithWordsError(
                f"paint_with_words.regions[{i}].color", f"colour {region.color} does not occur in the colour map"
            )
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
        raise PaintWithWordsError("paint_with_words.regions", "at least one region is required")
    for i, region in enumerate(regions):
        if not (0.0 <= region.strength <= 10.0):
            raise PaintWithWordsError(f"paint_with_words.regions[{i}].strength", "must be within [0, 10]")
    spans = [phrase_span(prompt, r.phrase, f"paint_with_words.regions[{i}].phrase") for i, r in enumerate(regions)]
    masks = region_masks(color_map, regions, height, width)
    strength = max(r.strength for r in regions)
    length = len(t5_offsets) + len(clip_offsets)
    pww = np.zeros((length, height, width), dtype=np.float32)
    for i, (region, span, mask) in enumerate(zip(regions, spans, masks)):
        columns = tokens_in_span(t5_offsets, span) + [len(t5_offsets) + j for j in tokens_in_span(clip_offsets, span)]
        if not columns:
            raise PaintWithWordsError(
                f"paint_with_words.regions[{i}].phrase", f"phrase {region.phrase!r} was truncated away by the tokenizer"
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
        logits = query @ key.transpose(-1, -2)  # [B, heads, tokens, L] = Q K^T
        area = resize_pww_mask_to_tokens(mask, tokens).to(logits.dtype)  # [B, tokens, L]
        per_sample_max = logits.detach().amax(dim=(1, 2, 3))
        weight = strength.to(logits.dtype) * torch.log1p(sigma.to(logits.dtype)) * per_sample_max
        logits = (logits + weight[:, None, None, None] * area[:, None]) * attn.scale
        out = logits.softmax(dim=-1) @ value
        out = out.transpose(1, 2).reshape(b, tokens, -1).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


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
