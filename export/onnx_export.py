"""PyTorch -> ONNX: every expert of every stage as its own graph, plus the
T5, CLIP text and CLIP vision towers.

Each denoiser graph has the docs/architecture.md §3 call contract as its inputs, in order:
`x [B,C,H,W]`, `sigma [B]` (per row), `context [B,L,D]`, `context_mask [B,L]`
(bool), `pooled [B,P]`, `pww_mask [B,L,H,W]`, `pww_strength [B]`, and for SR
stages `low_res [B,C,H,W]` and `low_res_sigma [B]`; one output `denoised
[B,C,H,W]`. The batch axis is dynamic (named "batch"); every other axis is
fixed by the stage's resolution and the encoders' token counts.

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)` by
default (seconds per graph; constant folding on), or `exporter="dynamo"`
(torch.export based; slower, no custom symbolic needed). The one operator the
TorchScript exporter cannot convert on its own is the area resize of the
paint-with-words mask (`F.interpolate(mode="area")`, i.e. adaptive average
pooling whose output size comes from a traced shape): a scoped custom
symbolic turns it into an AveragePool using the statically known input and
output resolutions. The graph is then simplified with onnxslim when it is
installed, and validated with `onnx.checker.check_model(full_check=True)`.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from ediffi.config import ExpertConfig, ModelConfig, StageConfig
from ediffi.model import EDiffIModel, load_model
from ediffi.pipeline import DenoiserInputs
from export.manifest import (
    BATCH,
    ENCODER_KINDS,
    ONNX_FILE,
    ArtifactManifest,
    BatchRange,
    SourceFile,
    TensorSpec,
    denoiser_dir,
    encoder_dir,
    encoder_weights,
    file_sha256,
)

DEFAULT_OPSET = 17
MIN_OPSET = 17
DENOISER_INPUTS = ("x", "sigma", "context", "context_mask", "pooled", "pww_mask", "pww_strength")
SR_INPUTS = ("low_res", "low_res_sigma")
DENOISER_OUTPUTS = ("denoised",)
EXPORTERS = ("torchscript", "dynamo")

_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 9: "bool", 7: "int64", 6: "int32", 11: "float64"}


def denoiser_input_names(super_resolution: bool) -> list[str]:
    return list(DENOISER_INPUTS) + (list(SR_INPUTS) if super_resolution else [])


class DenoiserGraph(nn.Module):
    """An expert with explicit positional inputs (what the exporter traces)."""

    def __init__(self, expert: nn.Module, super_resolution: bool):
        super().__init__()
        self.expert = expert
        self.super_resolution = super_resolution

    def forward(self, x, sigma, context, context_mask, pooled, pww_mask, pww_strength, low_res=None, low_res_sigma=None):
        if self.super_resolution:
            return self.expert(x, sigma, context, context_mask, pooled, pww_mask, pww_strength, low_res, low_res_sigma)
        return self.expert(x, sigma, context, context_mask, pooled, pww_mask, pww_strength)


class _T5Graph(nn.Module):
    def __init__(self, tower):
        super().__init__()
        self.tower = tower

    def forward(self, input_ids, attention_mask):
        return self.tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _ClipTextGraph(nn.Module):
    def __init__(self, tower):
        super().__init__()
        self.tower = tower

    def forward(self, input_ids, attention_mask):
        out = self.tower(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state, out.text_embeds


class _ClipVisionGraph(nn.Module):
    def __init__(self, tower):
        super().__init__()
        self.tower = tower

    def forward(self, pixel_values):
        return self.tower(pixel_values=pixel_values).image_embeds


ENCODER_IO = {
    "t5": (("input_ids", "attention_mask"), ("last_hidden_state",)),
    "clip_text": (("input_ids", "attention_mask"), ("last_hidden_state", "text_embeds")),
    "clip_vision": (("pixel_values",), ("image_embeds",)),
}


# -- inputs ---------------------------------------------------------------------


def context_length(config: ModelConfig) -> int:
    return config.encoders.t5.max_length + config.encoders.clip_text.max_length


def expert_sigma_range(stage: StageConfig, expert: ExpertConfig) -> tuple[float, float]:
    """The part of the expert's interval a sampler can reach (finite)."""
    lo = max(expert.sigma_lo, stage.sigma_min)
    hi = min(expert.sigma_hi_value, stage.sigma_max)
    if not hi > lo:
        hi = lo * 2 + 1e-3
    return lo, hi


