"""Tiny random DeepFloyd IF pipelines (stage I and stage II super-resolution)
built from small configs with diffusers/transformers classes and saved with
`save_pretrained`, as diffusers' own IF tests build their dummy components,
plus the reference images diffusers itself makes from them. No download.

The UNets carry IF's options: learned-variance output (out_channels = 2 *
image channels), T5 hidden states projected by `encoder_hid_dim` ("text_proj"),
pooled text added to the time embedding (`addition_embed_type="text"`),
added-KV cross-attention blocks (`SimpleCrossAttn*`), scale-shift ResNets;
stage II also concatenates the upsampled image to its input and embeds the
noise level as a class label (`class_embed_type="timestep"`). The schedulers
are IF's DDPM configs with dynamic thresholding, and stage II's image-noising
scheduler.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ediffi.encoders import build_word_tokenizer

WORDS = (
    "a an the of on in with and photo painting cat dog red blue green yellow house tree sky sun car "
    "castle mountain river top left right bottom big small"
).split()

T5_WIDTH = 32
STAGE_I_SIZE = 16
STAGE_II_SIZE = 32

# IF's DDPM scheduler configs (DeepFloyd/IF-I-XL-v1.0, IF-II-L-v1.0): cosine
# schedule, learned-range variance, Imagen dynamic thresholding.
STAGE_I_SCHEDULER = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02,
    thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5, clip_sample=True,
    prediction_type="epsilon", variance_type="learned_range",
)
STAGE_II_SCHEDULER = {**STAGE_I_SCHEDULER, "sample_max_value": 1.0}
IMAGE_NOISING_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02)


@dataclass(frozen=True)
class TinyIF:
    stage_1: Path
    stage_2: Path


def tiny_t5(seed: int):
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_word_tokenizer(WORDS, "t5")
    # Case-sensitive, as T5's sentencepiece model: "A" is not "a", so IF's
    # lower-casing of the prompt shows.
    tokenizer.backend_tokenizer.normalizer = None
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=8, d_ff=2 * T5_WIDTH, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )
    return tokenizer, T5EncoderModel(config).eval()


def write_sentencepiece_t5_tokenizer(folder: Path, vocab_size: int) -> None:
    """The ``tokenizer`` folder of a pipeline as the released IF-I checkpoints
    ship it: a sentencepiece model (``spiece.model``, T5's ids: pad 0, eos 1,
    unk 2) and ``tokenizer_config.json``, no ``tokenizer.json``, the class
    ``T5Tokenizer`` in ``model_index.json``. Trained here on WORDS."""
    import sentencepiece

    folder.mkdir(parents=True)
    sentences = [" ".join(WORDS[k:] + WORDS[:k]) for k in range(len(WORDS))]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences * 4), model_prefix=str(folder / "spiece"), vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )
    (folder / "spiece.vocab").unlink()
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 77,
              "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    index_path = folder.parent / "model_index.json"  # the released model_index.json names the class too
    index = json.loads(index_path.read_text())
    index["tokenizer"] = ["transformers", "T5Tokenizer"]
    index_path.write_text(json.dumps(index))


def tiny_if_unet(seed: int, sample_size: int, super_resolution: bool):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    extra = {}
    if super_resolution:
        extra = dict(class_embed_type="timestep", mid_block_scale_factor=1.414, time_embedding_act_fn="gelu")
    unet = UNet2DConditionModel(
        sample_size=sample_size, layers_per_block=1, block_out_channels=[16, 32],
        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
        in_channels=6 if super_resolution else 3, out_channels=6, norm_num_groups=8,
        cross_attention_dim=32, encoder_hid_dim=T5_WIDTH, encoder_hid_dim_type="text_proj", attention_head_dim=8,
        addition_embed_type="text", addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift", act_fn="gelu", **extra,
    )
    # Random (not near-zero) outputs, so the conditioning visibly matters.
    with torch.no_grad():
        unet.conv_out.weight.normal_(0, 0.05)
    return unet.eval()


def build_tiny_if(folder: Path, seed: int = 0) -> TinyIF:
    """Stage I (an IFPipeline folder with T5 and its tokenizer) and stage II
    (an IFSuperResolutionPipeline folder that, as the released stage II is
    used in diffusers' IF example, reuses stage I's text embeddings)."""
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline

    tokenizer, t5 = tiny_t5(seed)
    stage_1 = IFPipeline(
        tokenizer=tokenizer, text_encoder=t5, unet=tiny_if_unet(seed + 1, STAGE_I_SIZE, super_resolution=False),
        scheduler=DDPMScheduler(**STAGE_I_SCHEDULER), safety_checker=None, feature_extractor=None,
        watermarker=None, requires_safety_checker=False,
    )
    stage_2 = IFSuperResolutionPipeline(
        tokenizer=None, text_encoder=None, unet=tiny_if_unet(seed + 2, STAGE_II_SIZE, super_resolution=True),
        scheduler=DDPMScheduler(**STAGE_II_SCHEDULER), image_noising_scheduler=DDPMScheduler(**IMAGE_NOISING_SCHEDULER),
        safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False,
    )
    out = TinyIF(folder / "if-stage-1", folder / "if-stage-2")
    stage_1.save_pretrained(out.stage_1, safe_serialization=True)
    stage_2.save_pretrained(out.stage_2, safe_serialization=True)
    return out


def dpmpp_2m_karras(pipe, karras: bool = True):
    """The reference scheduler: DPM-Solver++(2M) with Karras sigmas (or, ``karras=False``, its own
    spaced ones) from the checkpoint's own scheduler config (diffusers' Euler cannot take IF's
    learned-variance output)."""
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=karras
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_if_pipelines(checkpoints: TinyIF, karras: bool = True, scheduler_class=None, **scheduler_options):
    """Both stages with DPM++ 2M (Karras's sigmas or, ``karras`` false, its own), or with
    ``scheduler_class.from_config`` of each stage's scheduler config (and ``scheduler_options``)."""
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    stage_1 = IFPipeline.from_pretrained(checkpoints.stage_1, local_files_only=True)
    stage_2 = IFSuperResolutionPipeline.from_pretrained(
        checkpoints.stage_2, text_encoder=None, tokenizer=None, local_files_only=True
    )
    if scheduler_class is not None:
        for stage in (stage_1, stage_2):
            # IF's pipelines pass a learned-variance output on whole to a scheduler whose config says
            # variance_type "learned_range" (from_config carries the key over); DDIM and PNDM take eps only.
            stage.scheduler = scheduler_class.from_config({**stage.scheduler.config, "variance_type": "fixed_small"},
                                                          **scheduler_options)
        return stage_1, stage_2
    return dpmpp_2m_karras(stage_1, karras), dpmpp_2m_karras(stage_2, karras)


@torch.no_grad()
def diffusers_if_images(
    checkpoints: TinyIF, prompt: str, seed: int, steps: int, guidance: float, negative_prompt: str | None = None,
    noise_level: int | None = None, karras: bool = True, scheduler_class=None, **scheduler_options,
):
    """(stage I image, stage II image) as 8-bit arrays from diffusers' IF
    example: one CPU generator seeded with `seed` passed to both stages, the
    prompt encoded once by stage I, stage I's raw output ("pt") upscaled by
    stage II at its default noise level (unless `noise_level` is given)."""
    stage_1, stage_2 = load_if_pipelines(checkpoints, karras, scheduler_class, **scheduler_options)
    prompt_embeds, negative_embeds = stage_1.encode_prompt(prompt, negative_prompt=negative_prompt, clean_caption=False)
    generator = torch.Generator().manual_seed(seed)
    common = dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, generator=generator,
                  num_inference_steps=steps, guidance_scale=guidance)
    low = stage_1(**common, output_type="pt").images
    sr_kwargs = {} if noise_level is None else {"noise_level": noise_level}
    high = stage_2(image=low, **common, **sr_kwargs, output_type="pt").images
    return to_uint8(low)[0], to_uint8(high)[0]


