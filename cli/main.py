"""`ediffi` command line (docs/architecture.md §4). Settings are built here, once, at the
process edge, and passed down; nothing below reads the environment."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ediffi import spec

def resolve_model_dir(cli_value: str | None, settings) -> Path:
    """--model-dir, else EDIFFI_MODEL_DIR, else the shipped models/default."""
    from ediffi.config import resolve_model_dir as resolve

    return resolve(cli_value, settings.model_dir)


def check_before_loading(request, model_dir: Path, max_image_side: int) -> None:
    """The request's own rules and the model's sizes (from model.json, within the server's
    EDIFFI_MAX_IMAGE_SIDE), checked before seconds to minutes of model loading."""
    from ediffi.capabilities import model_capabilities
    from ediffi.config import ModelConfig

    request.validate()
    capabilities = model_capabilities(ModelConfig.load(model_dir))
    image_size = request.init_image.size if request.init_image is not None else None
    width, height = capabilities.sizes.from_init_image(request.width, request.height, image_size)  # as the API
    for name, message in capabilities.sizes.errors(width, height, max_image_side).items():
        sent = getattr(request, name) is not None  # else the init image's size made it
        raise spec.InputError(name if sent else "init_image", message if sent else f"{name} {message}")
    errors = capabilities.request_errors(
        sampler=request.sampler, steps=request.steps, use_karras_sigmas=request.use_karras_sigmas,
        sr_noise_level=request.sr_noise_level, init_image=request.init_image is not None,
        strength=request.strength if request.init_image is not None else None, mask=request.mask is not None,
    )
    for name, message in errors.items():
        raise spec.InputError(name, message)


def cmd_generate(args, settings) -> int:
    from PIL import Image
    from tqdm import tqdm

    from ediffi.spec import PaintWithWordsError, parse_region_arg
    from ediffi.pipeline import GenerationRequest, generate

    try:
        regions = [parse_region_arg(r) for r in args.region]
    except ValueError as exc:
        print(f"error: --region: {exc}", file=sys.stderr)
        return 2
    if bool(regions) != bool(args.paint):
        print("error: --paint COLOR_MAP.png and --region go together", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.suffix.lower() not in Image.registered_extensions():  # checked before minutes of sampling, not after
        print(f"error: --out {out}: not an image file name Pillow can write (e.g. out.png, out.jpg)", file=sys.stderr)
        return 2
    seed = spec.pick_seed(args.seed)
    try:  # image k uses seed + k: the API's rule, checked before minutes of model loading
        spec.check_seed(seed, args.n)
    except spec.InputError as exc:
        print(f"error: --seed: {exc.message}", file=sys.stderr)
        return 2
    if seed != args.seed:
        print(f"seed: {seed}", file=sys.stderr)
    model_dir = resolve_model_dir(args.model_dir, settings)
    try:
        from ediffi.config import ModelConfig
        from engines.engine import make_backend

        sampling = ModelConfig.load(model_dir).request_defaults.fill(
            steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
            use_karras_sigmas=args.use_karras_sigmas,
        )
        request = GenerationRequest(
            prompt=args.prompt, negative_prompt=args.negative_prompt, seed=seed, n=args.n, **sampling,
            style_image=Image.open(args.style_image) if args.style_image else None,
            color_map=Image.open(args.paint) if args.paint else None, regions=regions,
            width=args.width, height=args.height,
            init_image=Image.open(args.init_image) if args.init_image else None, strength=args.strength,
            mask=Image.open(args.mask) if args.mask else None, padding_mask_crop=args.padding_mask_crop,
        )
        if args.strength is not None and args.init_image is None:
            raise spec.InputError("strength", "goes with --init-image (img2img)")
        check_before_loading(request, model_dir, settings.max_image_side)
        # The same backends the server uses: torch, onnxruntime (exported graphs), tensorrt.
        model = make_backend(
            args.backend, model_dir, device=args.device or settings.device, dtype=settings.dtype,
            max_batch=settings.max_batch, threads=settings.intra_op_threads, onnx_dir=settings.onnx_dir,
            tensorrt_dir=settings.tensorrt_dir, compile_mode=settings.compile_mode,
        ).model
        bar = tqdm(total=None, desc="sampling", unit="eval", disable=not sys.stderr.isatty())

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        images = generate(model, request, progress)
        bar.close()
    except (OSError, ValueError, RuntimeError, PaintWithWordsError) as exc:  # OSError: unreadable images too
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{k}{out.suffix}")
        image.save(path)
        print(path)
    return 0


def cmd_import(args, settings) -> int:
    from ediffi.importers.diffusers import DEFAULT_HIGH_NOISE_FRAC, DiffusersImportError, import_diffusers

    if args.high_noise_frac is not None and not args.refiner:
        print("error: --high-noise-frac sets the base/refiner boundary: it goes with --refiner", file=sys.stderr)
        return 2
    high_noise_frac = DEFAULT_HIGH_NOISE_FRAC if args.high_noise_frac is None else args.high_noise_frac
    if not 0.0 < high_noise_frac < 1.0:
        print(f"error: --high-noise-frac must be within (0, 1), got {high_noise_frac}", file=sys.stderr)
        return 2
    def report(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        config = import_diffusers(
            args.base_dir, args.out, refiner_dir=args.refiner, high_noise_frac=high_noise_frac, copy=args.copy,
            sr_dir=args.sr, replace=args.force, name=args.name, report=report,
        )
    except (DiffusersImportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for stage in config.stages:
        for expert in stage.experts:
            hi = "inf" if expert.sigma_hi is None else f"{expert.sigma_hi:.4g}"
            print(f"{stage.name}/{expert.name}: sigma in [{expert.sigma_lo:.4g}, {hi})")
    print(args.out)
    return 0


def cmd_train(args, settings) -> int:
    import dataclasses
    import json
    import time

    from ediffi.train import Checkpoints, continue_from_models, export_model_dir, load_train_config, run_training

    cfg = load_train_config(Path(args.config) if args.config else None)
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
        path = export_model_dir(cfg, run_dir, Path(args.export), experts=not args.baseline,
                                ckpt=Checkpoints(run_dir), note=note)
        print(path)
        return 0
    if args.continue_from:
        baseline = Path(args.continue_baseline) if args.continue_baseline else None
        seeded = continue_from_models(cfg, run_dir, Path(args.continue_from), baseline, to_train=args.phases)
        print(f"seeded {run_dir} from {args.continue_from}; to train: {', '.join(seeded)}")
        return 0
    deadline = None if args.time_budget_s is None else time.time() + args.time_budget_s
    run_training(cfg, run_dir, args.chains, log=lambda m: print(m, flush=True), deadline=deadline, only=args.phases)
    return 0


def cmd_eval(args, settings) -> int:
    from ediffi.evaluate import EvalConfig, format_table, run_eval, write_result

    cfg = EvalConfig(n_prompts=args.prompts, n_paint=args.paint, steps=args.steps, sampler=args.sampler,
                     guidance=args.guidance, batch=args.batch, speed_requests=args.speed_requests)
    if args.paint_strength is not None:
        cfg.paint_strength = args.paint_strength
    models = {"experts": resolve_model_dir(args.model_dir, settings)}
    if args.baseline_dir:
        models["baseline"] = Path(args.baseline_dir)
    result = run_eval(models, cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(result["rows"]))
    a = result["analyser"]
    print(f"\nanalyser on real renders: scene accuracy {a['analyser_scene_acc']:.1%}, style {a['analyser_style_acc']:.1%}")
    if args.json_out:
        write_result(result, Path(args.json_out))
    return 0


def cmd_bench_engine(args, settings) -> int:
    from bench.engine_bench import main as bench_main

    return bench_main(args, settings)


def cmd_bench_http(args, settings) -> int:
    from bench.http_bench import main as bench_main

    return bench_main(args, settings)


def cmd_api(args, settings) -> int:
    from server.main import run_api

    run_api(settings, resolve_model_dir(args.model_dir, settings), args.host or settings.host, args.port or settings.port)
    return 0


def cmd_worker(args, settings) -> int:
    from server.main import run_worker

    run_worker(settings, resolve_model_dir(args.model_dir, settings), args.metrics_port or settings.metrics_port)
    return 0


def cmd_serve(args, settings) -> int:
    from server.main import run_serve

    run_serve(settings, resolve_model_dir(args.model_dir, settings), args.host or settings.host, args.port or settings.port)
    return 0


def cmd_export(args, settings) -> int:
    from cli.export import run_export

    return run_export(args, settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ediffi", description="eDiff-I text-to-image: generate, serve, export, train, bench")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images for one prompt (reference pipeline)")
    gen.add_argument("prompt")
    gen.add_argument("--negative-prompt", default="")
    model_default = "default: the model's (an imported model's: its diffusers pipeline's; the shipped: %s)"
    gen.add_argument("--steps", type=int, help=model_default % spec.DEFAULT_STEPS)
    gen.add_argument(
        "--guidance", type=float, help="classifier-free guidance scale (1 = off); " + model_default % spec.DEFAULT_GUIDANCE
    )
    gen.add_argument("--seed", type=int, default=spec.DEFAULT_SEED, help="-1: a random one (printed)")
    gen.add_argument("--n", type=int, default=1, help="images (seeds seed, seed+1, ...)")
    gen.add_argument("--sampler", choices=spec.SAMPLERS, help=model_default % spec.DEFAULT_SAMPLER)
    gen.add_argument(
        "--karras-sigmas", dest="use_karras_sigmas", action=argparse.BooleanOptionalAction,
        help="imported models with --sampler euler, dpmpp_2m, euler_a or unipc: --no-karras-sigmas samples on the scheduler's "
        "own sigmas (diffusers' schedulers by default; ddim, pndm and ddpm always do); default: the model's",
    )
    gen.add_argument("--style-image", help="reference image whose CLIP image embedding sets the style")
    gen.add_argument(
        "--init-image",
        help="img2img (imported SD/SDXL): start from this image, resized to --width/--height (default: its size)",
    )
    gen.add_argument(
        "--strength", type=float,
        help=f"with --init-image: int(steps x strength) steps run from it noised to that level (default "
        f"{spec.DEFAULT_INIT_STRENGTH}; with --mask the model's inpainting default, 1 or SDXL's 0.9999)",
    )
    gen.add_argument(
        "--mask",
        help="inpainting, with --init-image: an image of its size, white where to repaint and black where to keep it",
    )
    gen.add_argument(
        "--padding-mask-crop", type=int, metavar="PIXELS",
        help="with --mask: inpaint only the region around it, padded by PIXELS, at --width x --height, pasted back "
        "into the init image (diffusers' padding_mask_crop)",
    )
    gen.add_argument("--paint", help="paint-with-words colour map (PNG)")
    gen.add_argument("--region", action="append", default=[], help="'#rrggbb=phrase[:strength]' (repeatable)")
    gen.add_argument("--backend", choices=["torch", "onnxruntime", "tensorrt"], default="torch")
    gen.add_argument("--model-dir", help="model directory (default: EDIFFI_MODEL_DIR, else models/default)")
    gen.add_argument("--device", help="cpu, cuda, cuda:N (default: EDIFFI_DEVICE)")
    gen.add_argument("--width", type=int, help="pixels (default: the model's native size)")
    gen.add_argument("--height", type=int, help="pixels (default: the model's native size)")
    gen.add_argument("--out", default="out.png")
    gen.set_defaults(func=cmd_generate)

    imp = sub.add_parser("import", help="make a model directory from another format's checkpoint on disk")
    imp_sub = imp.add_subparsers(dest="import_format", required=True)
    dif = imp_sub.add_parser(
        "diffusers", help="a local diffusers pipeline folder (SD 1.x/2.x, SDXL + refiner, DeepFloyd IF stage I + II)"
    )
    dif.add_argument("base_dir", help="pipeline folder with model_index.json")
    dif.add_argument("--refiner", help="SDXL refiner folder (StableDiffusionXLImg2ImgPipeline): the low-noise expert")
    dif.add_argument("--sr", help="DeepFloyd IF stage II folder (IFSuperResolutionPipeline): the super-resolution stage")
    dif.add_argument("--high-noise-frac", type=float,
                     help="with --refiner: share of the noise schedule the base denoises (diffusers' denoising_end / "
                          "denoising_start; default 0.8)")
    dif.add_argument("--copy", action="store_true", help="copy the components (default: symbolic links to them)")
    dif.add_argument("--out", required=True, help="model directory to write (a new or empty folder)")
    dif.add_argument("--force", action="store_true", help="replace the model directory already at --out")
    dif.add_argument("--name", help="the model's id in GET /v1/models (default: the pipeline folder's name; "
                                    "for a Hugging Face cache snapshot, the repository's)")
    dif.set_defaults(func=cmd_import)

    for name, func, text in (
        ("serve", cmd_serve, "API and worker in one process (Redis if EDIFFI_REDIS_URL is set, else in-process)"),
        ("api", cmd_api, "the HTTP API alone (no model loaded; needs EDIFFI_REDIS_URL for workers to reach it)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--host", help="bind address (default: EDIFFI_HOST, 127.0.0.1)")
        p.add_argument("--port", type=int, help="port (default: EDIFFI_PORT, 8000)")
        p.set_defaults(func=func)
    wk = sub.add_parser("worker", help="engine + queue consumer (needs EDIFFI_REDIS_URL)")
    wk.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default: EDIFFI_METRICS_PORT, 9100)")
    wk.set_defaults(func=cmd_worker)
    for role in (sub.choices["serve"], sub.choices["api"], wk):
        role.add_argument("--model-dir", help="model directory (default: EDIFFI_MODEL_DIR, else models/default)")

    train = sub.add_parser("train", help="train the shapes-world eDiff-I (resumable)")
    train.add_argument("--run-dir", default="runs/shapes", help="checkpoints and logs (resumes from here)")
    train.add_argument("--config", help="JSON file of TrainConfig overrides")
    train.add_argument("--chains", nargs="*", default=["base", "sr", "baseline"], choices=["base", "sr", "baseline"],
                       help="phase chains to run after the encoders (none: encoders only)")
    train.add_argument("--time-budget-s", type=float, metavar="S",
                       help="end training S seconds from now: phases stop early (sharing the time by steps) and "
                            "are marked finished with the steps taken, which the log records")
    train.add_argument("--phases", nargs="+", metavar="PHASE",
                       help="only these phases of the chains (e.g. one process per expert)")
    train.add_argument("--continue-from", metavar="MODEL_DIR",
                       help="seed an empty --run-dir from an exported model to train its experts further, and exit")
    train.add_argument("--continue-baseline", metavar="MODEL_DIR", help="with --continue-from: the baseline model too")
    train.add_argument("--export", metavar="MODEL_DIR", help="write a model directory from finished phases and exit")
    train.add_argument("--baseline", action="store_true", help="with --export: the single-model baseline")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="held-out evaluation table (shapes world)")
    ev.add_argument("--model-dir", help="model to evaluate (default: EDIFFI_MODEL_DIR, else models/default)")
    ev.add_argument("--baseline-dir", help="also evaluate this model (e.g. the single-model baseline)")
    ev.add_argument("--prompts", type=int, default=256, help="held-out prompts (max 256)")
    ev.add_argument("--paint", type=int, default=128, help="paint-with-words cases")
    ev.add_argument("--steps", type=int, default=spec.DEFAULT_STEPS)
    ev.add_argument("--sampler", choices=spec.SAMPLERS, default=spec.DEFAULT_SAMPLER)
    ev.add_argument("--guidance", type=float, default=spec.DEFAULT_GUIDANCE)
    ev.add_argument("--paint-strength", type=float, help="paint-with-words w' (default: the API's default strength)")
    ev.add_argument("--batch", type=int, default=32, help="requests sampled together")
    ev.add_argument("--speed-requests", type=int, default=3,
                    help="single requests timed for images/s (0: not measured, reported as nan)")
    ev.add_argument("--json-out", help="also write the results as JSON here")
    ev.set_defaults(func=cmd_eval)

    from cli.export import add_export_parser

    add_export_parser(sub, cmd_export)

    bench = sub.add_parser("bench", help="benchmarks: engine (in process) | http")
    bench_sub = bench.add_subparsers(dest="bench_target", required=True)
    be = bench_sub.add_parser("engine", help="synthetic load through each batching policy of the engine")
    be.add_argument("--clients", type=int, default=16, help="closed loop: concurrent clients")
    be.add_argument("--requests", type=int, default=32, help="requests per policy (and per rate)")
    be.add_argument("--rates", help="open loop instead: comma-separated Poisson arrival rates, requests/s")
    be.add_argument("--policies", default="step,request,none",
                    help="comma-separated: step, request, none; step:N / step:none / step:auto set its tick budget")
    be.add_argument("--backend", choices=["torch", "onnxruntime", "tensorrt"], default="torch")
    be.add_argument("--device", help="cpu, cuda, cuda:N (default: EDIFFI_DEVICE)")
    be.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    be.add_argument("--compile", choices=["none", "cuda_graphs", "torch_compile"], default="none",
                    help="torch backend on CUDA: a CUDA graph per batch bucket, or torch.compile per expert")
    be.add_argument("--cuda-graphs", dest="compile", action="store_const", const="cuda_graphs",
                    help="shorthand for --compile cuda_graphs")
    be.add_argument("--max-batch", type=int, default=16, help="rows per denoiser call")
    be.add_argument("--max-active", type=int, default=32, help="most requests in flight")
    be.add_argument("--max-rows-per-tick", default="auto",
                    help="step policy's row budget per tick: auto (batch while it pays), none (every pending row) or N")
    be.add_argument("--min-steps", type=int, default=8)
    be.add_argument("--max-steps", type=int, default=16)
    be.add_argument("--samplers", help="comma-separated samplers the load draws from (default: heun,euler,dpmpp_2m; euler_a also)")
    be.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    be.add_argument("--seed", type=int, default=0)
    be.add_argument("--model-dir", help="default: EDIFFI_MODEL_DIR, else models/default, else a random model of its shape")
    be.add_argument("--scratch-dir", default="/tmp/ediffi-bench", help="where a random bench model is built")
    be.add_argument("--json", action="store_true", help="print a JSON list, one object per policy")
    be.add_argument("--profile", action="store_true",
                    help="only print the cost model measured at warm-up (forward time versus batch rows per expert)")
    be.set_defaults(func=cmd_bench_engine)
    bh = bench_sub.add_parser("http", help="the same load through HTTP + Redis + worker processes (end to end)")
    bh.add_argument("--clients", type=int, default=16, help="closed loop: concurrent HTTP clients")
    bh.add_argument("--requests", type=int, default=32, help="requests per policy")
    bh.add_argument("--url", help="drive this running API instead of starting redis, api and workers here")
    bh.add_argument("--metrics-url", action="append", help="with --url: a worker's /metrics (repeatable)")
    bh.add_argument("--api-key", help="with --url: the API key to send (default: $EDIFFI_BENCH_API_KEY)")
    bh.add_argument("--workers", type=int, default=1, help="worker processes to start (without --url)")
    bh.add_argument("--policies", default="step", help="comma-separated worker batching policies: step, request, none")
    bh.add_argument("--compare-engine", action="store_true",
                    help="then run `bench engine` on the same load in this process and report the ratios")
    bh.add_argument("--no-calibrate", action="store_true", help="skip the compute-limit calibration (efficiency)")
    bh.add_argument("--backend", choices=["torch", "onnxruntime", "tensorrt"], default="torch")
    bh.add_argument("--device", help="cpu, cuda, cuda:N (default: EDIFFI_DEVICE)")
    bh.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    bh.add_argument("--max-batch", type=int, default=16, help="rows per denoiser call")
    bh.add_argument("--max-active", type=int, default=32, help="most requests in flight per worker (and its slots)")
    bh.add_argument("--min-steps", type=int, default=8)
    bh.add_argument("--max-steps", type=int, default=16)
    bh.add_argument("--threads", type=int, default=2, help="torch intra-op threads (workers and calibration)")
    bh.add_argument("--seed", type=int, default=0)
    bh.add_argument("--timeout", type=float, default=600, help="per-request HTTP timeout, seconds")
    bh.add_argument("--model-dir", help="default: EDIFFI_MODEL_DIR, else models/default, else a random model of its shape")
    bh.add_argument("--scratch-dir", default="/tmp/ediffi-bench", help="where a random bench model is built")
    bh.add_argument("--json", action="store_true", help="print a JSON list, one object per policy")
    bh.set_defaults(func=cmd_bench_http)
    return parser


def load_settings():
    """``Settings()`` from the environment, or None after one line per invalid variable on stderr
    (``error: EDIFFI_MAX_BATCH: Input should be a valid integer ...``). The value itself is not
    repeated: it may be a secret (an API key, a Redis URL with its password)."""
    from pydantic import ValidationError

    from server.settings import Settings

    try:
        return Settings()
    except ValidationError as exc:
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            if error["loc"]:
                print(f"error: EDIFFI_{str(error['loc'][0]).upper()}: {message}", file=sys.stderr)
            else:  # a rule between settings: its message names them
                print(f"error: {message}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = load_settings()
    if settings is None:
        return 2
    if args.command in ("serve", "api", "worker"):
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args, settings)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
