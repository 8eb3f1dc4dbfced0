"""Tiny random diffusers pipelines (SD and SDXL base + refiner) built from
configs with diffusers/transformers classes and saved with `save_pretrained`,
as diffusers' own tests build their dummy components. No download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

WORDS = (
    "a an the of on in with and photo painting cat dog red blue green yellow house tree sky sun car "
    "castle mountain river top left right bottom big small"
).split()

# SDXL's scheduler config (EulerDiscreteScheduler, "leading" spacing) and SD
# 1.x's (PNDM; EulerDiscreteScheduler.from_config reads it with "linspace").
SDXL_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1,
    prediction_type="epsilon", num_train_timesteps=1000, interpolation_type="linear",
)
SD_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, skip_prk_steps=True,
    set_alpha_to_one=False, num_train_timesteps=1000,
)


def clip_tokenizer(words=WORDS, max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A real CLIP BPE tokenizer over a tiny vocabulary: every letter (alone
    and word-final), and merges that build each word of `words`."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab: dict[str, int] = {}
    for token in [*letters, *(c + "</w>" for c in letters), "!", "!</w>", ",</w>", ".</w>"]:
        vocab.setdefault(token, len(vocab))
    merges = []
    for word in WORDS if words is None else words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            if f"{current} {piece}" not in merges:
                merges.append(f"{current} {piece}")
            current += piece
            vocab.setdefault(current, len(vocab))
    # CLIP's specials come last (eos id far from 2, which transformers treats
    # as a legacy config).
    vocab.setdefault("<|startoftext|>", len(vocab))
    vocab.setdefault("<|endoftext|>", len(vocab))
    merges = [tuple(m.split(" ")) for m in merges]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, pad_token=pad_token)


def clip_text_encoder(tokenizer, hidden: int, projection: int | None, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    vocab = tokenizer.get_vocab()
    cfg = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=projection or hidden,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=tokenizer.pad_token_id, hidden_act="gelu",
    )
    model = CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)
    return model.eval()


def tiny_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32,
    ).eval()


def tiny_unet(seed: int, cross_attention_dim: int, sdxl_time_ids: int = 0, text_embeds_dim: int = 0, sample_size: int = 16,
              in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    extra = {}
    if sdxl_time_ids:
        extra = dict(
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * sdxl_time_ids + text_embeds_dim, use_linear_projection=True,
            transformer_layers_per_block=(1, 1),
        )
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=sample_size, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=(2, 4), norm_num_groups=8, **extra,
    )
    # Random (not near-zero) outputs and strong cross-attention, so the
    # prompt visibly changes the image and a conditioning bug cannot hide.
    with torch.no_grad():
        unet.conv_out.weight.normal_(0, 0.05)
        for name, module in unet.named_modules():
            if name.endswith(("attn2.to_out.0", "attn2.to_q", "attn2.to_k")):
                module.weight.normal_(0, 1.0)
    return unet.eval()


def build_tiny_sd_inpainting(folder: Path, seed: int = 30) -> Path:
    """A tiny SD inpainting checkpoint (as stable-diffusion-inpainting): a StableDiffusionInpaintPipeline
    folder whose UNet takes 9 channels, the latents, the mask and the masked image's latents."""
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline

    tokenizer = clip_tokenizer()
    unet = tiny_unet(seed + 2, cross_attention_dim=32, in_channels=9)
    with torch.no_grad():  # the mask and masked-image channels strongly felt, so a mistake in them shows
        unet.conv_in.weight[:, 4:].normal_(0, 1.0)
    pipe = StableDiffusionInpaintPipeline(
        vae=tiny_vae(seed), text_encoder=clip_text_encoder(tokenizer, 32, None, seed + 1), tokenizer=tokenizer,
        unet=unet, scheduler=PNDMScheduler(**SD_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    out = folder / "sd-inpainting"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_sdxl_inpainting(folder: Path, seed: int = 40) -> Path:
    """A tiny SDXL inpainting checkpoint (as stable-diffusion-xl-1.0-inpainting-0.1): a
    StableDiffusionXLInpaintPipeline folder whose UNet takes 9 channels."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline

    tokenizer = clip_tokenizer()
    tokenizer_2 = clip_tokenizer(pad_token="!")
    unet = tiny_unet(seed + 3, cross_attention_dim=32 + 48, sdxl_time_ids=6, text_embeds_dim=32, in_channels=9)
    with torch.no_grad():
        unet.conv_in.weight[:, 4:].normal_(0, 1.0)
    pipe = StableDiffusionXLInpaintPipeline(
        vae=tiny_vae(seed), text_encoder=clip_text_encoder(tokenizer, 32, None, seed + 1),
        text_encoder_2=clip_text_encoder(tokenizer_2, 48, 32, seed + 2), tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    out = folder / "sdxl-inpainting"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_sd(folder: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    tokenizer = clip_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed), text_encoder=clip_text_encoder(tokenizer, 32, None, seed + 1), tokenizer=tokenizer,
        unet=tiny_unet(seed + 2, cross_attention_dim=32),
        scheduler=PNDMScheduler(**SD_SCHEDULER, prediction_type=prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    out = folder / "sd"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_sdxl(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny SDXL base and its refiner (refiner: text_encoder_2 only,
    aesthetic-score time ids, force_zeros_for_empty_prompt false, as the
    released refiner)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    tokenizer = clip_tokenizer()
    tokenizer_2 = clip_tokenizer(pad_token="!")
    te1 = clip_text_encoder(tokenizer, 32, None, seed + 1)
    te2 = clip_text_encoder(tokenizer_2, 48, 32, seed + 2)
    base = StableDiffusionXLPipeline(
        vae=tiny_vae(seed), text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=tiny_unet(seed + 3, cross_attention_dim=32 + 48, sdxl_time_ids=6, text_embeds_dim=32),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=tiny_vae(seed + 4), text_encoder=None, text_encoder_2=te2, tokenizer=None, tokenizer_2=tokenizer_2,
        unet=tiny_unet(seed + 5, cross_attention_dim=48, sdxl_time_ids=5, text_embeds_dim=32),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False,
    )
    base_dir, refiner_dir = folder / "sdxl-base", folder / "sdxl-refiner"
    base.save_pretrained(base_dir, safe_serialization=True)
    refiner.save_pretrained(refiner_dir, safe_serialization=True)
    return base_dir, refiner_dir


def karras_euler(pipe):
    """The reference scheduler: EulerDiscreteScheduler with Karras sigmas from
    the checkpoint's own scheduler config."""
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def karras_dpmpp(pipe):
    """The reference "DPM++ 2M Karras": DPMSolverMultistepScheduler
    (DPM-Solver++, second order, Karras sigmas) from the checkpoint's own
    scheduler config."""
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, use_karras_sigmas=True, algorithm_type="dpmsolver++", solver_order=2
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def as_loaded(pipe):
    """The pipeline with the scheduler its folder names (SDXL's: EulerDiscreteScheduler, its own sigmas)."""
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_reference(checkpoints: Path, prompt: str, seed: int, steps: int, guidance: float, width: int, height: int,
                   high_noise_frac: float = 0.8, karras: bool = True):
    """diffusers' own SDXL base + refiner image: StableDiffusionXLPipeline(
    denoising_end=F, output_type="latent") then StableDiffusionXLImg2ImgPipeline(
    denoising_start=F), both with Euler + Karras sigmas, or (``karras=False``) with
    the schedulers as loaded (the documented ensemble-of-experts example)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    scheduler = karras_euler if karras else as_loaded
    base = scheduler(StableDiffusionXLPipeline.from_pretrained(
        checkpoints / "sdxl-base", use_safetensors=True, add_watermarker=False))
    refiner = scheduler(StableDiffusionXLImg2ImgPipeline.from_pretrained(
        checkpoints / "sdxl-refiner", use_safetensors=True, add_watermarker=False))
    kw = dict(num_inference_steps=steps, guidance_scale=guidance)
    latents = base(prompt, width=width, height=height, denoising_end=high_noise_frac, output_type="latent",
                   generator=torch.Generator().manual_seed(seed), **kw).images
    return refiner(prompt, image=latents, denoising_start=high_noise_frac,
                   generator=torch.Generator().manual_seed(seed), **kw).images[0]


def psnr(a, b) -> float:
    """PSNR in dB of two 8-bit images (PIL or arrays)."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# -- session fixtures (registered in conftest): built once per test session --

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_diffusers_dir(tmp_path_factory) -> Path:
    """Folder with tiny pipelines: sd/, sd-v/ (v-prediction), sdxl-base/, sdxl-refiner/."""
    pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("diffusers-checkpoints")
    build_tiny_sd(root, seed=0)
    v_root = root / "v"
    build_tiny_sd(v_root, prediction_type="v_prediction", seed=10).rename(root / "sd-v")
    build_tiny_sdxl(root, seed=20)
    return root


@pytest.fixture(scope="session")
def imported_sd_dir(tiny_diffusers_dir, tmp_path_factory) -> Path:
    from ediffi.importers.diffusers import import_diffusers

    out = tmp_path_factory.mktemp("imported") / "sd"
    import_diffusers(tiny_diffusers_dir / "sd", out)
    return out


@pytest.fixture(scope="session")
def imported_sdxl_dir(tiny_diffusers_dir, tmp_path_factory) -> Path:
    """The tiny SDXL base + refiner, imported by the CLI (high-noise-frac 0.8)."""
    from cli.main import main

    out = tmp_path_factory.mktemp("imported") / "sdxl"
    code = main([
        "import", "diffusers", str(tiny_diffusers_dir / "sdxl-base"), "--refiner", str(tiny_diffusers_dir / "sdxl-refiner"),
        "--high-noise-frac", "0.8", "--out", str(out),
    ])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def imported_sdxl(imported_sdxl_dir):
    from ediffi.model import load_model

    return load_model(imported_sdxl_dir)
