"""`ediffi eval`: measure a shapes-world model like a paper would.

On the fixed held-out prompts (never seen in training) with fixed seeds, the
deterministic analyser reads each generated image back:
- object accuracy (colour and shape right, per object), position accuracy
  (objects whose caption names a position), count accuracy;
- style transfer: the style reference is a render of *another* held-out
  caption; the output's background must be the reference's style;
- paint-with-words: captions without positions, each object's phrase painted
  over a random cell; the centroid must land in its cell (and IoU of object
  and painted region);
- a Frechet distance between generated and real images in the CLIP vision
  tower's feature space;
- images per second of the reference pipeline, one request at a time.
The analyser's own accuracy on real renders is reported too.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ediffi.model import EDiffIModel, load_model
from ediffi.pipeline import GenerationRequest, generate, generate_batch
from ediffi.spec import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_STRENGTH, Region
from ediffi.world import (
    Analysis,
    Scene,
    ShapeObject,
    analyse,
    cell_mask,
    heldout_prompts,
    heldout_scenes,
    render,
    sample_scene,
    score,
)

PAINT_COLORS = ("#ff0000", "#0000ff")


@dataclass
class EvalConfig:
    n_prompts: int = 256
    n_paint: int = 128
    steps: int = DEFAULT_STEPS
    sampler: str = DEFAULT_SAMPLER
    guidance: float = DEFAULT_GUIDANCE
    paint_strength: float = DEFAULT_STRENGTH
    batch: int = 32
    speed_requests: int = 3
    analyser_scenes: int = 300
    seed: int = 0


def _batched(model: EDiffIModel, requests: list[GenerationRequest], batch: int) -> list[Image.Image]:
    images: list[Image.Image] = []
    for i in range(0, len(requests), batch):
        images.extend(im for ims in generate_batch(model, requests[i : i + batch]) for im in ims)
    return images


def style_reference(scenes: list[Scene], i: int) -> Scene:
    """The reference for prompt i: another held-out caption's scene."""
    return scenes[(i + 7) % len(scenes)]


def text_and_style_eval(model: EDiffIModel, cfg: EvalConfig) -> tuple[dict, list[Image.Image], list[np.ndarray]]:
    scenes = heldout_scenes(cfg.n_prompts)
    prompts = heldout_prompts(cfg.n_prompts)
    refs = [style_reference(scenes, i) for i in range(len(scenes))]
    requests = [
        GenerationRequest(prompt=p, seed=seed, steps=cfg.steps, sampler=cfg.sampler, guidance_scale=cfg.guidance,
                          style_image=Image.fromarray(render(ref)))
        for (p, seed), ref in zip(prompts, refs)
    ]
    images = _batched(model, requests, cfg.batch)
    analyses = [analyse(np.asarray(image)) for image in images]
    style_ok = sum(analysis.style == ref.style for analysis, ref in zip(analyses, refs))
    # Real images of the same content in the reference's style: the FD's reference set.
    real = [render(dataclasses.replace(scene, style=ref.style)) for scene, ref in zip(scenes, refs)]
    return text_alignment(analyses, scenes) | {"style_match": style_ok / len(scenes)}, images, real


def text_alignment(analyses: list[Analysis], scenes: list[Scene]) -> dict:
    """Object accuracy (colour and shape, per object), position accuracy
    (objects whose caption names a cell) and count accuracy (per image)."""
    obj_ok = obj_n = pos_ok = pos_n = count_ok = 0
    for analysis, scene in zip(analyses, scenes, strict=True):
        s = score(analysis, scene)
        obj_n += len(s["objects"])
        obj_ok += sum(o["attr_ok"] for o in s["objects"])
        named = [o for o in s["objects"] if o["position_named"]]
        pos_n += len(named)
        pos_ok += sum(o["cell_ok"] for o in named)
        count_ok += s["count_ok"]
    n = len(scenes)
    return {"object_acc": obj_ok / obj_n, "position_acc": pos_ok / max(pos_n, 1), "count_acc": count_ok / n,
            "n_prompts": n, "n_objects": obj_n, "n_named_positions": pos_n}


def paint_scenes(scenes: list[Scene], seed: int) -> list[tuple[Scene, list[int]]]:
    """The scenes' objects without positions, each assigned a random cell to paint."""
    rng = np.random.default_rng(seed)
    out = []
    for scene in scenes:
        cells = [int(c) for c in rng.choice(9, size=len(scene.objects), replace=False)]
        objects = tuple(ShapeObject(o.color, o.shape, c, False) for o, c in zip(scene.objects, cells))
        caption = " and ".join(("an" if o.color[0] in "aeiou" else "a") + f" {o.color} {o.shape}" for o in objects)
        out.append((Scene(objects, scene.style, caption), cells))
    return out


def color_map_for(cells: list[int], size: int = 64) -> Image.Image:
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    for color, cell in zip(PAINT_COLORS, cells):
        canvas[cell_mask(cell, size)] = [int(color[i : i + 2], 16) for i in (1, 3, 5)]
    return Image.fromarray(canvas)


