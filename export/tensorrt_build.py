"""ONNX -> TensorRT engines (`ediffi export tensorrt --onnx O --out T`), and
the pure logic around them that the runtime shares.

NOT EXECUTED HERE: TensorRT cannot be installed on the machines this
project was built on (no NVIDIA GPU with TensorRT). Everything in this module
except `build_engines` runs without it and is unit-tested
(tests/export/test_tensorrt_build.py); `build_engines` and the runtime
(`export/trt_runtime.py`, the one module that calls TensorRT, and
`engines/tensorrt_backend.py`) are written against the documented
TensorRT 10 Python API.

- One engine per expert, built from that expert's ONNX graph, strongly
  typed, with one optimization profile per batch bucket (min = opt = max =
  the bucket: each bucket's kernels are tuned for exactly that batch, and
  the backend runs each bucket on a context of its own profile); every
  other axis is the stage's static shape.
- Precision fp16 (default), bf16 or fp32 is in the graph the builder parses
  (`half_precision_graph`): the float32 export rewritten to float16 or
  bfloat16 except the noise-level path (EDM preconditioning, noise labels,
  the Fourier embedding), softmax and the normalisations, which stay float32
  as in TensorRT's diffusion demo; I/O stays float32.
- A timing cache (`<out>/timing.cache`) is shared by all builds and kept.
- Engine cache: `<out>/<stage>/<expert>/engine-<key>.plan` + `manifest.json`,
  where key = sha256(GPU name, compute capability, TensorRT version, the ONNX
  manifest's hash, precision, buckets). An engine whose key matches is
  reused, not rebuilt; the runtime recomputes the key on load and refuses an
  engine built for another GPU, another TensorRT or a different/stale ONNX
  export, naming which.
- ONNX graphs compute the EDM preconditioning in float64 (as PyTorch does);
  TensorRT has no float64, so `strip_float64` rewrites those few nodes to
  float32 before parsing (checked against ONNX Runtime in the tests).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from export.buckets import batch_buckets
from export.manifest import (
    BATCH,
    ArtifactManifest,
    BatchRange,
    ManifestMismatch,
    TensorRTInfo,
    TensorSpec,
    file_sha256,
    find_manifests,
)

PRECISIONS = ("fp16", "bf16", "fp32")
DTYPE_TO_PRECISION = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
TIMING_CACHE = "timing.cache"


class StaleEngine(ManifestMismatch):
    """A TensorRT engine built for another GPU, TensorRT version or source."""


# -- batch buckets and optimization profiles ------------------------------------


@dataclass(frozen=True)
class BatchProfile:
    """The batch sizes an engine is built for: one optimization profile and
    one CUDA graph per bucket; a call of n rows runs at the smallest bucket
    >= n."""

    buckets: tuple[int, ...]

    @property
    def min(self) -> int:
        return self.buckets[0]

    @property
    def max(self) -> int:
        return self.buckets[-1]

    def as_range(self) -> BatchRange:
        return BatchRange(min=self.min, max=self.max)


def parse_buckets(text: str | Sequence[int] | None) -> list[int] | None:
    """'1,2,4,8' (or a list) -> [1, 2, 4, 8]; None/'' -> None."""
    if text is None or text == "":
        return None
    values = [int(v) for v in text.split(",") if v.strip()] if isinstance(text, str) else [int(v) for v in text]
    return values or None


def make_profile(max_batch: int | None = None, buckets: Sequence[int] | None = None) -> BatchProfile:
    """Buckets from the settings (`trt_batch_buckets`), else the powers of
    two up to max_batch plus max_batch itself (as the other backends warm
    up)."""
    if buckets:
        values = sorted(set(int(b) for b in buckets))
        if values[0] < 1:
            raise ValueError(f"batch buckets must be >= 1, got {list(buckets)}")
        if max_batch is not None and values[-1] != max_batch:
            raise ValueError(
                f"the largest batch bucket ({values[-1]}) must equal max_batch ({max_batch}): "
                "the scheduler sends batches of up to max_batch rows"
            )
    else:
        if max_batch is None:
            raise ValueError("give max_batch or explicit batch buckets")
        values = batch_buckets(int(max_batch))
    return BatchProfile(tuple(values))


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding `rows`; callers chunk above the largest."""
    if rows < 1:
        raise ValueError("a call needs at least one row")
    for b in buckets:
        if rows <= b:
            return b
    raise ValueError(f"{rows} rows exceed the largest batch bucket {buckets[-1]}; chunk the call")


