"""`ediffi import diffusers`: a local diffusers pipeline folder (model_index.json)
becomes a model directory of this project.

Each supported pipeline class is one entry of `PIPELINES`: a function that
reads the folder(s) and returns the stages and encoders of `model.json`.
Components are linked (default) or copied into the model directory. Only
safetensors weights are accepted; a pickled `.bin`/`.ckpt` is refused by
name and never opened.

Layout written:
    MODEL_DIR/model.json
    MODEL_DIR/base/{unet,vae,text_encoder,...}      (the base pipeline's components)
    MODEL_DIR/refiner/{unet,vae,text_encoder_2,...} (an SDXL refiner, if given)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, get_args

from ediffi.config import (
    MODEL_JSON,
    ClipTextEncoderConfig,
    ConditioningConfig,
    DiffusersEncodersConfig,
    DynamicThresholdingConfig,
    DiffusersUNetConfig,
    ExpertConfig,
    GenerationDefaults,
    LatentConfig,
    ModelConfig,
    PIPELINE_DEFAULTS,
    StageConfig,
    T5TextEncoderConfig,
    TrainingScheduleConfig,
    VarianceType,
)
from ediffi.discrete import boundary_sigma, noise_level_sigma, training_sigmas

DEFAULT_HIGH_NOISE_FRAC = 0.8
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
# Scheduler-config fields that fix the sigmas; the refiner must agree with the base.
# The scheduler config keys of the training schedule (a folder's use_karras_sigmas is no part of it:
# it sets the requests' default, sampler_as_loaded).
_SCHEDULE_FIELDS = tuple(
    name for name in TrainingScheduleConfig.model_fields if name not in ("use_karras_sigmas", "timestep_spacing_given")
)
# Config keys that differ between identical weights saved by different runs.
_VOLATILE_KEYS = {"_name_or_path", "transformers_version", "_diffusers_version", "_commit_hash"}


class DiffusersImportError(ValueError):
    """A diffusers folder that cannot be imported; the message names what is wrong."""


@dataclass
class PipelineFolder:
    """One diffusers pipeline folder and its model_index.json."""

    root: Path
    index: dict

    @classmethod
    def open(cls, root: str | Path) -> PipelineFolder:
        root = Path(root)
        index_path = root / "model_index.json"
        if not index_path.is_file():
            raise DiffusersImportError(f"{root} is not a diffusers pipeline folder: it has no model_index.json")
        return cls(root, read_json(index_path))

    @property
    def pipeline_class(self) -> str:
        return str(self.index.get("_class_name"))

    def has(self, component: str) -> bool:
        entry = self.index.get(component)
        return isinstance(entry, list) and entry[0] is not None and entry[1] is not None

    def component(self, name: str, weights: bool = True) -> Path:
        """The folder of a component the pipeline must have; with `weights`,
        checked to hold safetensors (and refused if it holds only pickles)."""
        if not self.has(name):
            raise DiffusersImportError(f"{self.root}: the {self.pipeline_class} has no {name!r} component in model_index.json")
        folder = self.root / name
        if not folder.is_dir():
            raise DiffusersImportError(f"{self.root}: component {name!r} is listed in model_index.json but {folder} is missing")
        if weights:
            require_safetensors(folder)
        return folder

    def config(self, name: str, filename: str = "config.json") -> dict:
        path = self.component(name, weights=False) / filename
        if not path.is_file():
            raise DiffusersImportError(f"component {name!r}: {path} is missing")
        return read_json(path)

    def setting(self, key: str, default):
        """A pipeline argument registered in model_index.json (e.g. force_zeros_for_empty_prompt)."""
        return self.index.get(key, default)


#: The weight files diffusers' and transformers' from_pretrained read without a ``variant``: one file, or the
#: index of its shards.
DEFAULT_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DiffusersImportError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise DiffusersImportError(f"{path}: expected a JSON object")
    return value


def require_safetensors(folder: Path) -> None:
    """The folder holds the default safetensors weights (or their shard index), whole: checked at import, so a
    truncated download or an fp16-only variant folder is named now instead of failing when a worker loads it."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    names = {p.name for p in files}
    for default in DEFAULT_WEIGHTS:
        if default in names:
            _check_safetensors(folder / default)
            return
        if f"{default}.index.json" in names:
            shards = read_json(folder / f"{default}.index.json").get("weight_map", {})
            for shard in sorted(set(shards.values()) if isinstance(shards, dict) else ()):
                if not (folder / shard).is_file():
                    raise DiffusersImportError(f"{folder / shard}: missing (listed in {default}.index.json)")
                _check_safetensors(folder / shard)
            return
    pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    variants = [p.name for p in files if p.name.endswith(".safetensors")]
    if variants:
        raise DiffusersImportError(
            f"{folder}: only variant weights ({', '.join(variants)}), no {' or '.join(DEFAULT_WEIGHTS)}: "
            "import a folder with the default weights (diffusers: "
            "DiffusionPipeline.from_pretrained(folder, variant=...).save_pretrained(new_folder) writes them)"
        )
    if pickled:
        raise DiffusersImportError(
            f"{pickled[0]}: pickled weights are not loaded (they can run code); convert the component to safetensors"
        )
    raise DiffusersImportError(f"{folder}: no safetensors weights found")


