"""Training a small eDiff-I on the shapes world (`ediffi train`).

Phases, each resumable from its own periodic checkpoint under the run folder:

1. `encoders`: word-level tokenizers; a small T5 encoder and a small CLIP
   (text and vision towers) trained contrastively on (caption, image) pairs.
   The contrastive captions also name the background style, as a real CLIP's
   web captions describe style, so the image embedding carries it. The
   diffusion captions never name the style: only the image embedding can.
2. `base_root`: one base-stage denoiser on all noise levels.
3. Expert splitting as in eDiff-I §3.2 (a binary tree, each child initialised
   from its parent, fine-tuned on its own interval): `base_high` and
   `base_lowmid` from the root; `base_mid` and `base_low` from `base_lowmid`.
4. `sr_root`, then `sr_high` and `sr_low`: the 32 -> 64 px SR stage.
5. `baseline`: the root continued on all noise levels for as many updates as
   the splits took, so the single model gets the same number of updates.

Paint-with-words-aware training (an addition to the paper, whose §4.3 method
is training-free; `pww_train_prob`, off by default): a share of samples gets
each object's phrase painted over a region of grid cells that contains the
object, with a random strength, through the same cross-attention bias that
inference uses; the model learns to follow a painted region.

Runs on CPU or one CUDA device (`device`); batches are built on the CPU, in
`data_workers` DataLoader processes when > 0, deterministically per (phase,
step). A `deadline` (wall clock) ends phases early so a lent machine's time
is never overrun; the log and the checkpoint record the steps actually taken.

Denoisers use the EDM loss (Karras et al. 2022, eq. 2 with Table 1's
lambda(sigma) and ln(sigma) ~ N(P_mean, P_std^2), truncated to the expert's
interval), embedding dropout per encoder, and an EMA of the weights.
The style embedding of a training image comes from *another* image of the
same style, so the model learns style, not content, from it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ediffi.config import EncodersConfig, ModelConfig, StageConfig, TextEncoderConfig, UNetConfig, VisionEncoderConfig
from ediffi.edm import P_MEAN, P_STD, EDMDenoiser, edm_loss_weight
from ediffi.encoders import Encoders, TinyEncoderSpec, build_tiny_encoders
from ediffi.model import experts_for, save_expert
from ediffi.paint import phrase_span, tokens_in_span
from ediffi.world import COLORS, POSITIONS, SHAPES, render, sample_scene
from ediffi.world.shapes import cell_bounds

STYLE_WORDS = {"plain": "plain style", "night": "night style", "stripes": "striped style", "gradient": "gradient style"}


@dataclass
class TrainConfig:
    seed: int = 0
    threads: int = 2
    device: str = "cpu"  # "cpu" or "cuda[:N]"
    data_workers: int = 0  # DataLoader processes building batches (0: in the training process)
    encoder_data_workers: int | None = None  # the same for the encoders, which train alone (None: data_workers)
    batch: int = 24
    encoder_steps: int = 800
    encoder_batch: int = 128
    base_root_steps: int = 2400
    base_split1_steps: int = 600
    base_split2_steps: int = 400
    sr_root_steps: int = 1200
    sr_split_steps: int = 300
    lr: float = 5e-4
    finetune_lr: float = 2e-4
    ema_decay: float = 0.999
    checkpoint_every: int = 200
    # Embedding dropout (per sample, per encoder) and the all-null rate that
    # trains the unconditional model for classifier-free guidance.
    drop_t5: float = 0.15
    drop_clip_text: float = 0.15
    drop_image: float = 0.2
    drop_all: float = 0.1
    # Extra dropout of the pooled CLIP text vector alone: the tokens still say
    # everything through cross-attention, which is where paint-with-words
    # acts, so the model must not lean on the global vector for what to draw.
    drop_pooled_text: float = 0.0
    # Share of samples trained with their objects' phrases painted (see the
    # module docstring) and the largest strength w' drawn for them.
    pww_train_prob: float = 0.0
    pww_train_max_strength: float = 1.0
    base_boundaries: tuple[float, float] = (2.5, 0.4)  # high|mid, mid|low
    # ln(sigma) ~ N(mean, std^2) for the base stage. EDM's (-1.2, 1.2) puts
    # only ~4% of samples above sigma 2.5, where the 32 px layout (which
    # object goes where) is decided; text alignment needs more of them.
    base_sigma_p_mean: float = P_MEAN
    base_sigma_p_std: float = P_STD
    sr_boundary: float = 1.0
    sr_train_aug_max: float = 0.2
    sr_infer_aug: float = 0.05
    text_length: int = 24
    encoder: TinyEncoderSpec = field(
        default_factory=lambda: TinyEncoderSpec(width=64, layers=2, heads=4, projection_dim=64, image_size=32, patch_size=8)
    )
    base_net: dict = field(
        default_factory=lambda: dict(
            model_channels=48, channel_mult=[1, 2, 2], num_res_blocks=1, attention_resolutions=[16, 8],
            num_heads=4, embedding_dim=192, groups=8,
        )
    )
    sr_net: dict = field(
        default_factory=lambda: dict(
            model_channels=24, channel_mult=[1, 2, 2], num_res_blocks=1, attention_resolutions=[16],
            num_heads=4, embedding_dim=128, groups=8, low_res_channels=3,
        )
    )


def train_config_from_overrides(overrides: dict) -> TrainConfig:
    """TrainConfig with JSON overrides (nested `encoder` as a dict)."""
    overrides = dict(overrides)
    if isinstance(overrides.get("encoder"), dict):
        overrides["encoder"] = TinyEncoderSpec(**overrides["encoder"])
    if "base_boundaries" in overrides:
        overrides["base_boundaries"] = tuple(overrides["base_boundaries"])
    return dataclasses.replace(TrainConfig(), **overrides)


def load_train_config(path: Path | None) -> TrainConfig:
    """TrainConfig from a JSON file of overrides. A file may name another
    under "extends" (relative to itself): its overrides apply first, so a
    recipe's variants (GPU, continuation, CPU) state only what differs."""
    return train_config_from_overrides(_config_overrides(path) if path is not None else {})


