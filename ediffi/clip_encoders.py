"""Text conditioning of imported Stable Diffusion / SDXL checkpoints, computed
as their diffusers pipelines compute it, behind the interface of
`ediffi.encoders.Encoders` (so the engine's text cache, `encode_request` and
paint-with-words work unchanged).

Layout: each conditioning block (one per kind of expert: SDXL's base reads
both encoders' penultimate states, its refiner only the second encoder's)
owns a range of context columns and a range of pooled columns; blocks sit
side by side. A pooled block is [text_embeds | add_time_ids]; the time ids
depend on the request's size, so `add_micro_conditioning` fills them per
request after the (cached) prompt encoding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

from ediffi.config import ConditioningConfig, DiffusersEncodersConfig, T5TextEncoderConfig
from ediffi.encoders import TextEmbeddings
from ediffi.failure import InputError


class DiffusersTextEncoders(torch.nn.Module):
    """The CLIP text towers of an imported checkpoint and its conditioning blocks."""

    def __init__(self, model_dir: Path, cfg: DiffusersEncodersConfig):
        super().__init__()
        self.cfg = cfg
        self.tokenizers = {}
        towers = {}
        for enc in cfg.text_encoders:
            folder = model_dir / enc.path
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(f"text encoder {enc.name!r}: {folder} has no config.json")
            if isinstance(enc, T5TextEncoderConfig):
                model_class, tokenizer_class = T5EncoderModel, AutoTokenizer
            else:
                model_class = CLIPTextModelWithProjection if enc.with_projection else CLIPTextModel
                tokenizer_class = CLIPTokenizer
            towers[enc.name] = model_class.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
            self.tokenizers[enc.name] = tokenizer_class.from_pretrained(model_dir / enc.tokenizer_path, local_files_only=True)
        self.towers = torch.nn.ModuleDict(towers)
        self.context_columns: dict[str, tuple[int, int]] = {}
        self.pooled_columns: dict[str, tuple[int, int]] = {}
        context_at = pooled_at = 0
        for cond in cfg.conditionings:
            width = sum(self.towers[name].config.hidden_size for name in cond.encoders)
            self.context_columns[cond.name] = (context_at, context_at + width)
            context_at += width
            pooled = (self.towers[cond.pooled_from].config.projection_dim if cond.pooled_from else 0) + cond.time_ids_width
            self.pooled_columns[cond.name] = (pooled_at, pooled_at + pooled)
            pooled_at += pooled
        self._context_dim, self._pooled_dim = context_at, pooled_at
        lengths = {e.max_length for e in cfg.text_encoders}
        if len(lengths) != 1:
            raise ValueError(f"the text encoders must share one token length, got {sorted(lengths)}")
        self._length = lengths.pop()

    # -- the Encoders interface -------------------------------------------
    t5_length = 0  # no T5 tower: every context row is a CLIP token
    pooled_image_dim = 0  # no image encoder: no style images

    @property
    def clip_length(self) -> int:
        return self._length

    @property
    def context_length(self) -> int:
        return self._length

    @property
    def context_dim(self) -> int:
        return self._context_dim

    @property
    def pooled_dim(self) -> int:
        return self._pooled_dim

    @property
    def pooled_text_dim(self) -> int:
        return self._pooled_dim

    @property
    def has_image_encoder(self) -> bool:
        return False

    @property
    def device(self) -> torch.device:
        return next(self.towers.parameters()).device

    @torch.no_grad()
    def encode_text(self, prompts: list[str], use_t5: bool = True, use_clip_text: bool = True) -> TextEmbeddings:
        """Each tower once per prompt (padded to max_length, no attention mask,
        as diffusers' encode_prompt); then each block takes its columns.
        The encoder subset flags are for the project's own models (trained
        with embedding dropout) and do not apply here."""
        hidden, pooled_out, offsets = {}, {}, None
        mask = torch.ones(len(prompts), self._length, dtype=torch.bool, device=self.device)
        for enc in self.cfg.text_encoders:
            t5 = isinstance(enc, T5TextEncoderConfig)
            # IF lower-cases and strips the prompt; offsets are shifted back
            # onto the prompt as given (paint-with-words phrases).
            texts = [p.lower().strip() for p in prompts] if t5 else prompts
            batch = self.tokenizers[enc.name](
                texts, padding="max_length", max_length=enc.max_length, truncation=True,
                return_offsets_mapping=True, return_tensors="pt",
            )
            if offsets is None:
                shifts = [len(p) - len(p.lstrip()) if t5 else 0 for p in prompts]
                offsets = [
                    [(a + shift, b + shift) if b > a else (a, b) for a, b in row]
                    for row, shift in zip(batch["offset_mapping"].tolist(), shifts)
                ]
            # T5 sees its attention mask (IF's encode_prompt); CLIP does not
            # (SD's). The UNets get no mask either way, as in diffusers.
            extra = {"attention_mask": batch["attention_mask"].to(self.device)} if t5 else {}
            if t5:
                mask = batch["attention_mask"].bool().to(self.device)
            out = self.towers[enc.name](input_ids=batch["input_ids"].to(self.device), output_hidden_states=True, **extra)
            hidden[enc.name] = {"last": out.last_hidden_state, "penultimate": out.hidden_states[-2]}
            if not t5 and enc.with_projection:
                pooled_out[enc.name] = out.text_embeds
        b = len(prompts)
        dtype = next(self.towers.parameters()).dtype
        context = torch.zeros(b, self._length, self._context_dim, device=self.device, dtype=dtype)
        pooled = torch.zeros(b, self._pooled_dim, device=self.device, dtype=dtype)
        for cond in self.cfg.conditionings:
            start, stop = self.context_columns[cond.name]
            context[:, :, start:stop] = torch.cat([hidden[name][cond.hidden_state] for name in cond.encoders], dim=-1)
            if cond.pooled_from:
                p_start = self.pooled_columns[cond.name][0]
                text_embeds = pooled_out[cond.pooled_from]
                pooled[:, p_start : p_start + text_embeds.shape[1]] = text_embeds
        return TextEmbeddings(context, mask, pooled, [[] for _ in prompts], offsets)

    def empty_negative(self, encode_text) -> TextEmbeddings:
        """The unconditional rows for an empty negative prompt: the encoding of
        "" (SD), zeros where the checkpoint says force_zeros_for_empty_prompt
        (SDXL base; its refiner encodes "")."""
        empty = encode_text([""])
        context, pooled = empty.context.clone(), empty.pooled_text.clone()
        for cond in self.cfg.conditionings:
            if cond.empty_negative == "zeros":
                start, stop = self.context_columns[cond.name]
                context[:, :, start:stop] = 0
                p_start, p_stop = self.pooled_columns[cond.name]
                pooled[:, p_start:p_stop] = 0
        return TextEmbeddings(context, empty.context_mask, pooled, empty.t5_offsets, empty.clip_offsets)

    def add_micro_conditioning(self, pooled: torch.Tensor, height: int, width: int, negative: bool) -> torch.Tensor:
        """Fill SDXL's add_time_ids: (original size, crop top-left, target
        size) for the base, (original size, crop, aesthetic score) for the
        refiner, with the pipelines' defaults (original = target = the
        request's size, crop (0, 0); negative rows get the negative
        aesthetic score)."""
        pooled = pooled.clone()
        for cond in self.cfg.conditionings:
            if cond.micro_conditioning == "none":
                continue
            ids = time_ids(cond, height, width, negative)
            stop = self.pooled_columns[cond.name][1]
            pooled[:, stop - len(ids) : stop] = torch.tensor(ids, dtype=pooled.dtype, device=pooled.device)
        return pooled

    def encode_image(self, images: list[Image.Image]) -> torch.Tensor:
        raise InputError("style_image", "this model has no image encoder")


def time_ids(cond: ConditioningConfig, height: int, width: int, negative: bool) -> list[float]:
    size, crop = [float(height), float(width)], [0.0, 0.0]
    if cond.micro_conditioning == "size":
        return size + crop + size
    score = cond.negative_aesthetic_score if negative else cond.aesthetic_score
    return size + crop + [score]