def _check_safetensors(path: Path) -> None:
    """The file's header parses and its tensors cover the file exactly (safetensors' own check; the data
    is memory-mapped, not read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt"):
            pass
    except (SafetensorError, OSError) as exc:
        raise DiffusersImportError(f"{path}: not a complete safetensors file ({exc})") from None


def schedule_of(folder: PipelineFolder) -> tuple[TrainingScheduleConfig, str]:
    """The training schedule and prediction type from the scheduler config,
    read as `EulerDiscreteScheduler.from_config` reads it (absent keys take
    that scheduler's defaults)."""
    cfg = folder.config("scheduler", "scheduler_config.json")
    if cfg.get("rescale_betas_zero_snr"):
        raise DiffusersImportError(f"{folder.root}/scheduler: rescale_betas_zero_snr is not supported")
    if cfg.get("timestep_type", "discrete") != "discrete":
        raise DiffusersImportError(f"{folder.root}/scheduler: timestep_type {cfg['timestep_type']!r} is not supported")
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise DiffusersImportError(f"{folder.root}/scheduler: prediction_type {prediction!r} is not supported")
    if cfg.get("variance_type") is not None and cfg["variance_type"] not in get_args(VarianceType):
        raise DiffusersImportError(f"{folder.root}/scheduler: variance_type {cfg['variance_type']!r} is not supported")
    return TrainingScheduleConfig(**_schedule_fields(cfg)), prediction


def _schedule_fields(cfg: dict) -> dict:
    """The training-schedule keys a scheduler config names (the rest keep their defaults), and whether
    it names its timestep spacing (absent, each scheduler class takes its own default)."""
    fields = {k: cfg[k] for k in _SCHEDULE_FIELDS if cfg.get(k) is not None}
    return {**fields, "timestep_spacing_given": cfg.get("timestep_spacing") is not None}


def sampler_as_loaded(folder: PipelineFolder) -> str | None:
    """The sampler that reproduces the folder's own scheduler on its own spaced sigmas, if it is one
    reproduced: a plain EulerDiscreteScheduler (SDXL's) -> euler, EulerAncestralDiscreteScheduler ->
    euler_a, PNDMScheduler (SD 1.x's, PLMS with skip_prk_steps) -> pndm, DDIMScheduler (eta 0, no dynamic
    thresholding) -> ddim, DDPMScheduler (IF's, with its learned variance and thresholding) -> ddpm,
    DPM-Solver++(2M) -> dpmpp_2m, UniPC (bh2, order 2, its defaults) -> unipc. Requests
    then default to it with use_karras_sigmas false, so one that leaves the sampling fields out gets
    the image of the pipeline as loaded."""
    cfg = folder.config("scheduler", "scheduler_config.json")
    # The class diffusers' from_pretrained instantiates is model_index.json's, whatever the config names.
    entry = folder.index.get("scheduler")
    loaded = entry[1] if isinstance(entry, list) and len(entry) == 2 else cfg.get("_class_name")
    plain = (
        not any(cfg.get(key) for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                          "use_lu_lambdas", "use_flow_sigmas"))
        and cfg.get("final_sigmas_type", "zero") == "zero"
    )
    if not plain:
        return None
    if loaded == "EulerDiscreteScheduler" and cfg.get("interpolation_type", "linear") == "linear":
        return "euler"
    if loaded == "EulerAncestralDiscreteScheduler":
        return "euler_a"
    if loaded == "PNDMScheduler":
        return "pndm"
    if loaded == "DDIMScheduler" and not cfg.get("thresholding"):
        return "ddim"
    if loaded == "DDPMScheduler" and cfg.get("variance_type", "fixed_small") != "fixed_large_log":
        return "ddpm"
    if (
        loaded == "DPMSolverMultistepScheduler"
        and cfg.get("algorithm_type", "dpmsolver++") == "dpmsolver++"
        and cfg.get("solver_order", 2) == 2
        and cfg.get("solver_type", "midpoint") == "midpoint"
        and cfg.get("lower_order_final", True)
        and not cfg.get("euler_at_final")
        and cfg.get("lambda_min_clipped", float("-inf")) == float("-inf")
    ):
        return "dpmpp_2m"
    if (
        loaded == "UniPCMultistepScheduler"
        and cfg.get("solver_order", 2) == 2
        and cfg.get("solver_type", "bh2") == "bh2"
        and cfg.get("predict_x0", True)
        and cfg.get("lower_order_final", True)
        and not cfg.get("disable_corrector")
    ):
        return "unipc"
    return None


