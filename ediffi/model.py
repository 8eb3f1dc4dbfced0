"""A loaded model directory: encoders plus, per cascade stage, an ensemble of
expert denoisers routed by sigma.

Directory layout (docs/architecture.md §3): `model.json`, each expert's weights as a
safetensors file, and the encoder folders (transformers format with
tokenizer files). Loading is offline and names any missing file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ediffi.config import (
    DiffusersEncodersConfig,
    EncodersConfig,
    ExpertConfig,
    ModelConfig,
    StageConfig,
    TextEncoderConfig,
    UNetConfig,
    VisionEncoderConfig,
)
from ediffi.edm import EDMDenoiser
from ediffi.encoders import Encoders, TinyEncoderSpec, build_tiny_encoders


# Name of a latent stage's decoder step among its "experts" (never routed to by sigma).
DECODER = "vae_decoder"



class ExpertEnsemble(nn.Module):
    """The experts of one stage. `route` picks the expert owning sigma in its
    half-open [sigma_lo, sigma_hi); a boundary belongs to the higher-noise
    expert (the one whose sigma_lo equals it). One expert = a plain model."""

    def __init__(self, stage: StageConfig, experts: dict[str, nn.Module], decoder: nn.Module | None = None):
        super().__init__()
        self.stage = stage
        self.experts = nn.ModuleDict(experts)
        # A latent stage's VAE decoder: the engine runs it like an expert
        # (batched across requests) once a request's latents are final.
        if decoder is not None:
            self.experts[DECODER] = decoder
        # Sorted by sigma_lo; coverage was validated with the config.
        self._order = sorted(stage.experts, key=lambda e: e.sigma_lo)

    def route(self, sigma: float) -> str:
        if not sigma >= 0.0:  # also rejects NaN
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        for expert in reversed(self._order):
            if sigma >= expert.sigma_lo:
                return expert.name
        raise AssertionError("unreachable: coverage starts at 0")

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        """Evaluate rows with arbitrary per-row sigma, each on its own expert."""
        names = [self.route(float(s)) for s in sigma]
        out = torch.empty_like(x)
        for name in dict.fromkeys(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            picked = {k: (v.index_select(0, rows) if torch.is_tensor(v) else v) for k, v in cond.items()}
            out[rows] = self.experts[name](x.index_select(0, rows), sigma.index_select(0, rows), **picked)
        return out


@dataclass
class EDiffIModel:
    config: ModelConfig
    encoders: Encoders
    stages: dict[str, ExpertEnsemble]
    model_dir: Path

    def to(self, device: str | torch.device, dtype: torch.dtype = torch.float32) -> EDiffIModel:
        self.encoders.to(device)
        for ensemble in self.stages.values():
            ensemble.to(device=device, dtype=dtype)
            if DECODER in ensemble.experts:
                # VAE decoders overflow in float16 (SDXL's does): keep float32.
                ensemble.experts[DECODER].float()
        return self

    @property
    def device(self) -> torch.device:
        return self.encoders.device

    @property
    def dtype(self) -> torch.dtype:
        first = next(iter(self.stages.values()))
        return next(first.parameters()).dtype


def load_expert(model_dir: Path, stage: StageConfig, expert: ExpertConfig, sigma_data: float) -> EDMDenoiser:
    path = model_dir / expert.weights
    if not path.is_file():
        raise FileNotFoundError(
            f"stage {stage.name!r} expert {expert.name!r}: weights file {path} is missing"
        )
    net = EDMDenoiser(expert.network, stage.image_size, sigma_data)
    state = load_file(str(path))
    try:
        missing, unexpected = net.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    except RuntimeError as exc:  # same names, wrong shapes
        raise ValueError(
            f"weights {path} do not match the network config of expert {expert.name!r}: {str(exc)[:500]}"
        ) from None
    if missing or unexpected:
        raise ValueError(
            f"weights {path} do not match the network config of expert {expert.name!r}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return net.eval()


def load_model(model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> EDiffIModel:
    """Load a model directory offline. Encoders stay float32 (they run once
    per prompt); experts take `dtype`."""
    model_dir = Path(model_dir)
    config = ModelConfig.load(model_dir)
    if config.is_imported:
        from ediffi.diffusers_model import load_imported_model

        return load_imported_model(model_dir, config).to(device, dtype)
    encoders = Encoders(model_dir, config.encoders)
    stages = {}
    for stage in config.stages:
        experts = {e.name: load_expert(model_dir, stage, e, config.sigma_data) for e in stage.experts}
        for e in stage.experts:
            net_cfg = e.network
            if net_cfg.context_dim != encoders.context_dim or net_cfg.pooled_dim != encoders.pooled_dim:
                raise ValueError(
                    f"stage {stage.name!r} expert {e.name!r} expects context_dim={net_cfg.context_dim}, "
                    f"pooled_dim={net_cfg.pooled_dim} but the encoders give {encoders.context_dim}, {encoders.pooled_dim}"
                )
        stages[stage.name] = ExpertEnsemble(stage, experts)
    return EDiffIModel(config, encoders, stages, model_dir).to(device, dtype)


def save_expert(net: EDMDenoiser, path: Path, dtype: torch.dtype = torch.float32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(dtype).contiguous() for k, v in net.state_dict().items()}, str(path))


def weights_hash(model_dir: Path, relative: str) -> str:
    """sha256 of a weights file: ties exported artifacts to their source."""
    digest = hashlib.sha256()
    with open(model_dir / relative, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class TinyModelSpec:
    """Sizes of a small random cascade, for tests and as training's start."""

    base_size: int = 16
    sr_size: int = 32  # 0 for no SR stage
    base_experts: int = 2
    sr_experts: int = 1
    model_channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2)
    attention_resolutions: tuple[int, ...] = (8,)
    num_heads: int = 2
    embedding_dim: int = 64
    text_length: int = 16
    encoder: TinyEncoderSpec = TinyEncoderSpec(width=16, layers=1, heads=2, projection_dim=16, image_size=16, patch_size=8)
    # Expert boundaries, high to low (base stage): defaults split at sigma 1.
    base_boundaries: tuple[float, ...] = (1.0,)
    sr_boundaries: tuple[float, ...] = ()
    low_res_aug_sigma: float = 0.05
    # As the shipped model: the base stage sees pixel coordinates, SR does not.
    base_coord_channels: bool = True


