"""Parity of exported graphs with PyTorch (`ediffi export check`).

1. Per graph: every denoiser and encoder graph against its PyTorch module on
   fixed random inputs (`onnx_export.random_denoiser_inputs`: mixed per-row
   sigmas across the expert's interval, partly masked contexts, painted
   masks), at two batch sizes. Reported: max abs error and max relative
   error, `max|ort - torch| / max|torch|` (relative to the output's scale,
   so values near zero do not blow it up). The same for the graph each
   TensorRT engine is built from (`tensorrt_build.tensorrt_input_graph`:
   float64 stripped), run by ONNX Runtime: rows `tensorrt-input/<expert>`.
2. Whole images: the reference pipeline (`ediffi.pipeline.generate`) on the
   PyTorch model and on the ONNX Runtime model, same prompt and seed (with
   guidance, a style image and paint-with-words among the requests), PSNR
   of the 8-bit images; >= 40 dB passes (float32).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ediffi.config import ExpertConfig, StageConfig
from ediffi.model import EDiffIModel, load_model
from ediffi.paint import Region
from ediffi.pipeline import GenerationRequest, generate
from export.onnx_export import session_options, denoiser_args, encoder_example_inputs, encoder_module, random_denoiser_inputs

# float32 graphs: the error budget of a correct export (reordered float32
# arithmetic), far below anything an 8-bit image can show.
GRAPH_MAX_REL = {"float32": 1e-4, "float16": 2e-2}
IMAGE_MIN_PSNR = 40.0


@dataclass
class GraphParity:
    name: str
    rows: int
    max_abs: float
    max_rel: float
    threshold_rel: float

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.threshold_rel and math.isfinite(self.max_abs)


@dataclass
class ImageParity:
    name: str
    psnr_db: float
    max_diff_levels: int
    threshold_db: float = IMAGE_MIN_PSNR

    @property
    def ok(self) -> bool:
        return self.psnr_db >= self.threshold_db


def errors(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error / max |ref|)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if got.shape != ref.shape:
        raise AssertionError(f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    abs_err = float((got - ref).abs().max()) if got.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return abs_err, abs_err / max(scale, 1e-12)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two 8-bit images, dB (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@torch.no_grad()
def check_graphs(torch_model: EDiffIModel, onnx_model: EDiffIModel, *, rows: tuple[int, ...] = (1, 5), seed: int = 0,
                 dtype: str = "float32") -> list[GraphParity]:
    threshold = GRAPH_MAX_REL[dtype]
    out = []
    config = torch_model.config
    for stage in config.stages:
        for expert in stage.experts:
            ref_net = torch_model.stages[stage.name].experts[expert.name]
            ort_net = onnx_model.stages[stage.name].experts[expert.name]
            for n in rows:
                inputs = random_denoiser_inputs(config, stage, expert, n, seed=seed + n)
                ref = ref_net(*denoiser_args(inputs, stage.is_super_resolution))
                got = ort_net(**inputs.as_kwargs())
                out.append(GraphParity(f"{stage.name}/{expert.name}", n, *errors(got, ref), threshold))
    enc_ref, enc_ort = torch_model.encoders, onnx_model.encoders
    towers = {"t5": (enc_ref.t5, enc_ort.t5), "clip_text": (enc_ref.clip_text, enc_ort.clip_text),
              "clip_vision": (enc_ref.clip_vision, enc_ort.clip_vision)}
    for kind, (ref_tower, ort_tower) in towers.items():
        if ref_tower is ort_tower or not hasattr(ort_tower, "session"):
            continue  # encoder not exported: the ONNX model uses torch for it
        for n in rows:
            args = encoder_example_inputs(torch_model, kind, rows=n, seed=seed + n)
            ref = encoder_module(torch_model, kind)(*args)
            ref = ref if isinstance(ref, tuple) else (ref,)
            names = ("input_ids", "attention_mask") if kind != "clip_vision" else ("pixel_values",)
            got = ort_tower.session(dict(zip(names, args)))
            worst = max((errors(g, r) for g, r in zip(got.values(), ref)), key=lambda e: e[1])
            out.append(GraphParity(f"encoders/{kind}", n, *worst, threshold))
    return out


@torch.no_grad()
def tensorrt_input_parity(torch_model: EDiffIModel, stage: StageConfig, expert: ExpertConfig, onnx_dir: str | Path, *,
                          rows: tuple[int, ...] = (1, 5), seed: int = 0, threads: int | None = None) -> list[GraphParity]:
    """One expert's float32 graph as `ediffi export tensorrt` hands it to
    TensorRT, run by ONNX Runtime (CPU) against the PyTorch expert."""
    import onnxruntime as ort

    from export.manifest import ArtifactManifest, denoiser_dir
    from export.tensorrt_build import tensorrt_input_graph

    folder = denoiser_dir(Path(onnx_dir), stage.name, expert.name)
    manifest = ArtifactManifest.load(folder)
    if manifest.dtype != "float32":
        return []  # TensorRT builds from float32 graphs only
    graph = tensorrt_input_graph(folder / manifest.artifact)
    session = ort.InferenceSession(graph.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])
    ref_net = torch_model.stages[stage.name].experts[expert.name]
    out = []
    for n in rows:
        args = denoiser_args(random_denoiser_inputs(torch_model.config, stage, expert, n, seed=seed + n),
                             stage.is_super_resolution)
        feed = {name: t.numpy() for name, t in zip(manifest.input_names(), args)}
        got = torch.from_numpy(session.run(None, feed)[0])
        out.append(GraphParity(f"tensorrt-input/{stage.name}/{expert.name}", n, *errors(got, ref_net(*args)),
                               GRAPH_MAX_REL["float32"]))
    return out


def check_tensorrt_inputs(torch_model: EDiffIModel, onnx_dir: str | Path, *, rows: tuple[int, ...] = (1, 5),
                          seed: int = 0, threads: int | None = None) -> list[GraphParity]:
    """`tensorrt_input_parity` for every expert of every stage."""
    return [r for stage in torch_model.config.stages for expert in stage.experts
            for r in tensorrt_input_parity(torch_model, stage, expert, onnx_dir, rows=rows, seed=seed, threads=threads)]


def parity_requests() -> list[tuple[str, GenerationRequest]]:
    """Prompts covering guidance, negative prompts, a style image and
    paint-with-words (the colour map spans any canvas: 2x2 cells)."""
    from PIL import Image

    cells = np.zeros((2, 2, 3), dtype=np.uint8)
    cells[0, 0] = (255, 0, 0)
    cells[1, 1] = (0, 0, 255)
    color_map = Image.fromarray(cells).resize((64, 64), Image.Resampling.NEAREST)
    rng = np.random.default_rng(0)
    style = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    return [
        ("guided heun", GenerationRequest("a red circle on the left and a blue square", steps=6, seed=3, sampler="heun",
                                          guidance_scale=3.0)),
        ("negative dpmpp_2m + style", GenerationRequest("a green triangle in the top right corner", negative_prompt="a dog",
                                                       steps=6, seed=11, sampler="dpmpp_2m", style_image=style)),
        ("paint-with-words euler", GenerationRequest("a red circle and a blue square", steps=6, seed=5, sampler="euler",
                                                     color_map=color_map, regions=[Region("#ff0000", "red circle", 0.6),
                                                                                   Region("#0000ff", "blue square")])),
    ]


@torch.no_grad()
def check_images(torch_model: EDiffIModel, onnx_model: EDiffIModel,
                 requests: list[tuple[str, GenerationRequest]] | None = None) -> list[ImageParity]:
    out = []
    for name, request in requests or parity_requests():
        ref = generate(torch_model, request)
        got = generate(onnx_model, request)
        for k, (a, b) in enumerate(zip(got, ref)):
            a, b = np.asarray(a), np.asarray(b)
            label = name if len(ref) == 1 else f"{name} [{k}]"
            diff = int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
            out.append(ImageParity(label, psnr(a, b), diff))
    return out


def run_check(model_dir: str | Path, onnx_model: EDiffIModel, onnx_dir: str | Path | None = None, *, threads: int | None = None,
              images: bool = True, rows: tuple[int, ...] = (1, 5)) -> tuple[list[GraphParity], list[ImageParity]]:
    torch_model = load_model(model_dir)
    graphs = check_graphs(torch_model, onnx_model, rows=rows)
    onnx_dir = Path(onnx_dir) if onnx_dir is not None else Path(model_dir) / "onnx"
    graphs += check_tensorrt_inputs(torch_model, onnx_dir, rows=rows, threads=threads)
    pictures = check_images(torch_model, onnx_model) if images else []
    return graphs, pictures


def format_report(graphs: list[GraphParity], images: list[ImageParity]) -> str:
    lines = [f"{'graph':<32} {'rows':>4} {'max abs err':>12} {'max rel err':>12} {'limit':>8}  ok"]
    for g in graphs:
        lines.append(f"{g.name:<32} {g.rows:>4} {g.max_abs:>12.3e} {g.max_rel:>12.3e} {g.threshold_rel:>8.0e}  {'yes' if g.ok else 'NO'}")
    if images:
        lines.append("")
        lines.append(f"{'image (ORT vs torch)':<32} {'PSNR dB':>8} {'max diff':>9} {'limit':>6}  ok")
        for im in images:
            value = "inf" if math.isinf(im.psnr_db) else f"{im.psnr_db:.2f}"
            lines.append(f"{im.name:<32} {value:>8} {im.max_diff_levels:>9} {im.threshold_db:>6.0f}  {'yes' if im.ok else 'NO'}")
    return "\n".join(lines)


def report_json(graphs: list[GraphParity], images: list[ImageParity]) -> dict:
    def clean(d):
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}

    return {
        "graphs": [dict(clean(asdict(g)), ok=g.ok) for g in graphs],
        "images": [dict(clean(asdict(i)), ok=i.ok) for i in images],
        "ok": all(g.ok for g in graphs) and all(i.ok for i in images),
    }
