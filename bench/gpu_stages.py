"""The stages of `bench/gpu.sh`, one process each:

    python bench/gpu_stages.py STAGE --out FILE.json [options]

Each stage writes its JSON to --out as it goes (after every measurement), so
a stage killed by its timeout still leaves what it measured. On a GPU the
figures are CUDA-event times; with --device cpu (the dry run) the same code
runs on tiny models and says what it skipped.

Stages:
  bare-env   (dry run only) a folder of links to the packages the GPU
             machine's image has (the dependency closure of torch, numpy,
             transformers, onnxruntime in this interpreter), so the dry run
             imports nothing else but the carried wheels.
  model      a tiny random model directory (dry run).
  env        the machine: card, driver, torch/CUDA, package versions and
             where each was imported from (carried wheel or image).
  tests      `pytest -m gpu` on the GPU test files, outcomes as JSON.
  percall    milliseconds per denoiser call vs batch size for each expert,
             one torch mode (eager, cuda_graphs, torch_compile).
  engine     the engine bench (ediffi bench engine's load and policies) at
             several client counts with 3x as many requests as clients;
             efficiency against the max-batch compute rate measured in the
             same run.
  tensorrt   ONNX export, the half-precision graph, engine build and the
             engine bench on TensorRT (skipped, saying why, without it).
  realsize   SD 1.5 / SDXL UNet architectures with random weights through
             the diffusers importer, next to diffusers' own pipeline
             (skipped, saying why, where the importer is missing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

# What the GPU machine's image is known to have (and their dependencies).
GPU_IMAGE_DISTRIBUTIONS = ("torch", "numpy", "transformers", "onnxruntime", "triton")


class Report:
    """A stage's JSON, rewritten atomically after every change."""

    def __init__(self, path: str | Path, stage: str, **fields):
        self.path = Path(path)
        self.data = {"stage": stage, "status": "running", "started_at": time.time(), **fields}
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)

    def update(self, **fields) -> None:
        self.data.update(fields)
        self.save()

    def finish(self, status: str = "ok", **fields) -> None:
        self.update(status=status, finished_at=time.time(), **fields)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ bare-env