# The shipped model's shape of options (models/default/model.json) at test
# size: every option on (T5 + CLIP text, CLIP image for style, coordinate
# channels on the base stage), 3 base experts split at sigma 2.5 and 0.4,
# 2 SR experts split at sigma 1, 3 levels with attention at the two lowest
# resolutions of the base stage (the lowest of SR, as shipped), 4 heads,
# 24 tokens; only the channels are small, so tests on it stay fast.
SHIPPED_SHAPE_SPEC = TinyModelSpec(
    base_experts=3, base_boundaries=(2.5, 0.4), sr_experts=2, sr_boundaries=(1.0,),
    model_channels=8, channel_mult=(1, 2, 2), attention_resolutions=(8, 4), num_heads=4,
    embedding_dim=32, text_length=24,
    encoder=TinyEncoderSpec(width=16, layers=1, heads=4, projection_dim=16, image_size=16, patch_size=8),
)


def experts_for(boundaries: tuple[float, ...], count: int, prefix: str, network: UNetConfig, stage_dir: str) -> list[ExpertConfig]:
    """Half-open intervals [0, b_k), [b_k, b_k-1), ..., [b_1, inf) named
    prefix0 (highest noise) .. prefixN (lowest)."""
    if len(boundaries) != count - 1:
        raise ValueError(f"{count} experts need {count - 1} boundaries, got {boundaries}")
    edges = [None, *sorted(boundaries, reverse=True), 0.0]  # high to low
    experts = []
    for i in range(count):
        hi, lo = edges[i], edges[i + 1]
        name = f"{prefix}{i}"
        experts.append(ExpertConfig(name=name, sigma_lo=lo, sigma_hi=hi, weights=f"{stage_dir}/{name}.safetensors", network=network))
    return experts


def tiny_model_config(spec: TinyModelSpec, words: list[str] | None = None) -> ModelConfig:
    enc = spec.encoder
    context_dim = 2 * enc.width  # T5 d_model + CLIP text width
    pooled_dim = 2 * enc.projection_dim
    net = dict(
        model_channels=spec.model_channels, channel_mult=list(spec.channel_mult), num_res_blocks=1,
        attention_resolutions=list(spec.attention_resolutions), num_heads=spec.num_heads,
        context_dim=context_dim, pooled_dim=pooled_dim, embedding_dim=spec.embedding_dim,
        groups=min(8, spec.model_channels),
    )
    stages = [
        StageConfig(
            name="base", image_size=spec.base_size,
            experts=experts_for(spec.base_boundaries, spec.base_experts, "base",
                                UNetConfig(**net, coord_channels=spec.base_coord_channels), "stages/base"),
        )
    ]
    if spec.sr_size:
        sr_net = UNetConfig(**net, low_res_channels=3)
        stages.append(
            StageConfig(
                name="sr", image_size=spec.sr_size, low_res_aug_sigma=spec.low_res_aug_sigma,
                experts=experts_for(spec.sr_boundaries, spec.sr_experts, "sr", sr_net, "stages/sr"),
            )
        )
    return ModelConfig(
        name="tiny-random",
        encoders=EncodersConfig(
            t5=TextEncoderConfig(path="encoders/t5", max_length=spec.text_length),
            clip_text=TextEncoderConfig(path="encoders/clip_text", max_length=spec.text_length),
            clip_vision=VisionEncoderConfig(path="encoders/clip_vision"),
        ),
        stages=stages,
    )


DEFAULT_WORDS = (
    "a an the and on in at of to with is there one two red green blue yellow purple orange circle square "
    "triangle circles squares triangles top bottom left right center middle corner cat dog house tree sky "
    "photo painting of style night day"
).split()


def build_random_model_dir(
    out_dir: str | Path, spec: TinyModelSpec = TinyModelSpec(), words: list[str] | None = None, seed: int = 0
) -> Path:
    """Write a complete, loadable model directory with random weights."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = tiny_model_config(spec)
    build_tiny_encoders(out_dir, list(words or DEFAULT_WORDS), config.encoders, spec.encoder, seed=seed)
    generator_seed = seed
    for stage in config.stages:
        for expert in stage.experts:
            generator_seed += 1
            torch.manual_seed(generator_seed)
            net = EDMDenoiser(expert.network, stage.image_size, config.sigma_data)
            # Random (not zero) output layers, so an untrained model still
            # responds to its conditioning and tests can see it.
            nn.init.normal_(net.net.out_conv.weight, std=0.05)
            save_expert(net, out_dir / expert.weights)
    config.save(out_dir)
    return out_dir
