"""Peek at a (possibly unfinished) base-stage checkpoint while training runs:
its EMA weights as a one-expert, base-only model on the first N held-out
prompts (32 px, 16 Heun steps), read back by the analyser. Besides `ediffi
eval`'s object/position/count accuracy it prints "colour in named cell": an
object of the asked colour in the cell the caption names (chance 11%), which
moves before shapes are right.

    .venv/bin/python scripts/peek_checkpoint.py RUN_DIR PHASE N [--config C]   # e.g. runs/shapes base_root 32

Writes the images to /tmp/peek.png.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from PIL import Image

from ediffi.config import ModelConfig, StageConfig
from ediffi.edm import EDMDenoiser
from ediffi.encoders import Encoders
from ediffi.evaluate import text_alignment
from ediffi.model import experts_for, load_model, save_expert
from ediffi.pipeline import GenerationRequest, generate_batch
from ediffi.train import Checkpoints, encoders_config, load_train_config, network_config
from ediffi.world import analyse, heldout_prompts, heldout_scenes


def base_only_model(run_dir: Path, phase: str, config: Path, out: Path):
    """The phase's current EMA weights as a model directory with one base expert."""
    cfg = load_train_config(config)
    enc = Encoders(run_dir / "encoders_model", encoders_config(cfg))
    network = network_config(cfg, "base", enc)
    shutil.copytree(run_dir / "encoders_model" / "encoders", out / "encoders")
    experts = experts_for((), 1, "base", network, "stages/base")
    net = EDMDenoiser(network, 32)
    net.load_state_dict(Checkpoints(run_dir).load(phase)["ema"])
    save_expert(net, out / experts[0].weights)
    stage = StageConfig(name="base", image_size=32, experts=experts)
    ModelConfig(name=f"peek-{phase}", encoders=encoders_config(cfg), stages=[stage]).save(out)
    return load_model(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("phase")
    parser.add_argument("n", type=int)
    parser.add_argument("--config", type=Path, default=Path("configs/shapes-train.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = base_only_model(args.run_dir, args.phase, args.config, Path(tempfile.mkdtemp(prefix="peek-model-")))
    scenes, prompts = heldout_scenes(args.n), heldout_prompts(args.n)
    requests = [GenerationRequest(prompt=p, seed=seed, steps=16) for p, seed in prompts]
    images = [images[0] for images in generate_batch(model, requests)]
    analyses = [analyse(image) for image in images]

    named = [(obj, a) for scene, a in zip(scenes, analyses) for obj in scene.objects if obj.position_named]
    in_cell = sum(any(d.color == obj.color and d.cell == obj.cell for d in a.objects) for obj, a in named)
    row = text_alignment(analyses, scenes)
    print(f"colour in named cell {in_cell / max(len(named), 1):.0%}")
    print(f"{args.phase}: object {row['object_acc']:.0%} position {row['position_acc']:.0%} count {row['count_acc']:.0%} "
          f"(n={args.n}, 32 px base only, 16 Heun steps)")
    for (prompt, _), a in list(zip(prompts, analyses))[:16]:
        print(prompt, "|", [(d.color, d.shape, tuple(round(v) for v in d.centroid)) for d in a.objects])

    grid = Image.new("RGB", (8 * 34, ((len(images) + 7) // 8) * 34), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % 8) * 34, (i // 8) * 34))
    grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST).save("/tmp/peek.png")


if __name__ == "__main__":
    main()