def request_defaults(base: PipelineFolder) -> GenerationDefaults:
    """The pipeline's own steps and guidance (PIPELINE_DEFAULTS) with, where the base folder's
    scheduler is one reproduced on its own sigmas (:func:`sampler_as_loaded`), that sampler on them."""
    defaults = PIPELINE_DEFAULTS[base.pipeline_class]
    sampler = sampler_as_loaded(base)
    if sampler is None:
        return defaults
    return defaults.model_copy(update={"sampler": sampler, "use_karras_sigmas": False})


def _files_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name.endswith(".safetensors"):
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def _config_without_volatile(path: Path) -> dict:
    return {k: v for k, v in read_json(path).items() if k not in _VOLATILE_KEYS}


def require_same_text_encoder(
    base: PipelineFolder, base_name: str, refiner: PipelineFolder, refiner_name: str, role: str = "refiner"
) -> None:
    """The refiner (or IF's stage II) reads the base's encoding of the prompt
    (one encoding per prompt for both), so its text encoder must be the base's."""
    a, b = base.component(base_name), refiner.component(refiner_name)
    if _config_without_volatile(a / "config.json") != _config_without_volatile(b / "config.json") or _files_digest(a) != _files_digest(b):
        raise DiffusersImportError(
            f"the {role}'s text encoder {b} does not match the base's {a}: "
            f"a {role} must share the base's {base_name} (same config and weights)"
        )


@dataclass
class ImportPlan:
    """What an importer decided: components to place and the model.json parts."""

    # relative target -> a source folder (linked or copied) or a function that writes the folder itself
    components: dict[str, Path | Callable[[Path], None]] = field(default_factory=dict)
    stages: list[StageConfig] = field(default_factory=list)
    encoders: DiffusersEncodersConfig | None = None
    provenance: dict = field(default_factory=dict)


def _latent(vae_cfg: dict, unet_cfg: dict, vae_path: str) -> LatentConfig:
    scale = 2 ** (len(vae_cfg.get("block_out_channels", [64])) - 1)
    downsamples = len(unet_cfg.get("block_out_channels", [320])) - 1
    return LatentConfig(
        vae_path=vae_path, scale_factor=scale, scaling_factor=vae_cfg.get("scaling_factor", 0.18215),
        shift_factor=vae_cfg.get("shift_factor"), latents_mean=vae_cfg.get("latents_mean"),
        latents_std=vae_cfg.get("latents_std"),
        # diffusers' pipelines take multiples of 8 pixels; the UNet halves the
        # latents `downsamples` times.
        size_multiple=math.lcm(8, scale * 2**downsamples),
    )


def _default_size(unet_cfg: dict, latent: LatentConfig) -> int:
    """The size diffusers' pipeline picks: unet.sample_size * vae_scale_factor."""
    sample = unet_cfg.get("sample_size", 64)
    if isinstance(sample, (list, tuple)):
        sample = sample[0]
    return int(sample) * latent.scale_factor


