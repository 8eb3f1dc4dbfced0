"""Text and image encoders: T5 encoder, CLIP text and CLIP vision towers.

Each tower is a stock `transformers` class loaded from a local folder, so a
user with real T5/CLIP checkpoints points `model.json` at them. Our own small
towers (tests, the shipped shapes-world model) are saved in the same format
and loaded through the same code path.

Cross-attention context layout (docs/architecture.md §3 `context [B, L, D]`): T5 tokens
fill rows [0, L_t5) and columns [0, d_t5); CLIP text tokens fill rows
[L_t5, L_t5 + L_clip) and columns [d_t5, d_t5 + d_clip); the rest is zero.
The denoiser's key/value projection of this block layout equals a separate
projection per encoder, concatenated along L (eDiff-I §4.1) -- without a
second context input. The pooled vector is [pooled CLIP text | CLIP image
embedding]; an absent part is zeros (trained with embedding dropout).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from ediffi.config import EncodersConfig

ENCODER_NAMES = ("t5", "clip_text", "clip_image")

T5_SPECIALS = ["<pad>", "</s>", "<unk>"]
# CLIP's end-of-text id must not be 2: transformers treats eos_token_id == 2 as
# a legacy config and pools at argmax(input_ids) instead.
CLIP_SPECIALS = ["<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"]


# Neither T5 nor CLIP takes token_type_ids.
_INPUT_NAMES = ["input_ids", "attention_mask"]


def build_word_tokenizer(words: list[str], kind: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (lower-cased, split on whitespace/punctuation)
    with T5- or CLIP-style special tokens, built with `tokenizers`."""
    if kind not in ("t5", "clip"):
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    specials = T5_SPECIALS if kind == "t5" else CLIP_SPECIALS
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in sorted({w.lower() for w in words}):
        vocab.setdefault(word, len(vocab))
    unk = specials[2] if kind == "t5" else specials[1]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    if kind == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token=unk, model_input_names=_INPUT_NAMES
        )
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", vocab["<|startoftext|>"]), ("<|endoftext|>", vocab["<|endoftext|>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token=unk,
        model_input_names=_INPUT_NAMES,
    )


@dataclass(frozen=True)
class TinyEncoderSpec:
    """Sizes of the small T5/CLIP towers built for tests and the shapes world."""

    width: int = 32
    layers: int = 2
    heads: int = 4
    projection_dim: int = 32
    image_size: int = 32
    patch_size: int = 8


def build_tiny_encoders(
    out_dir: Path, words: list[str], cfg: EncodersConfig, spec: TinyEncoderSpec, seed: int = 0
) -> None:
    """Write randomly initialised T5/CLIP towers and their tokenizers under
    out_dir at the paths `cfg` names."""
    torch.manual_seed(seed)
    t5_tok = build_word_tokenizer(words, "t5")
    t5_cfg = T5Config(
        vocab_size=len(t5_tok), d_model=spec.width, d_kv=spec.width // spec.heads, d_ff=2 * spec.width,
        num_layers=spec.layers, num_heads=spec.heads, relative_attention_num_buckets=8, dropout_rate=0.0,
        pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=t5_tok.pad_token_id,
    )
    _save_tower(T5EncoderModel(t5_cfg), t5_tok, out_dir / cfg.t5.path)

    clip_tok = build_word_tokenizer(words, "clip")
    text_cfg = CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=spec.width, intermediate_size=2 * spec.width,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, max_position_embeddings=cfg.clip_text.max_length,
        projection_dim=spec.projection_dim, pad_token_id=clip_tok.pad_token_id, bos_token_id=clip_tok.bos_token_id,
        eos_token_id=clip_tok.eos_token_id, attention_dropout=0.0,
    )
    _save_tower(CLIPTextModelWithProjection(text_cfg), clip_tok, out_dir / cfg.clip_text.path)

    vision_cfg = CLIPVisionConfig(
        image_size=spec.image_size, patch_size=spec.patch_size, hidden_size=spec.width,
        intermediate_size=2 * spec.width, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        projection_dim=spec.projection_dim, num_channels=3,
    )
    vision_dir = out_dir / cfg.clip_vision.path
    _save_tower(CLIPVisionModelWithProjection(vision_cfg), None, vision_dir)
    CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        resample=Image.Resampling.BICUBIC,
    ).save_pretrained(vision_dir)


