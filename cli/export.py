"""`ediffi export onnx | check | tensorrt` (registered by cli/main.py).

    ediffi export onnx --model-dir D [--out O] [--opset 17] [--dtype float32|float16]
                       [--no-simplify] [--no-encoders] [--exporter torchscript|dynamo]
    ediffi export check --model-dir D [--onnx O] [--threads N] [--no-images] [--json]
    ediffi export tensorrt --onnx O --out T [--precision fp16|bf16|fp32] [--max-batch N]
                           [--buckets 1,2,4,8,16] [--timing-cache F]
                           [--workspace-gib G] [--force]

Defaults come from the settings built at the process edge: the model dir
from --model-dir / EDIFFI_MODEL_DIR / models/default, the ONNX folder from
EDIFFI_ONNX_DIR else <model dir>/onnx, the engines folder from
EDIFFI_TENSORRT_DIR else <model dir>/tensorrt, max batch from
EDIFFI_MAX_BATCH. Exit status: 0 ok, 1 a parity check failed, 2 bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_export_parser(sub, func) -> None:
    export = sub.add_parser("export", help="export experts and encoders to ONNX, check parity, build TensorRT engines")
    export_sub = export.add_subparsers(dest="export_target", required=True)

    onnx = export_sub.add_parser("onnx", help="every expert of every stage (and the T5/CLIP towers) as ONNX graphs")
    onnx.add_argument("--model-dir", help="model directory (default: EDIFFI_MODEL_DIR, else models/default)")
    onnx.add_argument("--out", help="output folder (default: EDIFFI_ONNX_DIR, else <model dir>/onnx)")
    onnx.add_argument("--opset", type=int, default=17, help="ONNX opset (17 or newer)")
    onnx.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                      help="graph dtype (float16: for ONNX Runtime on CUDA; TensorRT builds from float32)")
    onnx.add_argument("--no-simplify", action="store_true", help="skip the onnxslim pass")
    onnx.add_argument("--no-encoders", action="store_true", help="export the experts only")
    onnx.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript")
    onnx.set_defaults(func=func)

    check = export_sub.add_parser("check", help="parity of the ONNX graphs with PyTorch (per graph and whole images)")
    check.add_argument("--model-dir", help="model directory (default: EDIFFI_MODEL_DIR, else models/default)")
    check.add_argument("--onnx", help="ONNX folder (default: EDIFFI_ONNX_DIR, else <model dir>/onnx)")
    check.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: EDIFFI_INTRA_OP_THREADS)")
    check.add_argument("--no-images", action="store_true", help="per-graph errors only")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=func)

    trt = export_sub.add_parser("tensorrt", help="build one TensorRT engine per expert (needs TensorRT and an NVIDIA GPU)")
    trt.add_argument("--onnx", help="ONNX folder (default: EDIFFI_ONNX_DIR, else <model dir>/onnx)")
    trt.add_argument("--model-dir", help="only to find the default folders")
    trt.add_argument("--out", help="engine folder (default: EDIFFI_TENSORRT_DIR, else <model dir>/tensorrt)")
    trt.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="fp16")
    trt.add_argument("--max-batch", type=int, help="largest batch (default: EDIFFI_MAX_BATCH)")
    trt.add_argument("--buckets", help="comma-separated batch buckets (default: powers of two up to max batch)")
    trt.add_argument("--timing-cache", help="timing cache file (default: <out>/timing.cache)")
    trt.add_argument("--workspace-gib", type=float, help="builder workspace limit, GiB")
    trt.add_argument("--force", action="store_true", help="rebuild even when a cached engine matches")
    trt.set_defaults(func=func)


def _model_dir(args, settings) -> Path:
    from cli.main import resolve_model_dir

    return resolve_model_dir(getattr(args, "model_dir", None), settings)


def _onnx_dir(cli_value: str | None, settings, model_dir: Path) -> Path:
    if cli_value:
        return Path(cli_value)
    if getattr(settings, "onnx_dir", None):
        return Path(settings.onnx_dir)
    return model_dir / "onnx"


def run_export(args, settings) -> int:
    from export.manifest import ManifestMismatch

    try:
        if args.export_target == "onnx":
            return _onnx(args, settings)
        if args.export_target == "check":
            return _check(args, settings)
        return _tensorrt(args, settings)
    except (FileNotFoundError, ManifestMismatch, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _onnx(args, settings) -> int:
    from export.onnx_export import export_onnx

    model_dir = _model_dir(args, settings)
    out = _onnx_dir(args.out, settings, model_dir)
    manifests = export_onnx(model_dir, out, opset=args.opset, dtype=args.dtype, simplify=False if args.no_simplify else None,
                            encoders=not args.no_encoders, exporter=args.exporter, log=print)
    print(f"{len(manifests)} graphs in {out} (opset {manifests[0].opset}, {args.dtype}, "
          f"{'simplified' if 'onnxslim' in manifests[0].exporter else 'not simplified'})")
    return 0


def _check(args, settings) -> int:
    import torch

    from export.parity import format_report, report_json, run_check

    model_dir = _model_dir(args, settings)
    onnx_dir = _onnx_dir(args.onnx, settings, model_dir)
    threads = args.threads or getattr(settings, "intra_op_threads", None)
    if threads:
        torch.set_num_threads(threads)
    from engines.onnx_backend import load_onnx_model

    onnx_model = load_onnx_model(model_dir, onnx_dir, threads=threads)
    graphs, images = run_check(model_dir, onnx_model, onnx_dir, threads=threads, images=not args.no_images)
    report = report_json(graphs, images)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"model {model_dir}, graphs {onnx_dir}")
        print(format_report(graphs, images))
        print("parity: " + ("PASS" if report["ok"] else "FAIL"))
    return 0 if report["ok"] else 1


def _tensorrt(args, settings) -> int:
    from export.tensorrt_build import build_engines, make_profile, parse_buckets

    model_dir = _model_dir(args, settings)
    onnx_dir = _onnx_dir(args.onnx, settings, model_dir)
    out = Path(args.out) if args.out else (Path(settings.tensorrt_dir) if getattr(settings, "tensorrt_dir", None)
                                           else model_dir / "tensorrt")
    buckets = parse_buckets(args.buckets) or parse_buckets(getattr(settings, "trt_batch_buckets", None))
    max_batch = args.max_batch or (None if buckets else getattr(settings, "max_batch", 16))
    profile = make_profile(max_batch, buckets)
    workspace = int(args.workspace_gib * (1 << 30)) if args.workspace_gib else None
    built = build_engines(onnx_dir, out, profile=profile, precision=args.precision, timing_cache=args.timing_cache,
                          workspace_bytes=workspace, log=print, force=args.force)
    print(f"{len(built)} engines in {out} (strongly typed {args.precision}, one optimization profile per bucket {list(profile.buckets)})")
    return 0