def _text_encoder(folder: PipelineFolder, prefix: str, encoder: str, tokenizer: str, plan: ImportPlan, projection: bool) -> ClipTextEncoderConfig:
    plan.components[f"{prefix}/{encoder}"] = folder.component(encoder)
    plan.components[f"{prefix}/{tokenizer}"] = folder.component(tokenizer, weights=False)
    tok_cfg_path = folder.root / tokenizer / "tokenizer_config.json"
    max_length = 77
    if tok_cfg_path.is_file():
        max_length = int(read_json(tok_cfg_path).get("model_max_length", 77))
    return ClipTextEncoderConfig(
        name=encoder, path=f"{prefix}/{encoder}", tokenizer_path=f"{prefix}/{tokenizer}", max_length=max_length,
        with_projection=projection,
    )


def _unet(folder: PipelineFolder, prefix: str, plan: ImportPlan, inpainting: bool = False) -> dict:
    """The UNet's config; its input channels are the VAE's latents (an inpainting UNet's: the latents,
    the mask and the masked image's latents, 2 x latent + 1)."""
    plan.components[f"{prefix}/unet"] = folder.component("unet")
    plan.components[f"{prefix}/vae"] = folder.component("vae")
    plan.components[f"{prefix}/scheduler"] = folder.component("scheduler", weights=False)
    unet_cfg = folder.config("unet")
    latent = int(folder.config("vae").get("latent_channels", 4))
    expected = 2 * latent + 1 if inpainting else latent
    if int(unet_cfg.get("in_channels", 4)) != expected:
        raise DiffusersImportError(
            f"{folder.root}: the UNet's in_channels ({unet_cfg.get('in_channels', 4)}) are not "
            + (f"2 x the VAE's latent_channels + 1 = {expected} (an inpainting UNet)" if inpainting
               else f"the VAE's latent_channels ({latent}); an inpainting UNet comes in a StableDiffusionInpaintPipeline folder")
        )
    return unet_cfg


def _stage(folder: PipelineFolder, experts: list[ExpertConfig], schedule: TrainingScheduleConfig, unet_cfg: dict, vae_prefix: str) -> StageConfig:
    latent = _latent(folder.config("vae"), unet_cfg, f"{vae_prefix}/vae")
    sigmas = training_sigmas(schedule)
    return StageConfig(
        name="base", image_size=_default_size(unet_cfg, latent), channels=int(folder.config("vae").get("latent_channels", 4)),
        sigma_min=float(sigmas[0]), sigma_max=float(sigmas[-1]), latent=latent, experts=experts,
    )


def import_stable_diffusion(base: PipelineFolder, refiner: PipelineFolder | None, high_noise_frac: float) -> ImportPlan:
    """SD 1.x / 2.x: one CLIP text encoder (last hidden state), one UNet."""
    if refiner is not None:
        raise DiffusersImportError("--refiner is for StableDiffusionXLPipeline bases only")
    plan = ImportPlan()
    text = _text_encoder(base, "base", "text_encoder", "tokenizer", plan, projection=False)
    cond = ConditioningConfig(name="base", encoders=[text.name], hidden_state="last", empty_negative="encode")
    plan.encoders = DiffusersEncodersConfig(kind="diffusers_clip", text_encoders=[text], conditionings=[cond])
    inpainting = base.pipeline_class == "StableDiffusionInpaintPipeline"
    unet_cfg = _unet(base, "base", plan, inpainting=inpainting)
    schedule, prediction = schedule_of(base)
    mask_channels = int(unet_cfg["in_channels"]) // 2 + 1 if inpainting else 0  # the mask, the masked latents
    expert = ExpertConfig(
        name="unet", sigma_lo=0.0, sigma_hi=None,
        network=DiffusersUNetConfig(kind="diffusers_unet", path="base/unet", prediction_type=prediction, schedule=schedule,
                                    conditioning="base", mask_channels=mask_channels),
    )
    plan.stages = [_stage(base, [expert], schedule, unet_cfg, "base")]
    return plan


