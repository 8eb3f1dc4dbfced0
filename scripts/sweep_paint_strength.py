"""Choose the paint-with-words strength w' on tuning cases, not on the held-out set.

The tuning cases are training-distribution scenes (their positions stripped,
each object painted over a random cell), so `ediffi eval`'s held-out numbers
stay a clean measurement of the chosen default.

    .venv/bin/python scripts/sweep_paint_strength.py --model-dir models/default --cases 32 --strengths 0.4 1 2 4
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from ediffi.evaluate import EvalConfig, paint_eval, paint_scenes
from ediffi.model import load_model
from ediffi.world import sample_scene


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models/default"))
    parser.add_argument("--cases", type=int, default=32)
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.4, 1.0, 2.0, 4.0])
    parser.add_argument("--steps", type=int, default=EvalConfig.steps)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model_dir)
    rng = np.random.default_rng(4242)
    cases = paint_scenes([sample_scene(rng) for _ in range(args.cases)], seed=4243)
    print(f"{args.cases} tuning cases, {args.steps} steps")
    for strength in args.strengths:
        t0 = time.time()
        cfg = dataclasses.replace(EvalConfig(), paint_strength=strength, steps=args.steps)
        row = paint_eval(model, cfg, cases)
        print(f"w'={strength:g}: centroid hit {row['paint_centroid_hit']:.1%}, mean IoU {row['paint_mean_iou']:.3f} "
              f"({row['n_paint_objects']} objects, {time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
