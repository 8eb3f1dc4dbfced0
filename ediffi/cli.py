"""`ediffi` command line (DESIGN §4). Settings are built here, once, at the
process edge, and passed down; nothing below reads the environment."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "default"


def resolve_model_dir(cli_value: str | None, settings) -> Path:
    """--model-dir, else EDIFFI_MODEL_DIR, else the shipped models/default."""
    if cli_value:
        return Path(cli_value)
    if settings.model_dir:
        return Path(settings.model_dir)
    return DEFAULT_MODEL_DIR


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def cmd_generate(args, settings) -> int:
    from PIL import Image
    from tqdm import tqdm

    from ediffi.model import load_model
    from ediffi.paint import PaintWithWordsError, parse_region_arg
    from ediffi.pipeline import GenerationRequest, generate

    if args.backend != "torch":
        print(f"error: --backend {args.backend} is not available yet; use --backend torch", file=sys.stderr)
        return 2
    try:
        regions = [parse_region_arg(r) for r in args.region]
    except ValueError as exc:
        print(f"error: --region: {exc}", file=sys.stderr)
        return 2
    if bool(regions) != bool(args.paint):
        print("error: --paint COLOR_MAP.png and --region go together", file=sys.stderr)
        return 2
    model_dir = resolve_model_dir(args.model_dir, settings)
    try:
        model = load_model(model_dir, device=args.device or settings.device, dtype=_torch_dtype(settings.dtype))
        request = GenerationRequest(
            prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
            guidance_scale=args.guidance, seed=args.seed, sampler=args.sampler, n=args.n,
            style_image=Image.open(args.style_image) if args.style_image else None,
            color_map=Image.open(args.paint) if args.paint else None, regions=regions,
        )
        bar = tqdm(total=None, desc="sampling", unit="eval", disable=not sys.stderr.isatty())

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        images = generate(model, request, progress)
        bar.close()
    except (FileNotFoundError, ValueError, PaintWithWordsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{k}{out.suffix}")
        image.save(path)
        print(path)
    return 0


def cmd_train(args, settings) -> int:
    import dataclasses
    import json

    from ediffi.train import TrainConfig, export_model_dir, run_training

    cfg = TrainConfig()
    if args.config:
        overrides = json.loads(Path(args.config).read_text())
        cfg = dataclasses.replace(cfg, **overrides)
    run_dir = Path(args.run_dir)
    if args.export:
        note = {
            "command": "ediffi train --run-dir " + str(run_dir) + (f" --config {args.config}" if args.config else ""),
            "train_config": dataclasses.asdict(cfg),
        }
        log = run_dir / "train.log.jsonl"
        if log.is_file():
            records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            note["phases"] = {r["phase"]: {"steps": r["step"], "final_loss": r["loss"]} for r in records}
            note["wall_s_by_phase"] = {r["phase"]: r["elapsed_s"] for r in records}
        path = export_model_dir(cfg, run_dir, Path(args.export), experts=not args.baseline, ckpt=__import__(
            "ediffi.train", fromlist=["Checkpoints"]).Checkpoints(run_dir), note=note)
        print(path)
        return 0
    run_training(cfg, run_dir, args.chains, log=lambda m: print(m, flush=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ediffi", description="eDiff-I text-to-image: generate, serve, export, train, bench")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images for one prompt (reference pipeline)")
    gen.add_argument("prompt")
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--steps", type=int, default=32)
    gen.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--n", type=int, default=1, help="images (seeds seed, seed+1, ...)")
    gen.add_argument("--sampler", choices=["heun", "euler", "dpmpp_2m"], default="heun")
    gen.add_argument("--style-image", help="reference image whose CLIP image embedding sets the style")
    gen.add_argument("--paint", help="paint-with-words colour map (PNG)")
    gen.add_argument("--region", action="append", default=[], help="'#rrggbb=phrase[:strength]' (repeatable)")
    gen.add_argument("--backend", choices=["torch", "onnxruntime", "tensorrt"], default="torch")
    gen.add_argument("--model-dir", help="model directory (default: EDIFFI_MODEL_DIR, else models/default)")
    gen.add_argument("--device", help="cpu, cuda, cuda:N (default: EDIFFI_DEVICE)")
    gen.add_argument("--out", default="out.png")
    gen.set_defaults(func=cmd_generate)

    train = sub.add_parser("train", help="train the shapes-world eDiff-I (resumable)")
    train.add_argument("--run-dir", default="runs/shapes", help="checkpoints and logs (resumes from here)")
    train.add_argument("--config", help="JSON file of TrainConfig overrides")
    train.add_argument("--chains", nargs="*", default=["base", "sr", "baseline"], choices=["base", "sr", "baseline"],
                       help="phase chains to run after the encoders (none: encoders only)")
    train.add_argument("--export", metavar="MODEL_DIR", help="write a model directory from finished phases and exit")
    train.add_argument("--baseline", action="store_true", help="with --export: the single-model baseline")
    train.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from server.settings import Settings

    settings = Settings()
    return args.func(args, settings)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