def dependency_closure(names) -> list[str]:
    """Distributions installed here that `names` need, transitively (extras
    ignored, environment markers evaluated)."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    seen: dict[str, object] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        seen[key] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            todo.append(req.name)
    return sorted(seen)


def stage_bare_env(args) -> None:
    """Link the GPU image's packages (and, without carried wheels, the
    carried ones) from this interpreter into --dir."""
    from importlib.metadata import distribution

    target = Path(args.dir)
    target.mkdir(parents=True, exist_ok=True)
    names = dependency_closure(GPU_IMAGE_DISTRIBUTIONS)
    carried = [line.split("==")[0].strip() for line in Path(args.wheels_list).read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    if args.link_carried:
        names = sorted(set(names) | set(dependency_closure(carried)))
    else:
        names = [n for n in names if n not in {c.lower() for c in carried}]
    linked = []
    for name in names:
        dist = distribution(name)
        tops = set()
        for file in dist.files or []:
            part = file.parts[0]
            if part.endswith(".dist-info") or part == ".." or part.endswith(".pth"):
                continue
            tops.add(part)
        tops.add(Path(str(dist._path)).name)  # its .dist-info, so importlib.metadata sees it
        site = Path(str(dist._path)).parent
        for top in tops:
            source, link = site / top, target / top
            if source.exists() and not link.exists():
                link.symlink_to(source)
        linked.append(f"{name}=={dist.version}")
    report = Report(args.out, "bare-env", dir=str(target), linked=linked, carried_linked=args.link_carried)
    report.finish()


# ------------------------------------------------------------------ model


def stage_model(args) -> None:
    from ediffi.model import build_random_model_dir

    report = Report(args.out, "model")
    path = Path(args.dir)
    if not (path / "model.json").is_file():
        build_random_model_dir(path, seed=0)
    report.finish(model_dir=str(path))


# ------------------------------------------------------------------ env


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def stage_env(args) -> None:
    report = Report(args.out, "env")
    data: dict = {"python": sys.version.split()[0], "platform": platform.platform(), "executable": sys.executable}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        data["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        data["nvidia_smi"] = f"unavailable ({type(exc).__name__})"
    import torch

    data["torch"] = torch.__version__
    data["torch_cuda_build"] = torch.version.cuda
    data["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        data["device"] = torch.cuda.get_device_name(0)
        data["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        data["device_count"] = torch.cuda.device_count()
        data["bf16_supported"] = torch.cuda.is_bf16_supported()
    packages = {}
    for name in ("numpy", "transformers", "tokenizers", "safetensors", "onnxruntime", "onnx", "onnxslim", "triton",
                 "tensorrt", "pydantic", "pydantic-settings", "redis", "pytest", "pillow", "diffusers"):
        packages[name] = _version(name)
    data["packages"] = packages
    import importlib.util

    modules = {}
    for module in ("pydantic", "pydantic_settings", "onnx", "PIL", "pytest", "redis", "torch", "transformers"):
        spec = importlib.util.find_spec(module)  # where it would be imported from, without importing it
        modules[module] = str(Path(spec.origin).parent) if spec and spec.origin else "not importable: not found"
    data["imported_from"] = modules
    import onnxruntime

    data["onnxruntime_providers"] = onnxruntime.get_available_providers()
    from export import trt_runtime

    data["tensorrt"] = dict(zip(("available", "detail"), trt_runtime.available()))
    report.finish(**data)
    if args.require_cuda and not torch.cuda.is_available():
        sys.exit("torch sees no CUDA device: this stage was asked to require one")


# ------------------------------------------------------------------ tests


class _Outcomes:
    def __init__(self):
        self.results: list[dict] = []

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            entry = {"test": report.nodeid, "outcome": report.outcome, "seconds": round(report.duration, 3)}
            if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
                entry["reason"] = report.longrepr[2]
            elif report.outcome == "failed":
                entry["error"] = str(report.longrepr)[-2000:]
            self.results.append(entry)


def stage_tests(args) -> None:
    import pytest

    report = Report(args.out, "tests", files=args.files)
    outcomes = _Outcomes()
    code = pytest.main(["-q", "-p", "no:cacheprovider", "-m", "gpu", "-rs", *args.files], plugins=[outcomes])
    counts: dict[str, int] = {}
    for r in outcomes.results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    report.finish("ok" if int(code) in (0, 5) else "failed", exit_code=int(code), counts=counts, results=outcomes.results)
    if int(code) not in (0, 5):  # 5: nothing collected
        sys.exit(int(code))


# ------------------------------------------------------------------ percall


def _backend(args, backend: str = "torch", compile_mode: str | None = None, max_batch: int | None = None):
    import torch

    from engines.engine import make_backend

    if args.device == "cpu":
        torch.set_num_threads(1)  # the dry run, on a shared CPU
    return make_backend(backend, args.model_dir, device=args.device, dtype=args.dtype,
                        max_batch=max_batch or args.max_batch, compile_mode=compile_mode,
                        tensorrt_dir=getattr(args, "tensorrt_dir", None), onnx_dir=getattr(args, "onnx_dir", None))


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def stage_percall(args) -> None:
    batches = [int(b) for b in args.batches.split(",")]
    report = Report(args.out, "percall", mode=args.mode, dtype=args.dtype, device=args.device, batches=batches,
                    model_dir=str(args.model_dir), repeats=args.repeats, rows={})
    if args.mode != "eager" and not args.device.startswith("cuda"):
        report.finish("skipped", reason=f"{args.mode} needs a CUDA device (dry run on {args.device})")
        return
    import torch

    build_start = time.perf_counter()
    backend = _backend(args, compile_mode=None if args.mode == "eager" else args.mode, max_batch=max(batches))
    report.update(backend=backend.describe(), load_s=round(time.perf_counter() - build_start, 2))
    rows: dict[str, dict[str, dict]] = {}

    def measure(stage: str, expert: str, batch: int) -> tuple[float, float]:
        """(first call s, median ms per call), on the backend's device thread as the engine
        calls it (timed from another thread, each call would also pay the hand-over)."""
        with torch.inference_mode():
            inputs = backend.dummy_inputs(stage, batch)
            first = time.perf_counter()
            backend.run(stage, expert, inputs)  # capture / compile / allocator growth
            backend.synchronize()
            first_s = time.perf_counter() - first
            for _ in range(2):
                backend.run(stage, expert, inputs)
            timers = []
            for _ in range(args.repeats):
                timer = backend.batch_timer()
                backend.run(stage, expert, inputs)
                timers.append(timer.stop())
            backend.synchronize()
        return first_s, _median([t.seconds for t in timers]) * 1000

    for stage, expert in backend.experts():
        for batch in batches:
            first_s, ms = backend.device_thread.call(measure, stage, expert, batch)
            rows.setdefault(f"{stage}/{expert}", {})[str(batch)] = {
                "ms_per_call": round(ms, 4), "ms_per_row": round(ms / batch, 4), "first_call_s": round(first_s, 3),
            }
            report.update(rows=rows)
            log(f"{args.mode} {stage}/{expert} batch {batch}: {ms:.3f} ms/call")
    report.finish()


# ------------------------------------------------------------------ engine


def _engine_bench(backend, args, report: Report) -> None:
    from bench.engine_bench import LoadConfig, run_bench

    clients = [int(c) for c in args.clients.split(",")]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    results: dict[str, list] = {}
    for count in clients:
        load = LoadConfig(clients=count, requests=args.requests_per_client * count, min_steps=args.min_steps,
                          max_steps=args.max_steps, seed=args.seed)
        out = run_bench(backend, policies, load, max_active_requests=max(32, count), log=log)
        results[str(count)] = [r.to_json() for r in out]
        report.update(results=results, summary=summarize(results))
        for r in out:
            log(f"{count} clients {r.policy}: {r.throughput_images_per_s:.2f} images/s, p95 {r.latency_p95_s:.2f} s, "
                f"mean batch {r.mean_batch_size:.1f}, efficiency {r.efficiency:.1%}")
    failed = sum(r["failed"] for rs in results.values() for r in rs)
    report.finish("ok" if failed == 0 else "failed", failed_requests=failed)
    if failed:
        sys.exit(f"{failed} requests failed")


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
    """Per client count: step/none throughput, step p95 / request p95, and
    each policy's efficiency (throughput / compute limit of the same run)."""
    summary = {}
    for count, rows in results.items():
        by = {r["policy"]: r for r in rows}
        entry = {f"efficiency_{p}": round(r["efficiency"], 4) for p, r in by.items()}
        if "step" in by and "none" in by and by["none"]["throughput_images_per_s"] > 0:
            entry["step_over_none_throughput"] = round(
                by["step"]["throughput_images_per_s"] / by["none"]["throughput_images_per_s"], 3)
        if "step" in by and "request" in by and by["request"]["latency_p95_s"] > 0:
            entry["step_p95_over_request_p95"] = round(by["step"]["latency_p95_s"] / by["request"]["latency_p95_s"], 3)
        summary[count] = entry
    return summary