def import_stable_diffusion_xl(base: PipelineFolder, refiner: PipelineFolder | None, high_noise_frac: float) -> ImportPlan:
    """SDXL base (two text encoders, penultimate states concatenated, pooled
    text_embeds of the second, size micro-conditioning), optionally with its
    refiner as the low-noise expert below sigma(high_noise_frac)."""
    plan = ImportPlan()
    te1 = _text_encoder(base, "base", "text_encoder", "tokenizer", plan, projection=False)
    te2 = _text_encoder(base, "base", "text_encoder_2", "tokenizer_2", plan, projection=True)
    base_cond = ConditioningConfig(
        name="base", encoders=[te1.name, te2.name], hidden_state="penultimate", pooled_from=te2.name,
        empty_negative="zeros" if base.setting("force_zeros_for_empty_prompt", True) else "encode",
        micro_conditioning="aesthetic" if base.setting("requires_aesthetics_score", False) else "size",
    )
    conditionings = [base_cond]
    inpainting = base.pipeline_class == "StableDiffusionXLInpaintPipeline"
    unet_cfg = _unet(base, "base", plan, inpainting=inpainting)
    schedule, prediction = schedule_of(base)
    base_net = DiffusersUNetConfig(
        kind="diffusers_unet", path="base/unet", prediction_type=prediction, schedule=schedule, conditioning="base",
        mask_channels=int(unet_cfg["in_channels"]) // 2 + 1 if inpainting else 0,
    )
    vae_prefix = "base"
    if inpainting and refiner is not None:
        raise DiffusersImportError(
            f"{base.root}: an SDXL inpainting checkpoint is imported alone (--refiner is for a StableDiffusionXLPipeline base)"
        )
    if refiner is None:
        experts = [ExpertConfig(name="base", sigma_lo=0.0, sigma_hi=None, network=base_net)]
    else:
        if refiner.pipeline_class != "StableDiffusionXLImg2ImgPipeline":
            raise DiffusersImportError(
                f"{refiner.root}: a refiner must be a StableDiffusionXLImg2ImgPipeline, got {refiner.pipeline_class!r}"
            )
        require_same_text_encoder(base, "text_encoder_2", refiner, "text_encoder_2")
        encoders = ["text_encoder_2"]
        if refiner.has("text_encoder"):
            require_same_text_encoder(base, "text_encoder", refiner, "text_encoder")
            encoders = ["text_encoder", "text_encoder_2"]
        refiner.component("tokenizer_2", weights=False)
        refiner_schedule, refiner_prediction = schedule_of(refiner)
        if refiner_schedule != schedule:
            raise DiffusersImportError(
                f"{refiner.root}/scheduler: the refiner's training schedule differs from the base's; "
                "one sampler trajectory crosses both experts, so they must share it"
            )
        _unet(refiner, "refiner", plan)
        conditionings.append(
            ConditioningConfig(
                name="refiner", encoders=encoders, hidden_state="penultimate", pooled_from="text_encoder_2",
                empty_negative="zeros" if refiner.setting("force_zeros_for_empty_prompt", True) else "encode",
                micro_conditioning="aesthetic" if refiner.setting("requires_aesthetics_score", False) else "size",
            )
        )
        boundary = boundary_sigma(schedule, high_noise_frac)
        refiner_net = DiffusersUNetConfig(
            kind="diffusers_unet", path="refiner/unet", prediction_type=refiner_prediction, schedule=schedule, conditioning="refiner"
        )
        # Half-open ranges: the boundary sigma itself belongs to the base, as
        # diffusers' base runs every step with timestep >= the cutoff.
        experts = [
            ExpertConfig(name="base", sigma_lo=boundary, sigma_hi=None, network=base_net),
            ExpertConfig(name="refiner", sigma_lo=0.0, sigma_hi=boundary, network=refiner_net),
        ]
        vae_prefix = "refiner"  # diffusers decodes with the refiner pipeline's VAE
        plan.provenance["high_noise_frac"] = high_noise_frac
        plan.provenance["refiner"] = str(refiner.root.resolve())
    plan.encoders = DiffusersEncodersConfig(kind="diffusers_clip", text_encoders=[te1, te2], conditionings=conditionings)
    plan.stages = [_stage(refiner or base, experts, schedule, unet_cfg, vae_prefix)]
    return plan


