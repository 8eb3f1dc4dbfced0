"""Render docs/samples.png: prompts -> images, a painted colour map -> image,
a style reference -> image, from a model directory (default models/default).

    .venv/bin/python scripts/make_docs_grid.py [--model-dir D] [--out docs/samples.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ediffi.evaluate import color_map_for
from ediffi.model import load_model
from ediffi.paint import Region
from ediffi.pipeline import GenerationRequest, generate_batch
from ediffi.world import Scene, ShapeObject, render

SCALE = 3
PROMPTS = [
    "a red circle in the top left",
    "a blue square at the bottom and a green triangle on the left",
    "yellow triangle, center",
    "a purple circle on the right",
    "an orange square in the bottom right",
    "there is a green circle at the top and a red square in the bottom left",
]


def tile(image: Image.Image, caption: str, width: int = 64 * SCALE) -> Image.Image:
    """The image enlarged without blur, with its caption underneath."""
    big = image.convert("RGB").resize((width, width), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (width, width + 40), "white")
    canvas.paste(big, (0, 0))
    draw = ImageDraw.Draw(canvas)
    words, lines, line = caption.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > 30:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    for i, text in enumerate(lines[:3]):
        draw.text((4, width + 2 + 12 * i), text, fill="black")
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", default="models/default")
    parser.add_argument("--out", default="docs/samples.png")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    model = load_model(args.model_dir)

    cells = [3, 5]  # left, right
    color_map = color_map_for(cells)
    paint_prompt = "a red circle and a blue square"
    reference = Image.fromarray(render(Scene((ShapeObject("orange", "triangle", 0, True),), "stripes", "")))
    requests = [GenerationRequest(prompt=p, seed=args.seed, steps=args.steps) for p in PROMPTS]
    requests.append(GenerationRequest(
        prompt=paint_prompt, seed=args.seed, steps=args.steps, color_map=color_map,
        regions=[Region("#ff0000", "red circle"), Region("#0000ff", "blue square")],
    ))
    requests.append(GenerationRequest(prompt="a green square in the center", seed=args.seed, steps=args.steps,
                                      style_image=reference))
    images = [ims[0] for ims in generate_batch(model, requests)]

    tiles = [tile(im, p) for im, p in zip(images, PROMPTS)]
    tiles += [tile(color_map, "colour map: red circle | blue square"), tile(images[-2], paint_prompt + " (painted)")]
    tiles += [tile(reference, "style reference (stripes)"), tile(images[-1], "a green square in the center + style")]
    cols = 5
    rows = (len(tiles) + cols - 1) // cols
    w, h = tiles[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, t in enumerate(tiles):
        grid.paste(t, ((i % cols) * w, (i // cols) * h))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(args.out, np.asarray(grid).shape)


if __name__ == "__main__":
    main()