def stage_engine(args) -> None:
    compile_mode = None if args.compile == "none" else args.compile
    report = Report(args.out, "engine", backend=args.backend, compile=args.compile, dtype=args.dtype,
                    device=args.device, max_batch=args.max_batch, clients=args.clients, policies=args.policies,
                    requests_per_client=args.requests_per_client, steps=[args.min_steps, args.max_steps],
                    model_dir=str(args.model_dir))
    if compile_mode and not args.device.startswith("cuda"):
        report.finish("skipped", reason=f"{compile_mode} needs a CUDA device (dry run on {args.device})")
        return
    start = time.perf_counter()
    backend = _backend(args, compile_mode=compile_mode)
    backend.warmup()
    report.update(backend_name=backend.describe(), warmup_s=round(time.perf_counter() - start, 2))
    _engine_bench(backend, args, report)


# ------------------------------------------------------------------ tensorrt


def stage_tensorrt(args) -> None:
    import onnx

    from export import trt_runtime
    from export.onnx_export import export_onnx
    from export.manifest import find_manifests
    from export.tensorrt_build import DTYPE_TO_PRECISION, build_engines, make_profile, tensorrt_input_graph

    precision = DTYPE_TO_PRECISION[args.dtype]
    report = Report(args.out, "tensorrt", precision=precision, device=args.device, model_dir=str(args.model_dir))
    work = Path(args.work_dir)
    onnx_dir = work / "onnx"
    start = time.perf_counter()
    export_onnx(args.model_dir, onnx_dir, simplify=False, encoders=False, log=log)
    graphs = {}
    for folder, manifest in find_manifests(onnx_dir, "denoiser"):
        graph = tensorrt_input_graph(folder / manifest.artifact, precision)
        onnx.checker.check_model(graph)
        graphs[f"{manifest.stage}/{manifest.expert}"] = len(graph.graph.node)
    report.update(export_s=round(time.perf_counter() - start, 2), half_precision_graphs=graphs)
    ok, why = trt_runtime.available()
    if not ok or not args.device.startswith("cuda"):
        report.finish("skipped", reason=f"engines not built: {why if not ok else 'no CUDA device'}")
        return
    start = time.perf_counter()
    build_engines(onnx_dir, work / "engines", profile=make_profile(args.max_batch), precision=precision, log=log)
    report.update(build_s=round(time.perf_counter() - start, 2))
    args.tensorrt_dir, args.onnx_dir = work / "engines", onnx_dir
    backend = _backend(args, backend="tensorrt")
    backend.warmup()
    report.update(backend_name=backend.describe())
    _engine_bench(backend, args, report)