def _config_overrides(path: Path) -> dict:
    overrides = json.loads(path.read_text())
    parent = overrides.pop("extends", None)
    return (_config_overrides(path.parent / parent) if parent else {}) | overrides


def world_vocabulary() -> list[str]:
    """Every word the shapes world's captions (and CLIP's style phrases) use."""
    rng = np.random.default_rng(1234)
    words: set[str] = set()
    for _ in range(4000):
        words.update(re.findall(r"\w+|[^\w\s]", sample_scene(rng, exclude_heldout=False).caption.lower()))
    for phrase in [*COLORS, *SHAPES, *POSITIONS, *STYLE_WORDS.values(), "middle", "center", "an", "and"]:
        words.update(phrase.split())
    return sorted(words)


def encoders_config(cfg: TrainConfig) -> EncodersConfig:
    return EncodersConfig(
        t5=TextEncoderConfig(path="encoders/t5", max_length=cfg.text_length),
        clip_text=TextEncoderConfig(path="encoders/clip_text", max_length=cfg.text_length),
        clip_vision=VisionEncoderConfig(path="encoders/clip_vision"),
    )


# ---------------------------------------------------------------- data


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float [-1,1] [B,3,H,W]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def batch_of_scenes(rng: np.random.Generator, n: int):
    """Scenes, their 64 px renders, and a same-style reference render each."""
    scenes = [sample_scene(rng) for _ in range(n)]
    images = np.stack([render(s, jitter_rng=rng) for s in scenes])
    references = []
    for s in scenes:
        while True:
            other = sample_scene(rng)
            if other.style == s.style:
                break
        references.append(render(other, jitter_rng=rng))
    return scenes, images, np.stack(references)


def phase_rng(seed: int, phase: str, step: int) -> np.random.Generator:
    """A generator per (phase, step): resuming replays exactly the same data."""
    return np.random.default_rng([seed, sum(map(ord, phase)) * 7919 + len(phase), step])