def profile_shapes(inputs: Sequence[TensorSpec], profile: BatchProfile) -> list[dict[str, tuple[tuple[int, ...], ...]]]:
    """One optimization profile per bucket, in bucket order: {input name:
    (min shape, opt shape, max shape)} with min = opt = max = the bucket on
    the batch axis, every other axis static (the manifest must have no other
    symbolic axis)."""
    static = {}
    for spec in inputs:
        dims = list(spec.shape)
        for i, d in enumerate(dims):
            if isinstance(d, str) and (i != 0 or d != BATCH):
                raise ValueError(f"input {spec.name} has a symbolic axis {d!r} at position {i}: only axis 0 ({BATCH}) may be dynamic")
        if not dims or dims[0] != BATCH:
            raise ValueError(f"input {spec.name} has no dynamic batch axis (shape {dims})")
        static[spec.name] = tuple(int(d) for d in dims[1:])
    return [{name: ((bucket, *rest),) * 3 for name, rest in static.items()} for bucket in profile.buckets]


# -- engine cache ------------------------------------------------------------------


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"


def current_gpu(device: int | str | None = None) -> GpuInfo:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT engines are built and run on an NVIDIA GPU; CUDA is not available here")
    index = torch.device(device).index if isinstance(device, str) else device
    index = torch.cuda.current_device() if index is None else index
    major, minor = torch.cuda.get_device_capability(index)
    return GpuInfo(torch.cuda.get_device_name(index), f"{major}.{minor}")