@torch.no_grad()
def diffusers_if_images_as_loaded(checkpoints: TinyIF, prompt: str, seed: int, steps: int, guidance: float, n: int):
    """(stage I images, stage II images), n of each as 8-bit arrays, from both pipelines as loaded (their
    DDPMScheduler: learned variance, dynamic thresholding), one CPU generator per image seeded seed + k,
    each passed on from stage I to stage II (this server's image k: seed + k)."""
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    stage_1 = IFPipeline.from_pretrained(checkpoints.stage_1, local_files_only=True)
    stage_2 = IFSuperResolutionPipeline.from_pretrained(checkpoints.stage_2, text_encoder=None, tokenizer=None,
                                                        local_files_only=True)
    for stage in (stage_1, stage_2):
        stage.set_progress_bar_config(disable=True)
    prompt_embeds, negative_embeds = stage_1.encode_prompt(prompt, clean_caption=False)
    generators = [torch.Generator().manual_seed(seed + k) for k in range(n)]
    common = dict(generator=generators, num_inference_steps=steps, guidance_scale=guidance)
    low = stage_1(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, num_images_per_prompt=n,
                  output_type="pt", **common).images
    high = stage_2(image=low, prompt_embeds=prompt_embeds.repeat(n, 1, 1), negative_prompt_embeds=negative_embeds.repeat(n, 1, 1),
                   output_type="pt", **common).images
    return list(to_uint8(low)), list(to_uint8(high))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """diffusers' post-processing: [-1, 1] -> clamp to [0, 1] -> round(255 x)."""
    array = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()
    return (array * 255).round().astype(np.uint8)