def painted_region(rng: np.random.Generator, cell: int, avoid: set[int]) -> tuple[int, int, int, int]:
    """Cell rows/cols (r0, r1, c0, c1), inclusive, of a painted rectangle that
    contains `cell` and none of the `avoid` cells: half the time the cell
    alone (as the eval paints), else a random block of cells around it (as a
    user paints a third of the canvas)."""
    row, col = divmod(cell, 3)
    if rng.random() < 0.5:
        return row, row, col, col
    r0, r1 = int(rng.integers(0, row + 1)), int(rng.integers(row, 3))
    c0, c1 = int(rng.integers(0, col + 1)), int(rng.integers(col, 3))
    if any(r0 <= a // 3 <= r1 and c0 <= a % 3 <= c1 for a in avoid):
        return row, row, col, col
    return r0, r1, c0, c1


def region_mask(block: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Float (size, size) mask of a block of cells."""
    r0, r1, c0, c1 = block
    x0, y0, _, _ = cell_bounds(r0 * 3 + c0, size)
    _, _, x1, y1 = cell_bounds(r1 * 3 + c1, size)
    mask = np.zeros((size, size), dtype=np.float32)
    mask[y0:y1, x0:x1] = 1.0
    return mask


class DenoiserBatches(torch.utils.data.Dataset):
    """Step -> that step's training batch, built on the CPU: the 64 px renders,
    captions, the same-style reference's CLIP pixels and, for painted samples,
    the regions and the context columns of their phrases. Indexed by step, so
    DataLoader workers and resumption give the same data as one process."""

    def __init__(self, cfg: TrainConfig, phase: str, steps: int, enc: Encoders, image_size: int):
        self.cfg, self.phase, self.steps, self.image_size = cfg, phase, steps, image_size
        self.image_processor = enc.image_processor
        self.t5_tokenizer, self.clip_tokenizer = enc.t5_tokenizer, enc.clip_tokenizer
        self.t5_length, self.clip_length = enc.t5_length, enc.clip_length

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> dict:
        rng = phase_rng(self.cfg.seed, self.phase, step)
        seed = int(rng.integers(2**62))
        scenes, images, references = batch_of_scenes(rng, self.cfg.batch)
        pixels = self.image_processor(images=[Image.fromarray(r) for r in references], return_tensors="pt")["pixel_values"]
        batch = dict(seed=seed, captions=[s.caption for s in scenes], images=torch.from_numpy(images), reference_pixels=pixels)
        batch.update(self._paint(rng, scenes))
        return batch

    def _paint(self, rng: np.random.Generator, scenes) -> dict:
        """Regions [R, S, S], (sample, column, region) rows, strength per sample."""
        regions, rows = [], []
        strength = np.zeros(len(scenes), dtype=np.float32)
        painted = [i for i in range(len(scenes)) if rng.random() < self.cfg.pww_train_prob]
        if painted:
            captions = [scenes[i].caption for i in painted]
            offsets = [
                tok(captions, padding="max_length", truncation=True, max_length=length, return_offsets_mapping=True)["offset_mapping"]
                for tok, length in ((self.t5_tokenizer, self.t5_length), (self.clip_tokenizer, self.clip_length))
            ]
            for j, i in enumerate(painted):
                scene = scenes[i]
                strength[i] = rng.uniform(0.1, 1.0) * self.cfg.pww_train_max_strength
                cells = {o.cell for o in scene.objects}
                for obj in scene.objects:
                    span = phrase_span(scene.caption, obj.phrase, "caption")
                    columns = tokens_in_span(offsets[0][j], span) + [self.t5_length + c for c in tokens_in_span(offsets[1][j], span)]
                    regions.append(region_mask(painted_region(rng, obj.cell, cells - {obj.cell}), self.image_size))
                    rows += [(i, c, len(regions) - 1) for c in columns]
        return dict(
            paint_regions=torch.from_numpy(np.stack(regions)) if regions else torch.zeros(0, self.image_size, self.image_size),
            paint_rows=torch.tensor(rows, dtype=torch.long).reshape(-1, 3),
            paint_strength=torch.from_numpy(strength),
        )


class EncoderBatches(torch.utils.data.Dataset):
    """Step -> the contrastive batch: caption + style texts, their token ids
    for both text towers, and the images' CLIP pixels."""

    def __init__(self, cfg: TrainConfig, enc: Encoders):
        self.cfg = cfg
        self.image_processor = enc.image_processor
        self.t5_tokenizer, self.clip_tokenizer = enc.t5_tokenizer, enc.clip_tokenizer

    def __len__(self) -> int:
        return self.cfg.encoder_steps

    def __getitem__(self, step: int) -> dict:
        rng = phase_rng(self.cfg.seed, "encoders", step)
        scenes = [sample_scene(rng) for _ in range(self.cfg.encoder_batch)]
        images = [Image.fromarray(render(s, jitter_rng=rng)) for s in scenes]
        texts = [f"{s.caption}, {STYLE_WORDS[s.style]}" for s in scenes]
        tokenize = lambda tok: dict(tok(texts, padding="max_length", truncation=True, max_length=self.cfg.text_length, return_tensors="pt"))  # noqa: E731
        # Captions repeat within a batch: an image's targets are all texts equal to its own.
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
        return dict(
            targets=same / same.sum(1, keepdim=True),
            pixels=self.image_processor(images=images, return_tensors="pt")["pixel_values"],
            clip_ids=tokenize(self.clip_tokenizer),
            t5_ids=tokenize(self.t5_tokenizer),
        )


def step_loader(dataset: torch.utils.data.Dataset, start: int, workers: int) -> torch.utils.data.DataLoader:
    """Batches of steps start.. in order (each item is already a batch)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(start, len(dataset)), num_workers=workers,
        prefetch_factor=4 if workers else None, pin_memory=False,
    )


# ---------------------------------------------------------------- checkpoints


class Checkpoints:
    def __init__(self, run_dir: Path):
        self.dir = run_dir / "checkpoints"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = run_dir / "train.log.jsonl"

    def path(self, phase: str) -> Path:
        return self.dir / f"{phase}.pt"

    def done(self, phase: str) -> bool:
        p = self.path(phase)
        return p.is_file() and torch.load(p, map_location="cpu", weights_only=False).get("finished", False)

    def load(self, phase: str) -> dict | None:
        p = self.path(phase)
        return torch.load(p, map_location="cpu", weights_only=False) if p.is_file() else None

    def save(self, phase: str, state: dict) -> None:
        tmp = self.path(phase).with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path(phase))  # atomic: a kill mid-save leaves the old checkpoint

    def log(self, record: dict) -> None:
        """Append a record. A phase's last record says `"finished": true` and
        is written after its final checkpoint, so a script may wait on it."""
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")


def end_of_phase(last: bool, stopped_at_deadline: bool) -> dict:
    """Fields of a log record that say a phase ended (and why early)."""
    return ({"finished": True} if last else {}) | ({"stopped_at_deadline": True} if stopped_at_deadline else {})


# ---------------------------------------------------------------- encoders


def train_encoders(cfg: TrainConfig, run_dir: Path, ckpt: Checkpoints, deadline: float | None = None) -> Path:
    """Contrastive training of the T5 and CLIP towers (CLIP's InfoNCE loss);
    T5 learns through a mean-pooled projection head discarded afterwards."""
    enc_dir = run_dir / "encoders_model"
    enc_cfg = encoders_config(cfg)
    if ckpt.done("encoders"):
        return enc_dir
    if not (enc_dir / enc_cfg.t5.path).is_dir():
        build_tiny_encoders(enc_dir, world_vocabulary(), enc_cfg, cfg.encoder, seed=cfg.seed)
    device = torch.device(cfg.device)
    enc = Encoders(enc_dir, enc_cfg)
    enc.to(device)
    enc.train()
    t5_head = torch.nn.Linear(enc.t5_dim, cfg.encoder.projection_dim).to(device)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))
    params = [*enc.t5.parameters(), *enc.clip_text.parameters(), *enc.clip_vision.parameters(), *t5_head.parameters(), logit_scale]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    start = 0
    state = ckpt.load("encoders")
    if state:
        enc.load_state_dict(state["encoders"])
        t5_head.load_state_dict(state["t5_head"])
        logit_scale.data.copy_(state["logit_scale"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    t0 = time.time()
    workers = cfg.data_workers if cfg.encoder_data_workers is None else cfg.encoder_data_workers
    for step, batch in enumerate(step_loader(EncoderBatches(cfg, enc), start, workers), start=start):
        image_emb = F.normalize(enc.clip_vision(pixel_values=batch["pixels"].to(device)).image_embeds, dim=-1)
        clip_ids = {k: v.to(device) for k, v in batch["clip_ids"].items()}
        text_emb = F.normalize(enc.clip_text(**clip_ids).text_embeds, dim=-1)
        t5_ids = {k: v.to(device) for k, v in batch["t5_ids"].items()}
        hidden = enc.t5(**t5_ids).last_hidden_state
        pooled = (hidden * t5_ids["attention_mask"][..., None]).sum(1) / t5_ids["attention_mask"].sum(1, keepdim=True)
        t5_emb = F.normalize(t5_head(pooled), dim=-1)
        scale = logit_scale.exp().clamp(max=100)
        targets = batch["targets"].to(device)
        loss = 0.0
        for emb in (text_emb, t5_emb):
            logits = scale * emb @ image_emb.T
            loss = loss + 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
        opt.zero_grad()
        loss.backward()
        opt.step()
        stop = deadline is not None and time.time() >= deadline
        last = step + 1 == cfg.encoder_steps or stop
        if (step + 1) % cfg.checkpoint_every == 0 or last:
            ckpt.save("encoders", dict(encoders=enc.state_dict(), t5_head=t5_head.state_dict(),
                                       logit_scale=logit_scale.data, opt=opt.state_dict(), step=step + 1, finished=last))
        if (step + 1) % 50 == 0 or last:
            ckpt.log({"phase": "encoders", "step": step + 1, "loss": float(loss.detach()), "elapsed_s": time.time() - t0}
                     | end_of_phase(last, stop))
        if stop:
            break
    enc.eval()
    enc.to("cpu")
    enc.t5.save_pretrained(enc_dir / enc_cfg.t5.path, safe_serialization=True)
    enc.clip_text.save_pretrained(enc_dir / enc_cfg.clip_text.path, safe_serialization=True)
    enc.clip_vision.save_pretrained(enc_dir / enc_cfg.clip_vision.path, safe_serialization=True)
    return enc_dir


# ---------------------------------------------------------------- denoisers


def sample_sigma(n: int, lo: float, hi: float, generator: torch.Generator,
                 p_mean: float = P_MEAN, p_std: float = P_STD) -> torch.Tensor:
    """ln(sigma) ~ N(p_mean, p_std^2) truncated to [lo, hi) by inverse CDF,
    on the generator's device."""
    cdf = lambda x: 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))  # noqa: E731
    a = cdf((math.log(lo) - p_mean) / p_std) if lo > 0 else 0.0
    b = cdf((math.log(hi) - p_mean) / p_std) if math.isfinite(hi) else 1.0
    u = a + (b - a) * torch.rand(n, generator=generator, device=generator.device)
    z = torch.special.ndtri(u.clamp(1e-6, 1 - 1e-6))
    return (p_mean + p_std * z).exp()


@dataclass
class PhaseSpec:
    name: str
    stage: str  # "base" | "sr"
    steps: int
    sigma_lo: float
    sigma_hi: float
    parent: str | None
    lr: float


def conditioning_batch(enc: Encoders, cfg: TrainConfig, captions: list[str], reference_pixels: torch.Tensor,
                       generator: torch.Generator):
    """Context, mask and pooled vectors with per-sample embedding dropout."""
    b = len(captions)
    keep = lambda p: torch.rand(b, generator=generator, device=generator.device) >= p  # noqa: E731
    keep_all = keep(cfg.drop_all)
    keep_t5, keep_clip, keep_image = keep(cfg.drop_t5) & keep_all, keep(cfg.drop_clip_text) & keep_all, keep(cfg.drop_image) & keep_all
    with torch.no_grad():
        text = enc.encode_text(captions)
        image = enc.encode_pixels(reference_pixels)
    context, mask = text.context.clone(), text.context_mask.clone()
    t5_rows, t5_cols = slice(0, enc.t5_length), slice(0, enc.t5_dim)
    clip_rows = slice(enc.t5_length, enc.context_length)
    context[~keep_t5, t5_rows, t5_cols] = 0
    mask[~keep_t5, t5_rows] = False
    context[~keep_clip, clip_rows] = 0
    mask[~keep_clip, clip_rows] = False
    keep_pooled_text = keep_clip & keep(cfg.drop_pooled_text)
    pooled_text = text.pooled_text * keep_pooled_text[:, None]
    pooled_image = image * keep_image[:, None]
    return context, mask, torch.cat([pooled_text, pooled_image], dim=1)


def network_config(cfg: TrainConfig, stage: str, enc: Encoders) -> UNetConfig:
    net = cfg.base_net if stage == "base" else cfg.sr_net
    return UNetConfig(**net, context_dim=enc.context_dim, pooled_dim=enc.pooled_dim)


def painted_masks(batch: dict, b: int, length: int, size: int, device: torch.device) -> torch.Tensor:
    """pww_mask [B, L, S, S]: each painted phrase's region in its columns."""
    pww = torch.zeros(b, length, size, size, device=device)
    rows = batch["paint_rows"]
    if len(rows):
        regions = batch["paint_regions"].to(device)
        pww[rows[:, 0].to(device), rows[:, 1].to(device)] = regions[rows[:, 2].to(device)]
    return pww


def train_denoiser(cfg: TrainConfig, phase: PhaseSpec, enc: Encoders, ckpt: Checkpoints, deadline: float | None = None) -> None:
    if ckpt.done(phase.name):
        return
    device = torch.device(cfg.device)
    image_size = 32 if phase.stage == "base" else 64
    net = EDMDenoiser(network_config(cfg, phase.stage, enc), image_size)
    # channels_last: mkldnn convolutions run ~15% faster on this CPU.
    net.to(device, memory_format=torch.channels_last)
    state = ckpt.load(phase.name)
    start = 0
    if state is None and phase.parent is not None:
        parent = ckpt.load(phase.parent)
        if parent is None or not parent.get("finished"):
            raise RuntimeError(f"phase {phase.name} needs its parent {phase.parent} finished first")
        # A child starts from its parent's (EMA) weights (eDiff-I §3.2).
        net.load_state_dict(parent["ema"])
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=phase.lr, weight_decay=0.0)
    if state is not None:
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    generator = torch.Generator(device=device)
    net_params, ema_params = list(net.parameters()), list(ema.parameters())
    t0, loss_sum, loss_count = time.time(), torch.zeros((), device=device), 0
    data = DenoiserBatches(cfg, phase.name, phase.steps, enc, image_size)
    for step, batch in enumerate(step_loader(data, start, cfg.data_workers), start=start):
        generator.manual_seed(batch["seed"])
        x64 = to_tensor(batch["images"].numpy()).to(device).contiguous(memory_format=torch.channels_last)
        x_low = F.avg_pool2d(x64, 2)  # the 32 px area-downsampled image
        context, mask, pooled = conditioning_batch(enc, cfg, batch["captions"], batch["reference_pixels"], generator)
        target = x_low if phase.stage == "base" else x64
        b = target.shape[0]
        if phase.stage == "base":
            sigma = sample_sigma(b, phase.sigma_lo, phase.sigma_hi, generator, cfg.base_sigma_p_mean, cfg.base_sigma_p_std)
        else:
            sigma = sample_sigma(b, phase.sigma_lo, phase.sigma_hi, generator)
        noisy = target + sigma[:, None, None, None] * torch.randn(target.shape, generator=generator, device=device)
        extra = {}
        if phase.stage == "sr":
            up = F.interpolate(x_low, size=(64, 64), mode="bilinear", align_corners=False)
            aug = torch.rand(b, generator=generator, device=device) * cfg.sr_train_aug_max
            noise = torch.randn(up.shape, generator=generator, device=device)
            extra = dict(low_res=up + aug[:, None, None, None] * noise, low_res_sigma=aug)
        pww = painted_masks(batch, b, context.shape[1], image_size, device)
        denoised = net(noisy, sigma, context, mask, pooled, pww, batch["paint_strength"].to(device), **extra)
        # EDM eq. 2 with lambda(sigma) from Table 1.
        loss = (edm_loss_weight(sigma, net.sigma_data)[:, None, None, None] * (denoised - target) ** 2).mean()
        warmup = min(1.0, (step + 1) / 100)
        for group in opt.param_groups:
            group["lr"] = phase.lr * warmup
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net_params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, net_params, 1 - decay)
        loss_sum += loss.detach()
        loss_count += 1
        stop = deadline is not None and time.time() >= deadline
        last = step + 1 == phase.steps or stop
        if (step + 1) % cfg.checkpoint_every == 0 or last:
            ckpt.save(phase.name, dict(net=net.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                                       step=step + 1, finished=last, wall_s=time.time() - t0 + (state or {}).get("wall_s", 0)))
        if (step + 1) % 25 == 0 or last:
            # Reading the loss waits for the device: only every 25 steps.
            ckpt.log({"phase": phase.name, "step": step + 1, "loss": float(loss_sum) / loss_count,
                      "elapsed_s": round(time.time() - t0, 1)} | end_of_phase(last, stop))
            loss_sum.zero_()
            loss_count = 0
        if stop:
            break