def engine_cache_key(gpu: GpuInfo, trt_version: str, onnx_manifest_sha256: str, precision: str, profile: BatchProfile) -> str:
    """What an engine is only valid for. Any change -> another key -> rebuild."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    payload = {
        "gpu": gpu.name, "compute_capability": gpu.compute_capability, "tensorrt": trt_version,
        "onnx_manifest": onnx_manifest_sha256, "precision": precision, "buckets": list(profile.buckets),
        "profiles": "one per bucket, strongly typed",  # engines built before this layout get another key
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def engine_file(key: str) -> str:
    return f"engine-{key}.plan"


def engine_manifest(onnx_manifest: ArtifactManifest, *, plan_file: str, plan_sha256: str, gpu: GpuInfo,
                    trt_version: str, precision: str, profile: BatchProfile, key: str,
                    workspace_bytes: int | None = None) -> ArtifactManifest:
    """The engine's manifest: the ONNX manifest's source fields, plus what
    TensorRT build it is."""
    data = onnx_manifest.model_dump(exclude={"artifact", "artifact_sha256", "kind", "tensorrt", "batch", "created_at", "exporter"})
    return ArtifactManifest(
        **data, kind="tensorrt_engine", artifact=plan_file, artifact_sha256=plan_sha256, batch=profile.as_range(),
        exporter={"name": "tensorrt", "tensorrt": trt_version, "onnx_exporter": onnx_manifest.exporter},
        tensorrt=TensorRTInfo(
            version=trt_version, gpu_name=gpu.name, compute_capability=gpu.compute_capability, precision=precision,
            buckets=list(profile.buckets), cache_key=key, onnx_manifest_sha256=onnx_manifest.sha256(),
            workspace_bytes=workspace_bytes,
        ),
    )


def engine_problems(manifest: ArtifactManifest, *, gpu: GpuInfo, trt_version: str, precision: str | None = None,
                    onnx_manifest: ArtifactManifest | None = None, expected_source: dict[str, Any] | None = None,
                    folder: Path | None = None, verify_file: bool = True) -> list[str]:
    """Why an engine cannot be used here (empty: it can)."""
    info = manifest.tensorrt
    if manifest.kind != "tensorrt_engine" or info is None:
        return [f"not a TensorRT engine manifest (kind {manifest.kind!r})"]
    problems = []
    if info.gpu_name != gpu.name:
        problems.append(f"built for GPU {info.gpu_name!r}, this GPU is {gpu.name!r}")
    if info.compute_capability != gpu.compute_capability:
        problems.append(f"built for compute capability {info.compute_capability}, this GPU has {gpu.compute_capability}")
    if info.version != trt_version:
        problems.append(f"built with TensorRT {info.version}, this is TensorRT {trt_version}")
    if precision is not None and info.precision != precision:
        problems.append(f"built for {info.precision}, the backend runs {precision}")
    if onnx_manifest is not None and info.onnx_manifest_sha256 != onnx_manifest.sha256():
        problems.append("stale: the ONNX graph was re-exported since this engine was built")
    if expected_source is not None:
        from export.manifest import differences

        problems += differences(manifest, expected_source)
    profile = BatchProfile(tuple(info.buckets))
    key = engine_cache_key(gpu, trt_version, info.onnx_manifest_sha256, info.precision, profile)
    if not problems and key != info.cache_key:
        problems.append(f"cache key {info.cache_key} does not match its own manifest ({key})")
    if folder is not None:
        plan = folder / manifest.artifact
        if not plan.is_file():
            problems.append(f"engine file {plan} is missing")
        elif verify_file and manifest.artifact_sha256 and file_sha256(plan) != manifest.artifact_sha256:
            problems.append(f"engine file {plan} was changed after it was built")
    return problems


def check_engine(folder: Path, manifest: ArtifactManifest, *, fix: str, **kwargs) -> None:
    problems = engine_problems(manifest, folder=folder, **kwargs)
    if problems:
        raise StaleEngine(
            f"refusing TensorRT engine {manifest.stage}/{manifest.expert} at {folder}:\n  - " + "\n  - ".join(problems)
            + f"\nfix: {fix}"
        )


# -- binding dtypes ----------------------------------------------------------------------

# TensorRT DataType names -> the torch dtype a bound buffer must have.
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "BOOL": "bool", "INT32": "int32",
              "INT64": "int64", "INT8": "int8", "UINT8": "uint8"}


def binding_dtype_problems(engine_dtypes: dict[str, str], buffer_dtypes: dict[str, str]) -> list[str]:
    """Why the buffers cannot be bound to the engine's tensors: a tensor
    without a buffer, or a buffer whose dtype is not the engine's
    (`engine.get_tensor_dtype`: TensorRT reads the bytes as its own type,
    silently). dtypes as names: TensorRT's ("HALF") and torch's ("float16").
    A buffer the engine has no tensor for is not a problem (TensorRT may
    drop a graph input nothing reads); it is simply not bound."""
    problems = []
    for name, trt_dtype in engine_dtypes.items():
        if name not in buffer_dtypes:
            problems.append(f"engine tensor {name!r} has no buffer")
            continue
        expected = TRT_DTYPES.get(trt_dtype, trt_dtype)
        if buffer_dtypes[name] != expected:
            problems.append(f"tensor {name!r}: the engine has {trt_dtype} ({expected}), the buffer is {buffer_dtypes[name]}")
    return problems


# -- ONNX graph preparation -----------------------------------------------------------


def retype_graph(model, source: int, target: int, convert: Callable[[Any], Any]) -> int:
    """Rewrite every `source`-typed tensor of an ONNX graph (subgraphs
    included) to `target` in place: Cast targets, declared value types, and
    initializers / Constant values through `convert(tensor) -> TensorProto`.
    Returns how many places changed."""
    changed = 0

    def fix_tensor(t) -> None:
        nonlocal changed
        if t.data_type == source:
            t.CopyFrom(convert(t))
            changed += 1

    def walk(graph) -> None:
        nonlocal changed
        for init in graph.initializer:
            fix_tensor(init)
        for node in graph.node:
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == source:
                    attr.i = target
                    changed += 1
                if attr.HasField("t"):
                    fix_tensor(attr.t)
                for g in attr.graphs:
                    walk(g)
                if attr.HasField("g"):
                    walk(attr.g)
        for value in [*graph.value_info, *graph.input, *graph.output]:
            if value.type.tensor_type.elem_type == source:
                value.type.tensor_type.elem_type = target
                changed += 1

    walk(model.graph)
    return changed


def strip_float64(model) -> int:
    """Rewrite float64 tensors of an ONNX graph to float32 in place (casts,
    initializers, Constant nodes, declared value types). Returns how many
    places changed. TensorRT has no float64."""
    from onnx import TensorProto, numpy_helper

    return retype_graph(model, TensorProto.DOUBLE, TensorProto.FLOAT,
                        lambda t: numpy_helper.from_array(numpy_helper.to_array(t).astype("float32"), t.name))


# Ops a half-precision engine still computes in float32, as TensorRT's
# diffusion demo keeps them: softmax (attention logits reach ~1e3 with
# paint-with-words' w' log(1 + sigma) term) and the normalisations (variance
# of activations).
KEEP_FLOAT32_OPS = ("Softmax", "InstanceNormalization", "GroupNormalization", "LayerNormalization")
# Graph inputs whose whole downstream-only computation stays float32: the EDM
# preconditioning coefficients, the Fourier noise embedding (phases of a few
# hundred radians; ediffi/unet.py FourierEmbedding) and the noise MLPs after
# it (per-row vectors: negligible cost).
NOISE_INPUTS = ("sigma", "low_res_sigma")


def noise_only_nodes(graph, noise_inputs: Sequence[str] = NOISE_INPUTS) -> set[str]:
    """Names of the nodes that depend on the noise-level inputs and on no
    other graph input (the per-row scalar math: preconditioning, noise
    labels, the Fourier embedding), plus the Constant nodes only they use."""
    inputs = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    depends: dict[str, frozenset[str]] = {name: frozenset([name]) for name in inputs}
    keep = set()
    for node in graph.node:  # topological order (ONNX requires it)
        sources = frozenset().union(*(depends.get(name, frozenset()) for name in node.input if name))
        for out in node.output:
            depends[out] = sources
        if sources and sources <= set(noise_inputs):
            keep.add(node.name)
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)
    for node in graph.node:
        if node.op_type == "Constant":
            users = [c for out in node.output for c in consumers.get(out, [])]
            if users and all(u in keep for u in users):
                keep.add(node.name)
    return keep


def half_precision_graph(model, precision: str):
    """The float32 ONNX graph as a strongly typed engine should compute it:
    float16 or bfloat16 everywhere except the noise-level path
    (`noise_only_nodes`) and `KEEP_FLOAT32_OPS`, with casts at the
    boundaries; graph inputs and outputs stay float32. Returns a new model
    (float32: an unchanged copy). float64 nodes are left to `strip_float64`.

    A bfloat16 graph is for TensorRT's parser, not for ONNX Runtime: at the
    exported opset ONNX's schemas of Conv, AveragePool, Sin, ... list no
    bfloat16 (added in opset 22), so it passes `onnx.checker` only without
    the full type check; TensorRT 10 runs these layers in bfloat16."""
    import copy

    model = copy.deepcopy(model)
    if precision == "fp32":
        return model
    if precision not in ("fp16", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from export.onnx_export import toposort

    for i, node in enumerate(model.graph.node):  # the converter blocks nodes by name
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    originals = {t.name: t for t in model.graph.initializer}
    half = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *KEEP_FLOAT32_OPS],
        node_block_list=sorted(noise_only_nodes(model.graph)),
    )
    toposort(half.graph)  # the converter appends its casts at the end
    if precision == "bf16":
        float16_to_bfloat16(half, originals)
    return half


def _bfloat16_tensor(array, name: str):
    """A BFLOAT16 TensorProto of a float array (round to nearest even)."""
    import numpy as np
    import torch
    from onnx import TensorProto, helper

    bits = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(torch.bfloat16).view(torch.int16)
    return helper.make_tensor(name, TensorProto.BFLOAT16, list(array.shape), bits.numpy().tobytes(), raw=True)


def float16_to_bfloat16(model, originals: dict[str, Any]) -> int:
    """Rewrite a float16 graph (made from float32 by the converter) to
    bfloat16 in place: casts, declared types, Constant values, and the
    initializers, re-rounded from their float32 originals (by name) rather
    than from float16. Returns how many places changed."""
    from onnx import TensorProto, numpy_helper

    def convert(t):
        source = originals.get(t.name)
        values = numpy_helper.to_array(source if source is not None and source.data_type == TensorProto.FLOAT else t)
        return _bfloat16_tensor(values.astype("float32"), t.name)

    return retype_graph(model, TensorProto.FLOAT16, TensorProto.BFLOAT16, convert)


def tensorrt_input_graph(path: str | Path, precision: str = "fp32"):
    """The ONNX graph a TensorRT engine of `precision` is built from: the
    exported float32 graph, half precision where `half_precision_graph` puts
    it, float64 stripped. `ediffi export check` runs the float32 one in ONNX
    Runtime against PyTorch, so a build starts from a graph known to be right."""
    import onnx

    graph = half_precision_graph(onnx.load(str(path)), precision)
    strip_float64(graph)
    return graph


# -- the build driver (needs TensorRT and a GPU) --------------------------------------------


def build_engines(onnx_dir: str | Path, out_dir: str | Path, *, profile: BatchProfile, precision: str = "fp16",
                  timing_cache: str | Path | None = None, workspace_bytes: int | None = None, force: bool = False,
                  log: Callable[[str], None] = print) -> list[ArtifactManifest]:
    """Build (or reuse from the cache) one engine per exported expert."""
    from export import trt_runtime

    trt_runtime.require()
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    denoisers = find_manifests(onnx_dir, "denoiser")
    if not denoisers:
        raise FileNotFoundError(f"no exported denoiser graphs under {onnx_dir}; run `ediffi export onnx` first")
    if any(m.dtype != "float32" for _, m in denoisers):
        raise ValueError("build TensorRT engines from float32 ONNX graphs; precision is chosen with --precision")
    gpu, version = current_gpu(), trt_runtime.version()
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_path = Path(timing_cache) if timing_cache else out_dir / TIMING_CACHE
    cache = cache_path.read_bytes() if cache_path.is_file() else None
    built = []
    for folder, onnx_manifest in denoisers:
        key = engine_cache_key(gpu, version, onnx_manifest.sha256(), precision, profile)
        target = out_dir / onnx_manifest.stage / onnx_manifest.expert
        plan_name = engine_file(key)
        if not force and (target / plan_name).is_file() and (target / "manifest.json").is_file():
            existing = ArtifactManifest.load(target)
            if not engine_problems(existing, gpu=gpu, trt_version=version, precision=precision,
                                   onnx_manifest=onnx_manifest, folder=target):
                log(f"cached {onnx_manifest.stage}/{onnx_manifest.expert}: {target / plan_name}")
                built.append(existing)
                continue
        graph = tensorrt_input_graph(folder / onnx_manifest.artifact, precision)
        profiles = profile_shapes(onnx_manifest.inputs, profile)
        log(f"building {onnx_manifest.stage}/{onnx_manifest.expert} ({precision}, strongly typed, "
            f"a profile per batch bucket {list(profile.buckets)}) ...")
        plan, cache = trt_runtime.build_serialized_engine(
            graph.SerializeToString(), profiles, timing_cache=cache, workspace_bytes=workspace_bytes,
        )
        target.mkdir(parents=True, exist_ok=True)
        (target / "manifest.json").unlink(missing_ok=True)
        for old in target.glob("engine-*.plan"):
            old.unlink()
        tmp = target / (plan_name + ".tmp")
        tmp.write_bytes(plan)
        os.replace(tmp, target / plan_name)
        manifest = engine_manifest(onnx_manifest, plan_file=plan_name, plan_sha256=file_sha256(target / plan_name), gpu=gpu,
                                   trt_version=version, precision=precision, profile=profile, key=key,
                                   workspace_bytes=workspace_bytes)
        manifest.save(target)
        if cache:
            cache_path.write_bytes(cache)
        log(f"built {target / plan_name}")
        built.append(manifest)
    return built