def _save_tower(model, tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _require_folder(folder: Path, role: str, needed: tuple[str, ...]) -> None:
    for name in needed:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{role} encoder folder {folder} is missing {name}")


@dataclass
class TextEmbeddings:
    """Encoded prompts: the context block layout, its mask, the pooled CLIP
    text embedding and each tokenizer's character offsets (for paint-with-words)."""

    context: torch.Tensor  # [B, L_t5 + L_clip, d_t5 + d_clip]
    context_mask: torch.Tensor  # [B, L]
    pooled_text: torch.Tensor  # [B, P_text]
    t5_offsets: list[list[tuple[int, int]]]
    clip_offsets: list[list[tuple[int, int]]]


class Encoders(torch.nn.Module):
    """The three conditioning towers with their tokenizers and image processor."""

    def __init__(self, model_dir: Path, cfg: EncodersConfig):
        super().__init__()
        t5_dir, clip_dir, vision_dir = (model_dir / cfg.t5.path, model_dir / cfg.clip_text.path, model_dir / cfg.clip_vision.path)
        _require_folder(t5_dir, "T5", ("config.json", "tokenizer.json"))
        _require_folder(clip_dir, "CLIP text", ("config.json", "tokenizer.json"))
        _require_folder(vision_dir, "CLIP vision", ("config.json", "preprocessor_config.json"))
        self.cfg = cfg
        load = dict(local_files_only=True)
        self.t5_tokenizer = PreTrainedTokenizerFast.from_pretrained(t5_dir, **load)
        self.clip_tokenizer = PreTrainedTokenizerFast.from_pretrained(clip_dir, **load)
        self.t5 = T5EncoderModel.from_pretrained(t5_dir, **load).eval()
        self.clip_text = CLIPTextModelWithProjection.from_pretrained(clip_dir, **load).eval()
        self.clip_vision = CLIPVisionModelWithProjection.from_pretrained(vision_dir, **load).eval()
        # Pillow's resize, named: the default class picks torchvision's where it is installed (other pixels)
        # and warns on every load where it is not.
        self.image_processor = CLIPImageProcessorPil.from_pretrained(vision_dir, **load)

    @property
    def t5_length(self) -> int:
        return self.cfg.t5.max_length

    @property
    def clip_length(self) -> int:
        return self.cfg.clip_text.max_length

    @property
    def t5_dim(self) -> int:
        return self.t5.config.d_model

    @property
    def clip_dim(self) -> int:
        return self.clip_text.config.hidden_size

    @property
    def context_length(self) -> int:
        return self.t5_length + self.clip_length

    @property
    def context_dim(self) -> int:
        return self.t5_dim + self.clip_dim

    @property
    def pooled_text_dim(self) -> int:
        return self.clip_text.config.projection_dim

    @property
    def pooled_image_dim(self) -> int:
        return self.clip_vision.config.projection_dim

    @property
    def pooled_dim(self) -> int:
        return self.pooled_text_dim + self.pooled_image_dim

    @property
    def device(self) -> torch.device:
        return next(self.t5.parameters()).device

    def _tokenize(self, tokenizer, prompts: list[str], length: int):
        batch = tokenizer(
            prompts, padding="max_length", truncation=True, max_length=length,
            return_offsets_mapping=True, return_tensors="pt",
        )
        offsets = [[tuple(map(int, pair)) for pair in row] for row in batch["offset_mapping"].tolist()]
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device), offsets

    @torch.no_grad()
    def encode_text(self, prompts: list[str], use_t5: bool = True, use_clip_text: bool = True) -> TextEmbeddings:
        """Token embeddings of both towers in the block layout; a tower that is
        not used contributes zeros and a false mask (its embedding dropped)."""
        b = len(prompts)
        dtype = next(self.t5.parameters()).dtype
        context = torch.zeros(b, self.context_length, self.context_dim, device=self.device, dtype=dtype)
        mask = torch.zeros(b, self.context_length, device=self.device, dtype=torch.bool)
        pooled = torch.zeros(b, self.pooled_text_dim, device=self.device, dtype=dtype)
        ids, attn, t5_offsets = self._tokenize(self.t5_tokenizer, prompts, self.t5_length)
        if use_t5:
            hidden = self.t5(input_ids=ids, attention_mask=attn).last_hidden_state
            context[:, : self.t5_length, : self.t5_dim] = hidden * attn[..., None]
            mask[:, : self.t5_length] = attn.bool()
        ids, attn, clip_offsets = self._tokenize(self.clip_tokenizer, prompts, self.clip_length)
        if use_clip_text:
            out = self.clip_text(input_ids=ids, attention_mask=attn)
            context[:, self.t5_length :, self.t5_dim :] = out.last_hidden_state * attn[..., None]
            mask[:, self.t5_length :] = attn.bool()
            pooled = F.normalize(out.text_embeds, dim=-1)
        return TextEmbeddings(context, mask, pooled, t5_offsets, clip_offsets)

    @property
    def has_image_encoder(self) -> bool:
        return True

    def empty_negative(self, encode_text) -> TextEmbeddings:
        """Unconditional rows for an empty negative prompt: all-null embeddings
        (the model was trained with each embedding dropped to zeros)."""
        like = encode_text([""])
        return TextEmbeddings(
            torch.zeros_like(like.context), torch.zeros_like(like.context_mask), torch.zeros_like(like.pooled_text),
            like.t5_offsets, like.clip_offsets,
        )

    def add_micro_conditioning(self, pooled: torch.Tensor, height: int, width: int, negative: bool) -> torch.Tensor:
        """No size conditioning in this project's models."""
        return pooled

    @torch.no_grad()
    def encode_image(self, images: list[Image.Image]) -> torch.Tensor:
        """The CLIP image embedding (unit norm): the style vector."""
        pixels = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return self.encode_pixels(pixels)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """`encode_image` from the image processor's pixel values."""
        dtype = next(self.clip_vision.parameters()).dtype
        out = self.clip_vision(pixel_values=pixels.to(self.device, dtype))
        return F.normalize(out.image_embeds, dim=-1)


def tokenizer_words(folder: Path) -> list[str]:
    """The word vocabulary of a saved word-level tokenizer (for rebuilding)."""
    data = json.loads((folder / "tokenizer.json").read_text())
    return list(data["model"]["vocab"].keys())