def random_denoiser_inputs(config: ModelConfig, stage: StageConfig, expert: ExpertConfig, rows: int, seed: int = 0,
                           dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> DenoiserInputs:
    """Fixed random inputs that exercise every per-row input: sigmas spread
    log-uniformly over the expert's interval (its lower boundary included),
    partly masked contexts (one row fully unconditional), painted masks with
    per-row strengths, and for SR stages a per-row augmentation level."""
    g = torch.Generator().manual_seed(seed)
    net = expert.network
    size, ch, length = stage.image_size, stage.channels, context_length(config)
    lo, hi = expert_sigma_range(stage, expert)
    u = torch.rand(rows, generator=g, dtype=torch.float64)
    sigma = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    sigma[0] = lo
    mask = torch.rand(rows, length, generator=g) < 0.7
    mask[:, 0] = True
    if rows > 1:
        mask[-1] = False  # an unconditional row: only the null key is visible
    pww = torch.rand(rows, length, size, size, generator=g) * (torch.rand(rows, length, 1, 1, generator=g) < 0.3)
    inputs = DenoiserInputs(
        x=torch.randn(rows, ch, size, size, generator=g) * sigma.float()[:, None, None, None],
        sigma=sigma.float(),
        context=torch.randn(rows, length, net.context_dim, generator=g) * mask[..., None],
        context_mask=mask,
        pooled=torch.randn(rows, net.pooled_dim, generator=g),
        pww_mask=pww,
        pww_strength=torch.rand(rows, generator=g),
    )
    if stage.is_super_resolution:
        inputs.low_res = torch.randn(rows, ch, size, size, generator=g).clamp(-1, 1)
        inputs.low_res_sigma = stage.low_res_aug_sigma + 0.05 * torch.rand(rows, generator=g)
    return DenoiserInputs(**{
        k: (None if (v := getattr(inputs, k)) is None else (v.to(device, dtype) if v.is_floating_point() else v.to(device)))
        for k in DenoiserInputs.__dataclass_fields__
    })


def denoiser_args(inputs: DenoiserInputs, super_resolution: bool) -> tuple[torch.Tensor, ...]:
    return tuple(getattr(inputs, name) for name in denoiser_input_names(super_resolution))


def encoder_example_inputs(model: EDiffIModel, kind: str, rows: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    enc = model.encoders
    prompts = ["a red circle on the left and a blue square", "two yellow triangles", "", "a cat in a house at night"]
    prompts = (prompts * (rows // len(prompts) + 1))[:rows]
    if kind == "t5":
        batch = enc.t5_tokenizer(prompts, padding="max_length", truncation=True, max_length=enc.t5_length, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]
    if kind == "clip_text":
        batch = enc.clip_tokenizer(prompts, padding="max_length", truncation=True, max_length=enc.clip_length, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]
    size = enc.clip_vision.config.image_size
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 3, size, size, generator=g),)


def encoder_module(model: EDiffIModel, kind: str) -> nn.Module:
    enc = model.encoders
    return {"t5": lambda: _T5Graph(enc.t5), "clip_text": lambda: _ClipTextGraph(enc.clip_text),
            "clip_vision": lambda: _ClipVisionGraph(enc.clip_vision)}[kind]().eval()


# -- the exporter -----------------------------------------------------------------


def _adaptive_avg_pool2d_symbolic(g, input, output_size):
    """aten::adaptive_avg_pool2d with a traced output size: both resolutions
    are static in our graphs (only the batch axis is dynamic), so it is an
    AveragePool with kernel = stride = input / output."""
    from torch.onnx._internal.torchscript_exporter import symbolic_helper

    in_sizes = symbolic_helper._get_tensor_sizes(input)
    out_sizes = symbolic_helper._get_tensor_sizes(g.original_node.output())
    spatial_in, spatial_out = in_sizes[2:], out_sizes[2:]
    if None in spatial_in or None in spatial_out or any(i % o for i, o in zip(spatial_in, spatial_out)):
        return symbolic_helper._onnx_unsupported(
            f"adaptive_avg_pool2d from {spatial_in} to {spatial_out} (needs static sizes, input a multiple of output)", input
        )
    if list(spatial_out) == [1, 1]:
        return g.op("GlobalAveragePool", input)
    kernel = [i // o for i, o in zip(spatial_in, spatial_out)]
    return g.op("AveragePool", input, kernel_shape_i=kernel, strides_i=kernel)


@contextlib.contextmanager
def _torchscript_symbolics(opset: int) -> Iterator[None]:
    name = "aten::adaptive_avg_pool2d"
    torch.onnx.register_custom_op_symbolic(name, _adaptive_avg_pool2d_symbolic, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic(name, opset)


def export_module(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
                  output_names: list[str], opset: int = DEFAULT_OPSET, exporter: str = "torchscript") -> None:
    """Export with a dynamic batch axis on every input and output."""
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old; use {MIN_OPSET} or newer")
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    module = module.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints from static shapes
        if exporter == "torchscript":
            with _torchscript_symbolics(opset):
                torch.onnx.export(
                    module, args, str(path), input_names=input_names, output_names=output_names,
                    dynamic_axes={n: {0: BATCH} for n in [*input_names, *output_names]},
                    opset_version=opset, do_constant_folding=True, dynamo=False,
                )
        else:
            batch = torch.export.Dim(BATCH, min=1, max=4096)
            torch.onnx.export(
                module, args, str(path), input_names=input_names, output_names=output_names,
                dynamic_shapes={n: {0: batch} for n in input_names}, opset_version=opset, dynamo=True,
                optimize=True, external_data=False, verbose=False,
            )


def simplify_available() -> bool:
    try:
        import onnxslim  # noqa: F401
    except ImportError:
        return False
    return True


def pin_output_shapes(model, shapes: dict[str, tuple[int, ...]]) -> None:
    """Give every output its static non-batch dims (as the traced PyTorch
    module produced them) where the exporter left a symbolic name."""
    for value in model.graph.output:
        if value.name not in shapes:
            continue
        dims = value.type.tensor_type.shape.dim
        for i, (dim, size) in enumerate(zip(dims, shapes[value.name])):
            if i == 0:
                dim.dim_param = BATCH
            elif dim.dim_param or dim.dim_value != size:
                dim.Clear()
                dim.dim_value = int(size)


def toposort(graph) -> None:
    """Reorder graph.node so every node follows the producers of its inputs."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise RuntimeError(f"graph has a cycle or a dangling input near node {pending[0].name!r}")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def finalize_graph(path: Path, *, simplify: bool, dtype: str = "float32",
                   output_shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """Pin the output shapes, optional onnxslim pass, optional float16
    conversion, then the full checker (on the saved file, so external data
    works too)."""
    import onnx

    if simplify or dtype != "float32" or output_shapes:
        model = onnx.load(str(path))
        if output_shapes:
            pin_output_shapes(model, output_shapes)
        if simplify:
            import onnxslim

            model = onnxslim.slim(model)
        if dtype == "float16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(model, keep_io_types=False)
            toposort(model.graph)  # the converter appends its casts at the end
        elif dtype != "float32":
            raise ValueError(f"ONNX export supports float32 and float16 graphs, not {dtype}")
        tmp = path.with_suffix(".tmp.onnx")
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    onnx.checker.check_model(str(path), full_check=True)


def graph_tensor_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec], int]:
    """(inputs, outputs, opset) as the saved graph declares them."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def spec(value) -> TensorSpec:
        t = value.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        return TensorSpec(name=value.name, dtype=_ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), shape=shape)

    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output], opset


def exporter_versions(exporter: str, simplified: bool) -> dict:
    import onnx

    versions = {"name": f"torch.onnx ({exporter})", "torch": torch.__version__, "onnx": onnx.__version__}
    if simplified:
        import onnxslim

        versions["onnxslim"] = getattr(onnxslim, "__version__", "unknown")
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return versions


def _check_dynamic_batch(specs: list[TensorSpec], where: str) -> None:
    for t in specs:
        if not t.shape or t.shape[0] != BATCH:
            raise RuntimeError(f"{where}: tensor {t.name} lost its dynamic batch axis (shape {t.shape})")


def verify_graph(path: Path, module: nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str], dtype: str) -> None:
    """Run the finished graph in ONNX Runtime on `args` (not the batch size
    it was traced at) and refuse it when it strays from the PyTorch module
    beyond the parity limit: a graph is only written with a manifest once it
    is known to compute what the module computes. (A simplifier pass that
    folded the coordinate channels to a constant once shipped base experts
    that drew garbage; issue 14.)"""
    import onnxruntime as ort

    from export.parity import GRAPH_MAX_REL, errors

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed_dtype = torch.float16 if dtype == "float16" else torch.float32
    feed = {name: (t.to(feed_dtype) if t.is_floating_point() else t).numpy() for name, t in zip(input_names, args)}
    with torch.no_grad():
        ref = module.eval()(*args)
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = session.run(None, feed)
    limit = GRAPH_MAX_REL[dtype]
    for out, (g, r) in enumerate(zip(got, ref)):
        max_abs, max_rel = errors(torch.from_numpy(g).float(), r.float())
        if not max_rel <= limit:  # NaN fails too
            raise RuntimeError(
                f"{path}: the exported graph differs from PyTorch (output {out}, {len(args[0])} rows): max rel err "
                f"{max_rel:.3e} > {limit:.0e} (max abs {max_abs:.3e}); not writing its manifest"
            )


def _write(folder: Path, build: Callable[[Path], dict[str, tuple[int, ...]]], manifest_fields: dict, *, simplify: bool,
           dtype: str, exporter: str, verify: Callable[[Path], None]) -> ArtifactManifest:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").unlink(missing_ok=True)  # no manifest until the graph is complete and verified
    path = folder / ONNX_FILE
    output_shapes = build(path)
    finalize_graph(path, simplify=simplify, dtype=dtype, output_shapes=output_shapes)
    verify(path)
    inputs, outputs, opset = graph_tensor_specs(path)
    _check_dynamic_batch(inputs + outputs, str(path))
    manifest = ArtifactManifest(
        artifact=ONNX_FILE, artifact_sha256=file_sha256(path), inputs=inputs, outputs=outputs, opset=opset,
        dtype=dtype, batch=BatchRange(min=1, opt=None, max=None), exporter=exporter_versions(exporter, simplify),
        **manifest_fields,
    )
    manifest.save(folder)
    return manifest


def export_expert(model: EDiffIModel, stage: StageConfig, expert: ExpertConfig, out_dir: str | Path, *,
                  source_sha256: str, opset: int = DEFAULT_OPSET, dtype: str = "float32", simplify: bool = False,
                  exporter: str = "torchscript", trace_rows: int = 2) -> ArtifactManifest:
    config = model.config
    net = model.stages[stage.name].experts[expert.name]
    sr = stage.is_super_resolution
    args = denoiser_args(random_denoiser_inputs(config, stage, expert, trace_rows, seed=1), sr)

    def build(path: Path) -> dict[str, tuple[int, ...]]:
        export_module(DenoiserGraph(net, sr), args, path, denoiser_input_names(sr), list(DENOISER_OUTPUTS), opset, exporter)
        return {DENOISER_OUTPUTS[0]: tuple(args[0].shape)}

    def verify(path: Path) -> None:
        check_args = denoiser_args(random_denoiser_inputs(config, stage, expert, trace_rows + 1, seed=2), sr)
        verify_graph(path, DenoiserGraph(net, sr), check_args, denoiser_input_names(sr), dtype)

    fields = dict(
        kind="denoiser", model_name=config.name, stage=stage.name, expert=expert.name, sigma_lo=expert.sigma_lo,
        sigma_hi=expert.sigma_hi, sigma_data=config.sigma_data, image_size=stage.image_size, channels=stage.channels,
        super_resolution=sr, network=expert.network.model_dump(mode="json"),
        source=SourceFile(path=expert.weights, sha256=source_sha256),
    )
    return _write(denoiser_dir(out_dir, stage.name, expert.name), build, fields, simplify=simplify, dtype=dtype,
                  exporter=exporter, verify=verify)


def export_encoder(model: EDiffIModel, kind: str, out_dir: str | Path, *, source_sha256: str,
                   opset: int = DEFAULT_OPSET, simplify: bool = False, exporter: str = "torchscript") -> ArtifactManifest:
    """Encoders stay float32 (they run once per prompt)."""
    config = model.config
    inputs, outputs = ENCODER_IO[kind]
    args = encoder_example_inputs(model, kind)

    def build(path: Path) -> dict[str, tuple[int, ...]]:
        module = encoder_module(model, kind)
        export_module(module, args, path, list(inputs), list(outputs), opset, exporter)
        with torch.no_grad():
            ref = module(*args)
        ref = ref if isinstance(ref, tuple) else (ref,)
        return {name: tuple(t.shape) for name, t in zip(outputs, ref)}

    def verify(path: Path) -> None:
        verify_graph(path, encoder_module(model, kind), encoder_example_inputs(model, kind, rows=3, seed=1), list(inputs),
                     "float32")

    length = {"t5": config.encoders.t5.max_length, "clip_text": config.encoders.clip_text.max_length}.get(kind)
    fields = dict(kind="encoder", model_name=config.name, encoder=kind, sequence_length=length,
                  source=SourceFile(path=encoder_weights(config, kind), sha256=source_sha256))
    return _write(encoder_dir(out_dir, kind), build, fields, simplify=simplify, dtype="float32", exporter=exporter,
                  verify=verify)


def export_onnx(model_dir: str | Path, out_dir: str | Path | None = None, *, opset: int = DEFAULT_OPSET,
                dtype: str = "float32", simplify: bool | None = None, encoders: bool = True,
                exporter: str = "torchscript", log: Callable[[str], None] = print) -> list[ArtifactManifest]:
    """Export every expert of every stage (and the encoders) of a model
    directory. Default out_dir: <model_dir>/onnx. Returns the manifests."""
    from ediffi.model import weights_hash

    model_dir = Path(model_dir)
    out_dir = Path(out_dir) if out_dir is not None else model_dir / "onnx"
    if dtype not in ("float32", "float16"):
        raise ValueError(f"--dtype {dtype}: ONNX graphs are exported as float32 or float16")
    if simplify is None:
        simplify = simplify_available()
    elif simplify and not simplify_available():
        raise RuntimeError("graph simplification needs onnxslim (pip install onnxslim), or pass --no-simplify")
    model = load_model(model_dir)  # float32 reference weights, CPU
    manifests = []
    for stage in model.config.stages:
        for expert in stage.experts:
            manifest = export_expert(
                model, stage, expert, out_dir, source_sha256=weights_hash(model_dir, expert.weights), opset=opset,
                dtype=dtype, simplify=simplify, exporter=exporter,
            )
            log(f"exported {stage.name}/{expert.name} -> {denoiser_dir(out_dir, stage.name, expert.name) / ONNX_FILE}")
            manifests.append(manifest)
    if encoders:
        for kind in ENCODER_KINDS:
            weights = encoder_weights(model.config, kind)
            manifest = export_encoder(model, kind, out_dir, source_sha256=weights_hash(model_dir, weights), opset=opset,
                                      simplify=simplify, exporter=exporter)
            log(f"exported encoder {kind} -> {encoder_dir(out_dir, kind) / ONNX_FILE}")
            manifests.append(manifest)
    return manifests


def session_options(threads: int | None, spinning: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = int(threads if threads is not None else torch.get_num_threads())
    options.inter_op_num_threads = 1
    # The engine runs torch work (samplers, guidance) between calls on the
    # same cores: idle ORT threads must not spin on them.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    return options
