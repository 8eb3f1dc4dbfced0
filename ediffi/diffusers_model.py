"""Loading a model directory written by `ediffi import diffusers`: diffusers
UNets as discrete-time experts (ediffi/discrete.py), the VAE decoder of each
latent stage, and the CLIP text conditioning (ediffi/clip_encoders.py).
Weights are read from safetensors only."""

from __future__ import annotations

from pathlib import Path

from ediffi.clip_encoders import DiffusersTextEncoders
from ediffi.config import DiffusersUNetConfig, ModelConfig
from ediffi.discrete import DiscreteUNetDenoiser, LatentDecoder
from ediffi.model import EDiffIModel, ExpertEnsemble


def _folder(model_dir: Path, relative: str, role: str) -> Path:
    folder = model_dir / relative
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{role}: {folder} has no config.json")
    return folder


def load_imported_model(model_dir: Path, config: ModelConfig) -> EDiffIModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ediffi.paint import install_pww_processors

    encoders = DiffusersTextEncoders(model_dir, config.encoders)
    stages = {}
    for stage in config.stages:
        experts = {}
        for expert in stage.experts:
            net: DiffusersUNetConfig = expert.network
            folder = _folder(model_dir, net.path, f"stage {stage.name!r} expert {expert.name!r}")
            unet = UNet2DConditionModel.from_pretrained(folder, use_safetensors=True, local_files_only=True).eval()
            install_pww_processors(unet)
            experts[expert.name] = DiscreteUNetDenoiser(
                unet, net.prediction_type, net.schedule, config.encoders.conditioning(net.conditioning),
                encoders.context_columns[net.conditioning], encoders.pooled_columns[net.conditioning],
                learned_variance=net.learned_variance, noise_level_schedule=net.noise_level_schedule,
                mask_channels=net.mask_channels,
            )
        decoder = None
        if stage.latent is not None:
            folder = _folder(model_dir, stage.latent.vae_path, f"stage {stage.name!r} VAE")
            vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True, local_files_only=True).eval()
            decoder = LatentDecoder(vae, stage.latent)
        stages[stage.name] = ExpertEnsemble(stage, experts, decoder)
    return EDiffIModel(config, encoders, stages, model_dir)