# IF's pipelines encode the prompt to this many T5 tokens, whatever the
# tokenizer says ("the text encoder was trained with a max length of 77").
IF_TOKENS = 77


def _if_noise_level_default() -> int:
    """IFSuperResolutionPipeline's default `noise_level`, read from diffusers."""
    import inspect

    from diffusers import IFSuperResolutionPipeline

    return int(inspect.signature(IFSuperResolutionPipeline.__call__).parameters["noise_level"].default)


def _if_schedule(folder: PipelineFolder, component: str = "scheduler") -> TrainingScheduleConfig:
    """An IF scheduler config's training schedule, sampled with DPM-Solver's
    conventions (diffusers' Euler cannot take IF's learned-variance output)."""
    cfg = folder.config(component, "scheduler_config.json")
    return TrainingScheduleConfig(**{**_schedule_fields(cfg), "karras_scheduler": "DPMSolverMultistepScheduler"})


def _if_stage(folder: PipelineFolder, prefix: str, plan: ImportPlan, super_resolution: bool) -> StageConfig:
    """One IF stage: a pixel-space UNet (learned variance when out_channels is
    twice the image channels) with its scheduler's dynamic thresholding; an SR
    stage also concatenates the upsampled image and takes the noise level of
    its image-noising scheduler as class label."""
    plan.components[f"{prefix}/unet"] = folder.component("unet")
    plan.components[f"{prefix}/scheduler"] = folder.component("scheduler", weights=False)
    unet_cfg = folder.config("unet")
    in_channels = int(unet_cfg.get("in_channels", 3))
    channels = in_channels // 2 if super_resolution else in_channels
    out_channels = int(unet_cfg.get("out_channels", channels))
    if out_channels not in (channels, 2 * channels):
        raise DiffusersImportError(
            f"{folder.root}/unet: out_channels {out_channels} is neither the image channels ({channels}) nor twice them"
        )
    _, prediction = schedule_of(folder)  # checks the config, as for SD
    schedule = _if_schedule(folder)
    cfg = folder.config("scheduler", "scheduler_config.json")
    learned = out_channels == 2 * channels
    if learned != (cfg.get("variance_type") in ("learned", "learned_range")):
        raise DiffusersImportError(
            f"{folder.root}: the UNet's out_channels ({out_channels}) and the scheduler's variance_type "
            f"({cfg.get('variance_type')!r}) disagree about a learned variance"
        )
    thresholding = None
    if cfg.get("thresholding"):
        thresholding = DynamicThresholdingConfig(
            ratio=cfg.get("dynamic_thresholding_ratio", 0.995), max_value=cfg.get("sample_max_value", 1.0)
        )
    low_res = {}
    noise_levels = None
    if super_resolution:
        plan.components[f"{prefix}/image_noising_scheduler"] = folder.component("image_noising_scheduler", weights=False)
        noise_levels = _if_schedule(folder, "image_noising_scheduler")
        level = _if_noise_level_default()
        low_res = dict(
            low_res_noise_level=level, low_res_aug_sigma=noise_level_sigma(noise_levels, level), low_res_align_corners=True
        )
    network = DiffusersUNetConfig(
        kind="diffusers_unet", path=f"{prefix}/unet", prediction_type=prediction, schedule=schedule, conditioning="t5",
        learned_variance=learned, low_res_channels=channels if super_resolution else 0, noise_level_schedule=noise_levels,
    )
    sample = unet_cfg.get("sample_size", 64)
    sigmas = training_sigmas(schedule)
    return StageConfig(
        name="sr" if super_resolution else "base", image_size=int(sample[0] if isinstance(sample, (list, tuple)) else sample),
        channels=channels, sigma_min=float(sigmas[0]), sigma_max=float(sigmas[-1]), dynamic_thresholding=thresholding,
        experts=[ExpertConfig(name="unet", sigma_lo=0.0, sigma_hi=None, network=network)], **low_res,
    )