def phases(cfg: TrainConfig) -> dict[str, list[PhaseSpec]]:
    """The expert-splitting tree per chain; `baseline` gets the same number
    of updates as the root plus both splits."""
    b_hi, b_lo = cfg.base_boundaries
    inf = math.inf
    split_updates = 2 * cfg.base_split1_steps + 2 * cfg.base_split2_steps
    return {
        "base": [
            PhaseSpec("base_root", "base", cfg.base_root_steps, 0.0, inf, None, cfg.lr),
            PhaseSpec("base_high", "base", cfg.base_split1_steps, b_hi, inf, "base_root", cfg.finetune_lr),
            PhaseSpec("base_lowmid", "base", cfg.base_split1_steps, 0.0, b_hi, "base_root", cfg.finetune_lr),
            PhaseSpec("base_mid", "base", cfg.base_split2_steps, b_lo, b_hi, "base_lowmid", cfg.finetune_lr),
            PhaseSpec("base_low", "base", cfg.base_split2_steps, 0.0, b_lo, "base_lowmid", cfg.finetune_lr),
        ],
        "sr": [
            PhaseSpec("sr_root", "sr", cfg.sr_root_steps, 0.0, inf, None, cfg.lr),
            PhaseSpec("sr_high", "sr", cfg.sr_split_steps, cfg.sr_boundary, inf, "sr_root", cfg.finetune_lr),
            PhaseSpec("sr_low", "sr", cfg.sr_split_steps, 0.0, cfg.sr_boundary, "sr_root", cfg.finetune_lr),
        ],
        # Continues the root for the splits' updates: equal total updates.
        "baseline": [PhaseSpec("baseline", "base", split_updates, 0.0, inf, "base_root", cfg.finetune_lr)],
    }