def paint_eval(model: EDiffIModel, cfg: EvalConfig, cases: list[tuple[Scene, list[int]]] | None = None) -> dict:
    """Held-out objects painted into random cells (or the given cases)."""
    if cases is None:
        cases = paint_scenes(heldout_scenes(cfg.n_paint), cfg.seed + 99)
    requests = [
        GenerationRequest(
            prompt=scene.caption, seed=20000 + i, steps=cfg.steps, sampler=cfg.sampler, guidance_scale=cfg.guidance,
            color_map=color_map_for(cells),
            regions=[Region(c, f"{o.color} {o.shape}", cfg.paint_strength) for c, o in zip(PAINT_COLORS, scene.objects)],
        )
        for i, (scene, cells) in enumerate(cases)
    ]
    images = _batched(model, requests, cfg.batch)
    hits = total = 0
    ious = []
    for image, (scene, cells) in zip(images, cases):
        analysis = analyse(np.asarray(image))
        for obj, cell in zip(scene.objects, cells):
            total += 1
            found = [d for d in analysis.objects if d.color == obj.color and d.shape == obj.shape]
            region = cell_mask(cell, analysis.size)
            if not found:
                ious.append(0.0)
                continue
            best = max(found, key=lambda d: (d.mask & region).sum())
            x, y = best.centroid
            hits += bool(region[min(int(y), analysis.size - 1), min(int(x), analysis.size - 1)])
            ious.append(float((best.mask & region).sum() / (best.mask | region).sum()))
    return {"paint_centroid_hit": hits / total, "paint_mean_iou": float(np.mean(ious)), "n_paint_objects": total}


@torch.no_grad()
def clip_features(model: EDiffIModel, images: list[Image.Image | np.ndarray]) -> np.ndarray:
    enc = model.encoders
    feats = []
    for i in range(0, len(images), 64):
        chunk = [im if isinstance(im, Image.Image) else Image.fromarray(im) for im in images[i : i + 64]]
        pixels = enc.image_processor(images=chunk, return_tensors="pt")["pixel_values"].to(enc.device)
        feats.append(enc.clip_vision(pixel_values=pixels).image_embeds.float().cpu().numpy())
    return np.concatenate(feats).astype(np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Heusel et al. 2017);
    Tr((S_a S_b)^(1/2)) is the sum of square roots of the eigenvalues of
    S_a S_b, which are real and non-negative for covariance matrices."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(cov_a @ cov_b)
    trace_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


def pipeline_speed(model: EDiffIModel, cfg: EvalConfig) -> float:
    """Images per second of the reference pipeline, one request at a time
    (NaN, not measured, when ``cfg.speed_requests`` is 0)."""
    if cfg.speed_requests == 0:
        return float("nan")
    request = GenerationRequest(prompt="a red circle in the top left", steps=cfg.steps, sampler=cfg.sampler,
                                guidance_scale=cfg.guidance)
    generate(model, request)  # warm-up
    start = time.perf_counter()
    for k in range(cfg.speed_requests):
        generate(model, dataclasses.replace(request, seed=k))
    return cfg.speed_requests / (time.perf_counter() - start)


def analyser_accuracy(cfg: EvalConfig) -> dict:
    rng = np.random.default_rng(cfg.seed + 5)
    ok = style = 0
    for _ in range(cfg.analyser_scenes):
        scene = sample_scene(rng, exclude_heldout=False)
        s = score(analyse(render(scene, jitter_rng=rng)), scene)
        ok += s["all_ok"] and all(o["cell_ok"] for o in s["objects"])
        style += s["style_ok"]
    return {"analyser_scene_acc": ok / cfg.analyser_scenes, "analyser_style_acc": style / cfg.analyser_scenes}


def evaluate_model(model_dir: Path, cfg: EvalConfig, log=print) -> dict:
    model = load_model(model_dir)
    t0 = time.time()
    row, images, real = text_and_style_eval(model, cfg)
    log(f"  text/style eval: {time.time() - t0:.0f}s")
    t0 = time.time()
    row.update(paint_eval(model, cfg))
    log(f"  paint eval: {time.time() - t0:.0f}s")
    row["clip_fd"] = frechet_distance(clip_features(model, images), clip_features(model, real))
    row["images_per_s"] = pipeline_speed(model, cfg)
    row["experts"] = {s.name: len(s.experts) for s in model.config.stages}
    return row


COLUMNS = [
    ("object_acc", "object acc", "{:.1%}"),
    ("position_acc", "position acc", "{:.1%}"),
    ("count_acc", "count acc", "{:.1%}"),
    ("paint_centroid_hit", "pww centroid hit", "{:.1%}"),
    ("paint_mean_iou", "pww IoU", "{:.3f}"),
    ("style_match", "style match", "{:.1%}"),
    ("clip_fd", "CLIP-FD", "{:.3f}"),
    ("images_per_s", "images/s", "{:.2f}"),
]


def format_table(rows: dict[str, dict]) -> str:
    header = "| model | experts (base/sr) | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, row in rows.items():
        experts = "/".join(str(v) for v in row["experts"].values())
        cells = " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS)
        lines.append(f"| {name} | {experts} | {cells} |")
    return "\n".join(lines)


def run_eval(models: dict[str, Path], cfg: EvalConfig, log=print) -> dict:
    torch.manual_seed(cfg.seed)
    rows = {}
    for name, path in models.items():
        log(f"evaluating {name} ({path}) on {cfg.n_prompts} held-out prompts, {cfg.n_paint} painted, "
            f"{cfg.steps} {cfg.sampler} steps, guidance {cfg.guidance}")
        rows[name] = evaluate_model(path, cfg, log)
    result = {"config": dataclasses.asdict(cfg), "rows": rows, "analyser": analyser_accuracy(cfg)}
    return result


def write_result(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