def t5_tokenizer_component(tokenizer: Path) -> Path | Callable[[Path], None]:
    """The T5 tokenizer folder as it is when it has a ``tokenizer.json``; else
    (the released IF-I checkpoints: ``spiece.model`` only) a writer that
    converts the sentencepiece model to a ``tokenizer.json`` in the model
    directory, as transformers does when it loads such a folder, so workers
    load it without sentencepiece and without converting at every start."""
    if (tokenizer / "tokenizer.json").is_file():
        return tokenizer
    if not (tokenizer / "spiece.model").is_file():
        raise DiffusersImportError(f"{tokenizer}: neither tokenizer.json nor spiece.model (T5's sentencepiece model)")

    def convert(target: Path) -> None:
        from transformers import AutoTokenizer

        try:
            converted = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        except Exception as error:  # transformers raises ValueError, ImportError, OSError, protobuf's DecodeError
            raise DiffusersImportError(f"{tokenizer}: cannot convert spiece.model to tokenizer.json: {error}") from error
        converted.save_pretrained(target)

    return convert


def import_deepfloyd_if(stage_1: PipelineFolder, stage_2: PipelineFolder | None, high_noise_frac: float) -> ImportPlan:
    """DeepFloyd IF: stage I (T5 conditioning, 64 px) and optionally stage II
    (super-resolution of stage I's image), a two-stage pixel cascade. Stage
    II reads stage I's prompt encoding (diffusers' IF example passes stage
    I's prompt_embeds to it), so a text encoder it carries must be stage I's."""
    plan = ImportPlan()
    plan.components["base/text_encoder"] = stage_1.component("text_encoder")
    plan.components["base/tokenizer"] = t5_tokenizer_component(stage_1.component("tokenizer", weights=False))
    t5 = T5TextEncoderConfig(kind="t5", name="text_encoder", path="base/text_encoder", tokenizer_path="base/tokenizer", max_length=IF_TOKENS)
    cond = ConditioningConfig(name="t5", encoders=[t5.name], hidden_state="last", empty_negative="encode")
    plan.encoders = DiffusersEncodersConfig(kind="diffusers_clip", text_encoders=[t5], conditionings=[cond])
    plan.stages = [_if_stage(stage_1, "base", plan, super_resolution=False)]
    if stage_2 is not None:
        if stage_2.pipeline_class != "IFSuperResolutionPipeline":
            raise DiffusersImportError(
                f"{stage_2.root}: --sr must be an IFSuperResolutionPipeline folder, got {stage_2.pipeline_class!r}"
            )
        if stage_2.has("text_encoder"):
            require_same_text_encoder(stage_1, "text_encoder", stage_2, "text_encoder", role="stage II")
        plan.stages.append(_if_stage(stage_2, "sr", plan, super_resolution=True))
        plan.provenance["sr"] = str(stage_2.root.resolve())
    return plan


# Pipeline class (model_index.json `_class_name`) -> importer. Another family
# is one more entry here. The second folder is the SDXL refiner (--refiner)
# or IF's stage II (--sr), as COMPANION_FLAGS says.
PIPELINES: dict[str, Callable[[PipelineFolder, PipelineFolder | None, float], ImportPlan]] = {
    "StableDiffusionPipeline": import_stable_diffusion,
    # stable-diffusion-inpainting, stable-diffusion-xl-1.0-inpainting: their UNet takes the mask (every request inpaints)
    "StableDiffusionInpaintPipeline": import_stable_diffusion,
    "StableDiffusionXLInpaintPipeline": import_stable_diffusion_xl,
    "StableDiffusionXLPipeline": import_stable_diffusion_xl,
    "IFPipeline": import_deepfloyd_if,
}
COMPANION_FLAGS = {"IFPipeline": "--sr"}