# ---------------------------------------------------------------- export

# Written by `continue_from_models`: the seeding models' training records.
CONTINUED_FROM = "continued_from.json"

# The phases whose EMA weights become a model directory's experts, per stage,
# highest noise first (the baseline shares the experts' SR stage).
EXPORT_PHASES = {
    "experts": {"base": ["base_high", "base_mid", "base_low"], "sr": ["sr_high", "sr_low"]},
    "baseline": {"base": ["baseline"], "sr": ["sr_high", "sr_low"]},
}


def export_model_dir(cfg: TrainConfig, run_dir: Path, out_dir: Path, experts: bool, ckpt: Checkpoints, note: dict) -> Path:
    """Write a model directory (fp16 expert weights) from finished phases;
    `note` (plus the record of the model a seeded run continued) becomes its
    training record."""
    enc_dir = run_dir / "encoders_model"
    enc_cfg = encoders_config(cfg)
    enc = Encoders(enc_dir, enc_cfg)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(enc_dir / "encoders", out_dir / "encoders")
    b_hi, b_lo = cfg.base_boundaries
    base_net, sr_net = network_config(cfg, "base", enc), network_config(cfg, "sr", enc)
    phase_names = EXPORT_PHASES["experts" if experts else "baseline"]
    if experts:
        base_experts = experts_for((b_hi, b_lo), 3, "base", base_net, "stages/base")
    else:
        base_experts = experts_for((), 1, "base", base_net, "stages/base")
    sr_experts = experts_for((cfg.sr_boundary,), 2, "sr", sr_net, "stages/sr")
    stages = [
        StageConfig(name="base", image_size=32, experts=base_experts),
        StageConfig(name="sr", image_size=64, low_res_aug_sigma=cfg.sr_infer_aug, experts=sr_experts),
    ]
    for stage in stages:
        for expert, phase in zip(stage.experts, phase_names[stage.name], strict=True):
            state = ckpt.load(phase)
            if state is None or not state.get("finished"):
                raise RuntimeError(f"phase {phase} has not finished; cannot export {out_dir}")
            net = EDMDenoiser(expert.network, stage.image_size)
            net.load_state_dict(state["ema"])
            save_expert(net, out_dir / expert.weights, dtype=torch.float16)
    config = ModelConfig(
        name="shapes-ediffi" if experts else "shapes-single-model-baseline",
        encoders=enc_cfg, stages=stages, training=note | _continued_from(run_dir, experts),
    )
    config.save(out_dir)
    return out_dir


