"""The expert denoiser network F: a U-Net with residual blocks, self-attention
and paint-with-words cross-attention, conditioned on the noise level and the
pooled (CLIP text + CLIP image) embedding.

Every tensor that varies per request carries a batch axis, sigma included, so
one call can serve rows from many requests at different noise levels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ediffi.config import UNetConfig


class FourierEmbedding(nn.Module):
    """Random Fourier features of the scalar noise label (as EDM's SongUNet),
    always computed in float32.

    The phases 2*pi*freqs*label reach a few hundred radians (freqs ~ N(0,
    scale^2), scale 16): in bfloat16 (float16) neighbouring values there are
    0.25-2 rad (0.03-0.25 rad) apart, so a half-precision `freqs` or phase
    would scramble the noise level the network is told. `freqs` therefore
    stays float32 through `.to(dtype)` / `.half()` (see `_apply`); the
    caller casts the features to the network's dtype.
    """

    def __init__(self, num_channels: int, scale: float):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def _apply(self, fn, recurse=True):
        freqs = self.freqs
        super()._apply(fn, recurse)
        # Follow the move (device), not the cast: keep the float32 original.
        self.freqs = freqs.to(device=self.freqs.device, dtype=torch.float32)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()[:, None] * (2 * math.pi * self.freqs.float()[None, :])
        return torch.cat([x.cos(), x.sin()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        # Adaptive scale and shift from the noise/pooled embedding (ADM-style).
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(min(groups, out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        h = self.conv2(self.dropout(h))
        return (h + self.skip(x)) / math.sqrt(2)


def resize_pww_mask(pww_mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, L, H, W] -> [B, h*w, L]: the mask at this layer's resolution, laid
    out as the A matrix of the attention logits (queries x keys)."""
    if pww_mask.shape[-2:] != (height, width):
        pww_mask = F.interpolate(pww_mask, size=(height, width), mode="area")
    return pww_mask.flatten(2).transpose(1, 2)


class SpatialAttention(nn.Module):
    """Self-attention over pixels, then cross-attention to the text context.

    Cross-attention implements paint-with-words (eDiff-I §4.3):
        softmax((Q K^T + w A) / sqrt(d)) V,   w = w' log(1 + sigma) max(Q K^T)
    where A holds the painted mask in the columns of the phrase's tokens. The
    max is taken per sample (over heads, queries and keys of that row only),
    so a row's result never depends on which other rows share the batch.
    """

    def __init__(self, channels: int, context_dim: int, num_heads: int, groups: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.norm_self = nn.GroupNorm(min(groups, channels), channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_self = nn.Linear(channels, channels)
        self.norm_cross = nn.GroupNorm(min(groups, channels), channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        # A learned always-visible "null" key/value: a row whose whole context
        # is dropped (unconditional, or no text encoders) still attends to
        # something instead of a softmax over an empty set.
        self.null_kv = nn.Parameter(torch.randn(2, channels) * 0.02)
        self.proj_cross = nn.Linear(channels, channels)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge(self, t: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = t.shape
        return t.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        sigma: torch.Tensor,
        pww_mask: torch.Tensor,
        pww_strength: torch.Tensor,
    ) -> torch.Tensor:
        b, c, h, w = x.shape
        # Self-attention.
        tokens = self.norm_self(x).flatten(2).transpose(1, 2)
        q, k, v = (self._heads(t) for t in self.qkv(tokens).chunk(3, dim=2))
        out = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj_self(self._merge(out)).transpose(1, 2).view(b, c, h, w)

        # Cross-attention with the paint-with-words bias.
        tokens = self.norm_cross(x).flatten(2).transpose(1, 2)
        q = self._heads(self.q(tokens))
        k_ctx, v_ctx = self.kv(context).chunk(2, dim=2)
        null_k = self.null_kv[0].expand(b, 1, c)
        null_v = self.null_kv[1].expand(b, 1, c)
        k = self._heads(torch.cat([null_k, k_ctx], dim=1))
        v = self._heads(torch.cat([null_v, v_ctx], dim=1))
        logits = q @ k.transpose(-1, -2)  # [B, heads, hw, 1 + L], this is Q K^T
        keep = torch.cat([torch.ones_like(context_mask[:, :1]), context_mask], dim=1).bool()

        area = resize_pww_mask(pww_mask, h, w)  # [B, hw, L]
        area = torch.cat([torch.zeros_like(area[..., :1]), area], dim=2)  # the null key is never painted
        per_sample_max = logits.detach().amax(dim=(1, 2, 3))  # max(Q K^T) of each row alone
        weight = pww_strength * torch.log1p(sigma) * per_sample_max  # w, per row
        logits = logits + weight[:, None, None, None] * area[:, None]
        logits = logits / math.sqrt(self.head_dim)
        logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
        out = logits.softmax(dim=-1) @ v
        x = x + self.proj_cross(self._merge(out)).transpose(1, 2).view(b, c, h, w)
        return x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """A residual block optionally followed by attention, at one resolution."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig, attention: bool):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, cfg.embedding_dim, cfg.groups, cfg.dropout)
        self.attn = SpatialAttention(out_ch, cfg.context_dim, cfg.num_heads, cfg.groups) if attention else None

    def forward(self, x, emb, context, context_mask, sigma, pww_mask, pww_strength):
        x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x, context, context_mask, sigma, pww_mask, pww_strength)
        return x


def pixel_coordinates(x: torch.Tensor) -> torch.Tensor:
    """[B, 2, H, W]: each pixel's (x, y) position in [-1, 1], like x's dtype and layout.

    H and W are read as Python ints so an ONNX trace records the grid as a
    constant (an exported graph has static H and W; only B is dynamic).
    Traced, the linspace became float arithmetic on the input's shape, which
    onnxslim's symbolic shape inference folds with integer division
    (2.0 // 31 = 0: every coordinate -1; issue 14)."""
    b = x.shape[0]
    h, w = int(x.shape[2]), int(x.shape[3])
    ys = torch.linspace(-1.0, 1.0, h, dtype=x.dtype, device=x.device)
    xs = torch.linspace(-1.0, 1.0, w, dtype=x.dtype, device=x.device)
    grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)])
    return grid[None].expand(b, 2, h, w)


class UNet(nn.Module):
    """F_theta of EDM eq. 7; `EDMDenoiser` wraps it with the preconditioning."""

    def __init__(self, cfg: UNetConfig, image_size: int):
        super().__init__()
        self.cfg = cfg
        self.image_size = image_size
        emb = cfg.embedding_dim
        self.noise_embed = FourierEmbedding(emb, cfg.fourier_scale)
        self.noise_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.pooled_mlp = nn.Sequential(nn.Linear(cfg.pooled_dim, emb), nn.SiLU(), nn.Linear(emb, emb))
        if cfg.low_res_channels:
            self.aug_embed = FourierEmbedding(emb, cfg.fourier_scale)
            self.aug_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))

        ch = cfg.model_channels
        coords = 2 if cfg.coord_channels else 0
        self.input_conv = nn.Conv2d(cfg.in_channels + cfg.low_res_channels + coords, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [ch]
        resolution = image_size
        for level, mult in enumerate(cfg.channel_mult):
            out_ch = cfg.model_channels * mult
            for _ in range(cfg.num_res_blocks):
                self.down.append(_Level(ch, out_ch, cfg, resolution in cfg.attention_resolutions))
                ch = out_ch
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)
                resolution //= 2
        self.mid = nn.ModuleList(
            [_Level(ch, ch, cfg, attention=True), _Level(ch, ch, cfg, attention=False)]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            out_ch = cfg.model_channels * mult
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(_Level(ch + skip_channels.pop(), out_ch, cfg, resolution in cfg.attention_resolutions))
                ch = out_ch
            if level != 0:
                self.up.append(Upsample(ch))
                resolution *= 2
        self.out_norm = nn.GroupNorm(min(cfg.groups, ch), ch)
        self.out_conv = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def forward(
        self,
        x: torch.Tensor,
        noise_label: torch.Tensor,
        sigma: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        pooled: torch.Tensor,
        pww_mask: torch.Tensor,
        pww_strength: torch.Tensor,
        low_res: torch.Tensor | None = None,
        low_res_noise_label: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dtype = self.input_conv.weight.dtype  # the network's; the Fourier features are float32
        emb = self.noise_mlp(self.noise_embed(noise_label).to(dtype)) + self.pooled_mlp(pooled)
        if self.cfg.low_res_channels:
            if low_res is None or low_res_noise_label is None:
                raise ValueError("a super-resolution expert needs low_res and its noise level")
            emb = emb + self.aug_mlp(self.aug_embed(low_res_noise_label).to(dtype))
            x = torch.cat([x, low_res], dim=1)
        if self.cfg.coord_channels:
            x = torch.cat([x, pixel_coordinates(x)], dim=1)
        emb = F.silu(emb)
        cond = (context, context_mask, sigma, pww_mask, pww_strength)

        h = self.input_conv(x)
        skips = [h]
        for block in self.down:
            h = block(h) if isinstance(block, Downsample) else block(h, emb, *cond)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb, *cond)
        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                h = block(torch.cat([h, skips.pop()], dim=1), emb, *cond)
        return self.out_conv(F.silu(self.out_norm(h)))