def _place(source: Path | Callable[[Path], None], target: Path, copy: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if callable(source):
        source(target)
    elif copy:
        shutil.copytree(source, target, ignore=shutil.ignore_patterns(*[f"*{s}" for s in PICKLE_SUFFIXES]))
    else:
        os.symlink(source.resolve(), target, target_is_directory=True)


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_out_dir(out_dir: Path, sources: list[Path], replace: bool) -> None:
    """Refuse an --out that would destroy anything but a model directory written before: one that is, holds
    or lies inside a source pipeline folder (writing there would delete the weights being imported), a file,
    or a non-empty folder; with ``replace``, a folder that is a model directory (has model.json) is fine."""
    target = out_dir.resolve()
    for source in sources:
        if _overlaps(target, source.resolve()):
            raise DiffusersImportError(
                f"--out {out_dir} overlaps the pipeline folder {source}: choose a model directory outside it"
            )
    if target.exists() and not target.is_dir():
        raise DiffusersImportError(f"--out {out_dir} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()):
        if not (target / MODEL_JSON).is_file():
            raise DiffusersImportError(
                f"--out {out_dir} is a non-empty folder that is not a model directory (no {MODEL_JSON}): "
                "choose an empty or new folder"
            )
        if not replace:
            raise DiffusersImportError(f"--out {out_dir} already holds a model directory: pass --force to replace it")


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def write_model_dir(
    out_dir: Path,
    config: ModelConfig,
    components: dict[str, Path | Callable[[Path], None]],
    copy: bool,
    report: Callable[[str], None] = lambda line: None,
) -> None:
    """Write the model directory beside ``out_dir`` first and move it into place when complete, so a failed
    import (a full disk during --copy) leaves the previous model directory, if any, as it was. ``report``
    gets a line per component as it is placed (a --copy of SDXL is gigabytes: the user sees it move)."""
    out_dir = out_dir.absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.importing-", dir=out_dir.parent))
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from a container's non-root user
        for k, (relative, source) in enumerate(components.items(), start=1):
            if callable(source):
                report(f"[{k}/{len(components)}] writing {relative}")
            elif copy:
                report(f"[{k}/{len(components)}] copying {relative} ({_folder_bytes(source) / 1e9:.2f} GB)")
            else:
                report(f"[{k}/{len(components)}] linking {relative} -> {source.resolve()}")
            _place(source, staging / relative, copy)
        config.save(staging)
        if out_dir.exists():
            # Only a model directory gets here (check_out_dir); rmtree removes its links, not their targets.
            replaced = staging.with_name(staging.name.replace(".importing-", ".replaced-"))
            out_dir.rename(replaced)
            staging.rename(out_dir)
            shutil.rmtree(replaced)
        else:
            staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def default_model_name(root: Path) -> str:
    """The pipeline folder's name; for a Hugging Face cache snapshot
    (``models--ORG--NAME/snapshots/HASH``) the repository's NAME instead of the hash."""
    root = root.resolve()
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return root.parent.parent.name.split("--")[-1]
    return root.name


def import_diffusers(
    base_dir: str | Path,
    out_dir: str | Path,
    refiner_dir: str | Path | None = None,
    high_noise_frac: float = DEFAULT_HIGH_NOISE_FRAC,
    copy: bool = False,
    sr_dir: str | Path | None = None,
    replace: bool = False,
    name: str | None = None,
    report: Callable[[str], None] = lambda line: None,
) -> ModelConfig:
    """Write a model directory for a diffusers pipeline folder (and its
    refiner, or for IF its super-resolution stage). ``replace``: an existing
    model directory at ``out_dir`` is replaced (else refused). ``name``: the
    model's id (``GET /v1/models``); default: :func:`default_model_name`. ``report``: progress lines."""
    base = PipelineFolder.open(base_dir)
    importer = PIPELINES.get(base.pipeline_class)
    if importer is None:
        raise DiffusersImportError(
            f"{base.root}: pipeline class {base.pipeline_class!r} is not supported; supported: {', '.join(PIPELINES)}"
        )
    flag = COMPANION_FLAGS.get(base.pipeline_class, "--refiner")
    for given, wrong in ((refiner_dir, "--refiner"), (sr_dir, "--sr")):
        if given is not None and wrong != flag:
            raise DiffusersImportError(f"{wrong} does not go with a {base.pipeline_class} (it takes {flag})")
    companion_dir = refiner_dir if refiner_dir is not None else sr_dir
    companion = PipelineFolder.open(companion_dir) if companion_dir is not None else None
    out_dir = Path(out_dir)
    check_out_dir(out_dir, [base.root] + ([companion.root] if companion else []), replace)
    plan = importer(base, companion, high_noise_frac)
    config = ModelConfig(
        name=name or default_model_name(base.root), encoders=plan.encoders, stages=plan.stages,
        training={"imported_from": str(base.root.resolve()), "pipeline": base.pipeline_class, **plan.provenance},
        defaults=request_defaults(base),
    )
    write_model_dir(out_dir, config, plan.components, copy, report)
    return config