def phase_deadlines(chain: list[PhaseSpec], start: float, deadline: float | None) -> list[float | None]:
    """Each phase's share of the time to `deadline`, by its share of the
    chain's steps; a phase that ends early leaves its time to the next."""
    if deadline is None:
        return [None] * len(chain)
    total = sum(p.steps for p in chain) or 1
    done, out = 0, []
    for p in chain:
        done += p.steps
        out.append(start + (deadline - start) * done / total)
    return out


def continue_from_models(cfg: TrainConfig, run_dir: Path, experts_dir: Path, baseline_dir: Path | None,
                         to_train: list[str] | None = None) -> list[str]:
    """Seed a run folder from exported model directories, to train their
    experts further (e.g. a model trained on a lent GPU, continued later):
    the encoders and the split phases' weights (net = EMA = the exported
    weights, a fresh optimiser, step 0) come from the models; the phases
    above them are marked finished. Phases then run for their configured
    steps again; use another `seed` so they see new data. Seeded phases not
    in `to_train` (None: all) are marked finished. The models' training
    records are kept (`CONTINUED_FROM`), so an export records the whole
    history. Returns the phases to train."""
    from safetensors.torch import load_file

    ckpt = Checkpoints(run_dir)
    if any(ckpt.dir.iterdir()):
        raise RuntimeError(f"{run_dir} already holds checkpoints; continue into an empty run folder")
    enc_dir = run_dir / "encoders_model"
    shutil.copytree(experts_dir / "encoders", enc_dir / "encoders")
    marker = dict(finished=True, step=0, seeded_from=str(experts_dir))
    for phase in ("encoders", "base_root", "base_lowmid", "sr_root"):
        ckpt.save(phase, marker)
    seeded, history = [], {}
    for kind, model_dir in (("experts", experts_dir), ("baseline", baseline_dir)):
        if model_dir is None:
            continue
        config = ModelConfig.load(model_dir)
        history[kind] = config.training
        for stage in config.stages:
            names = EXPORT_PHASES[kind][stage.name]
            if len(names) != len(stage.experts):
                raise ValueError(f"{model_dir}: stage {stage.name} has {len(stage.experts)} experts, expected {len(names)}")
            for phase, expert in zip(names, stage.experts):
                if ckpt.path(phase).exists():  # the baseline's SR stage is the experts'
                    continue
                weights = {k: v.float() for k, v in load_file(str(model_dir / expert.weights)).items()}
                net = EDMDenoiser(expert.network, stage.image_size)
                net.load_state_dict(weights)
                opt = torch.optim.AdamW(net.parameters(), lr=cfg.finetune_lr, weight_decay=0.0)
                train = to_train is None or phase in to_train
                ckpt.save(phase, dict(net=weights, ema=weights, opt=opt.state_dict(), step=0, finished=not train,
                                      seeded_from=str(model_dir)))
                seeded += [phase] if train else []
    (run_dir / CONTINUED_FROM).write_text(json.dumps(history, indent=1))
    return seeded