# ------------------------------------------------------------------ realsize


REALSIZE_CONFIGS = ROOT / "bench" / "configs"
REALSIZE_ARCHS = {"sd15": 512, "sdxl": 1024}  # architecture -> native size in pixels


def diffusers_importer_available() -> tuple[bool, str]:
    """Whether `ediffi import diffusers` (issue 17) and diffusers itself
    are importable here."""
    try:
        from ediffi.importers.diffusers import import_diffusers  # noqa: F401
    except ImportError as exc:
        return False, f"`ediffi import diffusers` (the diffusers importer of issue 17) is not importable here ({exc})"
    try:
        import diffusers  # noqa: F401
    except ImportError as exc:
        return False, f"diffusers is not installed ({exc})"
    return True, ""


def random_pipeline(arch: str, folder: Path, device: str, dtype) -> Path:
    """A diffusers pipeline folder with the real UNet architecture of `arch`
    (bench/configs/<arch>/unet/config.json) and random weights, built on
    `device`; small text encoders of the real widths (2 layers) and a small
    VAE with the real 8x latent factor: the UNet is what is measured."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    from tests.support.diffusers import SD_SCHEDULER, SDXL_SCHEDULER, clip_text_encoder, clip_tokenizer

    config = json.loads((REALSIZE_CONFIGS / arch / "unet" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config).to(dtype).eval()
        vae = AutoencoderKL(block_out_channels=[16, 16, 16, 16], latent_channels=4, norm_num_groups=8,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            sample_size=REALSIZE_ARCHS.get(arch, 64)).to(dtype).eval()
    tokenizer = clip_tokenizer()
    if config.get("addition_embed_type") == "text_time":
        from diffusers import StableDiffusionXLPipeline

        tokenizer_2 = clip_tokenizer(pad_token="!")
        pipe = StableDiffusionXLPipeline(
            vae=vae, unet=unet, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
            text_encoder=clip_text_encoder(tokenizer, 768, None, 1).to(dtype),
            text_encoder_2=clip_text_encoder(tokenizer_2, 1280, 1280, 2).to(dtype),
            scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), force_zeros_for_empty_prompt=True, add_watermarker=False,
        )
    else:
        from diffusers import PNDMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=vae, unet=unet, tokenizer=tokenizer, text_encoder=clip_text_encoder(tokenizer, config["cross_attention_dim"], None, 1).to(dtype),
            scheduler=PNDMScheduler(**SD_SCHEDULER), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def diffusers_side(folder: Path, size: int, device: str, dtype, steps: int, guidance: float, requests: int,
                   batches: list[int]) -> dict:
    """diffusers' own pipeline on the same weights (Euler with Karras sigmas,
    as the imported model samples): one request at a time, then each static
    batch; images/s of each and the best."""
    import torch
    from diffusers import DiffusionPipeline

    from tests.support.diffusers import karras_euler

    pipe = karras_euler(DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype).to(device))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def call(batch: int, seed: int) -> float:
        generator = torch.Generator(device).manual_seed(seed)
        start = time.perf_counter()
        pipe(["a red house on a hill"] * batch, num_inference_steps=steps, guidance_scale=guidance, height=size,
             width=size, generator=generator, output_type="np")
        sync()
        return time.perf_counter() - start

    call(1, 0)  # warm: kernels, allocator
    latencies = [call(1, seed) for seed in range(requests)]
    out = {"one_at_a_time": {"requests": requests, "images_per_s": requests / sum(latencies),
                             "latency_p50_s": _median(latencies)}}
    static = {}
    for batch in batches:
        call(batch, 0)
        seconds = call(batch, 1)
        static[str(batch)] = {"images_per_s": batch / seconds, "seconds": seconds}
    out["static_batch"] = static
    out["best_static_batch"] = max(static, key=lambda b: static[b]["images_per_s"]) if static else None
    return out


def stage_realsize(args) -> None:
    archs = [a for a in args.archs.split(",") if a]
    report = Report(args.out, "realsize", archs=archs, device=args.device, dtype=args.dtype, steps=args.steps,
                    clients=args.clients, configs=sorted(str(p.relative_to(ROOT)) for p in REALSIZE_CONFIGS.glob("*/unet/config.json")))
    ok, why = diffusers_importer_available()
    if not ok:
        report.finish("skipped", reason=why)
        return
    import torch

    from ediffi.importers.diffusers import import_diffusers
    from bench.engine_bench import LoadConfig, run_bench

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    work = Path(args.work_dir)
    results: dict[str, dict] = {}
    for arch in archs:
        size = REALSIZE_ARCHS.get(arch, args.size)
        entry: dict = {"size": size}
        results[arch] = entry
        start = time.perf_counter()
        if arch in REALSIZE_ARCHS:
            folder = random_pipeline(arch, work / arch, args.device, dtype)
        else:  # the dry run: the tests' tiny pipelines, same code path after this
            from tests.support.diffusers import build_tiny_sd, build_tiny_sdxl

            folder = build_tiny_sd(work / "tiny") if arch == "tiny-sd" else build_tiny_sdxl(work / "tiny")[0]
        model_dir = work / f"{arch}-model"
        import_diffusers(folder, model_dir, replace=True)  # a rerun in the same work dir
        entry["build_and_import_s"] = round(time.perf_counter() - start, 2)
        report.update(results=results)
        backend = _backend(argparse.Namespace(**{**vars(args), "model_dir": model_dir}),
                           compile_mode="cuda_graphs" if args.device.startswith("cuda") else None)
        backend.warmup()
        entry["ours_backend"] = backend.describe()
        ours = {}
        for count in [int(c) for c in args.clients.split(",")]:
            load = LoadConfig(clients=count, requests=3 * count, min_steps=args.steps, max_steps=args.steps,
                              samplers=("euler",), guidance=(args.guidance,), p_paint=0.0, p_style=0.0, seed=0)
            ours[str(count)] = [r.to_json() for r in run_bench(backend, ["step", "request", "none"], load,
                                                                max_active_requests=max(32, count), log=log)]
            entry["ours"] = ours
            entry["ours_summary"] = summarize(ours)
            report.update(results=results)
        backend.close()  # its device thread exits; the weights go with the last reference
        del backend
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        entry["diffusers"] = diffusers_side(folder, size, args.device, dtype, args.steps, args.guidance,
                                            requests=3, batches=[int(b) for b in args.diffusers_batches.split(",")])
        report.update(results=results)
    report.finish()


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)

    def add(name, func):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True, help="the stage's JSON file")
        p.set_defaults(func=func)
        return p

    def run_options(p):
        p.add_argument("--model-dir", type=Path, required=True)
        p.add_argument("--device", default="cuda")
        p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
        p.add_argument("--max-batch", type=int, default=64)

    def load_options(p):
        p.add_argument("--clients", default="1,8,32")
        p.add_argument("--requests-per-client", type=int, default=3)
        p.add_argument("--policies", default="step,request,none")
        p.add_argument("--min-steps", type=int, default=8)
        p.add_argument("--max-steps", type=int, default=16)
        p.add_argument("--seed", type=int, default=0)

    p = add("bare-env", stage_bare_env)
    p.add_argument("--dir", required=True)
    p.add_argument("--wheels-list", default=str(ROOT / "bench" / "gpu-wheels.txt"))
    p.add_argument("--link-carried", action="store_true", help="no carried wheels: link those packages from here too")
    p = add("model", stage_model)
    p.add_argument("--dir", required=True)
    p = add("env", stage_env)
    p.add_argument("--require-cuda", action="store_true")
    p = add("tests", stage_tests)
    p.add_argument("files", nargs="+")
    p = add("percall", stage_percall)
    run_options(p)
    p.add_argument("--mode", choices=["eager", "cuda_graphs", "torch_compile"], default="eager")
    p.add_argument("--batches", default="1,2,4,8,16,32,64")
    p.add_argument("--repeats", type=int, default=10)
    p = add("engine", stage_engine)
    run_options(p)
    load_options(p)
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"])
    p.add_argument("--compile", default="none", choices=["none", "cuda_graphs", "torch_compile"])
    p = add("tensorrt", stage_tensorrt)
    run_options(p)
    load_options(p)
    p.add_argument("--work-dir", required=True)
    p = add("realsize", stage_realsize)
    run_options(p)
    p.add_argument("--archs", default="sd15,sdxl", help="sd15, sdxl (bench/configs), or tiny-sd / tiny-sdxl (dry run)")
    p.add_argument("--size", type=int, default=64, help="image size of the tiny pipelines")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--diffusers-batches", default="1,2,4,8,16")
    p.add_argument("--work-dir", required=True)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