def _continued_from(run_dir: Path, experts: bool) -> dict:
    """{"continued_from": record} of the model a seeded run folder continues
    ({} for a run trained from scratch)."""
    path = run_dir / CONTINUED_FROM
    record = json.loads(path.read_text()).get("experts" if experts else "baseline") if path.is_file() else None
    return {} if record is None else {"continued_from": record}


def run_training(cfg: TrainConfig, run_dir: Path, chains: list[str], log=print,
                 deadline: float | None = None, only: list[str] | None = None) -> None:
    """The encoders (if not finished), then the chains in order (`only`: just
    these phases of them). `deadline` (time.time() seconds) ends them early,
    the chains' phases sharing the time by steps."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if torch.device(cfg.device).type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2, default=list))
    ckpt = Checkpoints(run_dir)
    if not ckpt.done("encoders"):
        log(f"encoders: training ({cfg.encoder_steps} steps)")
    enc_dir = train_encoders(cfg, run_dir, ckpt, deadline=deadline)
    enc = Encoders(enc_dir, encoders_config(cfg))
    enc.requires_grad_(False)
    enc.to(cfg.device)
    tree = {chain: [p for p in specs if only is None or p.name in only] for chain, specs in phases(cfg).items()}
    for chain in chains:
        for phase, phase_deadline in zip(tree[chain], phase_deadlines(tree[chain], time.time(), deadline)):
            log(f"{phase.name}: {phase.steps} steps on sigma in [{phase.sigma_lo}, {phase.sigma_hi})")
            train_denoiser(cfg, phase, enc, ckpt, deadline=phase_deadline)
