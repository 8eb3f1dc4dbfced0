"""`ediffi export onnx` + `ediffi export check` on the tiny random cascade
(base 16 px with 2 experts split at sigma 1, SR 32 px with 1 expert, tiny
T5/CLIP towers), CPU, float32.

Tolerances: a graph must match its PyTorch module to 1e-4 of the output's
scale (float32 reordering gives ~1e-6); whole images to PSNR >= 40 dB."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from cli.main import main as cli_main
from ediffi.model import build_random_model_dir, load_model, weights_hash
from export.manifest import ENCODER_KINDS, ArtifactManifest, denoiser_dir, encoder_dir
from export.onnx_export import (
    DENOISER_INPUTS,
    SR_INPUTS,
    denoiser_args,
    random_denoiser_inputs,
    simplify_available,
)
from export.parity import GRAPH_MAX_REL, IMAGE_MIN_PSNR, check_graphs, check_images, errors, psnr


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py: the cores are shared


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model directory exported through the CLI (no onnxslim: fast)."""
    model_dir = build_random_model_dir(tmp_path_factory.mktemp("export-model"), seed=0)
    onnx_dir = model_dir / "onnx"
    assert cli_main(["export", "onnx", "--model-dir", str(model_dir), "--out", str(onnx_dir), "--no-simplify"]) == 0
    return model_dir, onnx_dir


@pytest.fixture(scope="module")
def torch_model(exported):
    return load_model(exported[0])


@pytest.fixture(scope="module")
def onnx_model(exported):
    from engines.onnx_backend import load_onnx_model

    return load_onnx_model(exported[0], exported[1], threads=1)


def _experts(model):
    return [(stage, expert) for stage in model.config.stages for expert in stage.experts]


def test_every_stage_expert_and_encoder_is_exported_with_a_manifest(exported, torch_model):
    model_dir, onnx_dir = exported
    experts = _experts(torch_model)
    assert [(s.name, e.name) for s, e in experts] == [("base", "base0"), ("base", "base1"), ("sr", "sr0")]
    for stage, expert in experts:
        folder = denoiser_dir(onnx_dir, stage.name, expert.name)
        manifest = ArtifactManifest.load(folder)
        onnx.checker.check_model(str(folder / manifest.artifact), full_check=True)
        assert manifest.kind == "denoiser" and (manifest.stage, manifest.expert) == (stage.name, expert.name)
        assert (manifest.sigma_lo, manifest.sigma_hi) == (expert.sigma_lo, expert.sigma_hi)
        assert manifest.source.path == expert.weights
        assert manifest.source.sha256 == weights_hash(model_dir, expert.weights)
        assert manifest.image_size == stage.image_size and manifest.dtype == "float32"
        assert manifest.opset >= 17
        assert {"torch", "onnx"} <= set(manifest.exporter)
        names = list(DENOISER_INPUTS) + (list(SR_INPUTS) if stage.is_super_resolution else [])
        assert manifest.input_names() == names
        by_name = {t.name: t for t in manifest.inputs}
        assert by_name["sigma"].shape == ["batch"]  # per row, never a scalar
        assert by_name["context_mask"].dtype == "bool"
        assert by_name["x"].shape == ["batch", 3, stage.image_size, stage.image_size]
        assert [t.shape for t in manifest.outputs] == [["batch", 3, stage.image_size, stage.image_size]]
        # The graph file itself declares the same dynamic batch axis.
        graph = onnx.load(str(folder / manifest.artifact))
        assert all(v.type.tensor_type.shape.dim[0].dim_param == "batch" for v in [*graph.graph.input, *graph.graph.output])
    for kind in ENCODER_KINDS:
        manifest = ArtifactManifest.load(encoder_dir(onnx_dir, kind))
        assert manifest.kind == "encoder" and manifest.encoder == kind
        assert all(t.shape[0] == "batch" and all(isinstance(d, int) for d in t.shape[1:]) for t in manifest.outputs)


@torch.no_grad()
def test_mixed_sigma_batch_equals_separate_calls_and_torch(torch_model, onnx_model):
    """The batch axis is really dynamic (7 rows, traced at 2) and sigma really
    per row: each row of a mixed-sigma batch equals that row run alone, and
    the PyTorch expert's row."""
    config = torch_model.config
    for stage, expert in _experts(torch_model):
        ort_net = onnx_model.stages[stage.name].experts[expert.name]
        ref_net = torch_model.stages[stage.name].experts[expert.name]
        inputs = random_denoiser_inputs(config, stage, expert, 7, seed=42)
        assert len(set(inputs.sigma.tolist())) == 7
        batched = ort_net(**inputs.as_kwargs())
        ref = ref_net(*denoiser_args(inputs, stage.is_super_resolution))
        scale = float(ref.abs().max())
        for i in range(7):
            row = {k: v[i : i + 1] for k, v in inputs.as_kwargs().items()}
            alone = ort_net(**row)
            assert torch.allclose(batched[i : i + 1], alone, rtol=0, atol=1e-5 * scale), (stage.name, expert.name, i)
        assert errors(batched, ref)[1] < GRAPH_MAX_REL["float32"]
        # A row's result follows its own sigma: giving every row row 0's sigma changes the others.
        same = inputs.as_kwargs() | {"sigma": inputs.sigma[:1].expand(7).contiguous()}
        assert not torch.allclose(ort_net(**same)[1:], batched[1:], atol=1e-3 * scale)


def test_graph_parity_within_thresholds(torch_model, onnx_model):
    results = check_graphs(torch_model, onnx_model, rows=(1, 4))
    names = {r.name for r in results}
    assert names == {"base/base0", "base/base1", "sr/sr0", "encoders/t5", "encoders/clip_text", "encoders/clip_vision"}
    for r in results:
        assert r.ok, r
        assert r.max_rel < GRAPH_MAX_REL["float32"]


def test_image_parity_psnr(torch_model, onnx_model):
    results = check_images(torch_model, onnx_model)
    assert len(results) == 3
    for r in results:
        assert r.psnr_db >= IMAGE_MIN_PSNR, r
        assert r.max_diff_levels <= 2, r


def test_parity_catches_a_wrong_graph(exported, torch_model, tmp_path):
    """A graph whose weights drifted by 1% fails the per-graph threshold."""
    from engines.onnx_backend import load_onnx_model
    from export.manifest import file_sha256
    from onnx import numpy_helper

    model_dir, onnx_dir = exported
    broken = tmp_path / "onnx"
    shutil.copytree(onnx_dir, broken)
    folder = denoiser_dir(broken, "base", "base0")
    graph = onnx.load(str(folder / "model.onnx"))
    target = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * 1.01, target.name))
    onnx.save(graph, str(folder / "model.onnx"))
    manifest = ArtifactManifest.load(folder)
    manifest.artifact_sha256 = file_sha256(folder / "model.onnx")  # as if the exporter itself were wrong
    manifest.save(folder)
    results = check_graphs(torch_model, load_onnx_model(model_dir, broken, threads=1), rows=(2,))
    bad = [r for r in results if not r.ok]
    assert [r.name for r in bad] == ["base/base0"]


def test_psnr_helper():
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    assert psnr(a, a) == float("inf")
    b = a.copy()
    b[0, 0, 0] = 255
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / (255**2 / 48)))


def test_cli_check_passes_and_reports(exported, capsys):
    model_dir, onnx_dir = exported
    assert cli_main(["export", "check", "--model-dir", str(model_dir), "--onnx", str(onnx_dir), "--threads", "1",
                     "--no-images", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # 3 experts, 3 encoders and the 3 graphs TensorRT would be built from, at 1 and 5 rows.
    assert report["ok"] and len(report["graphs"]) == 18 and report["images"] == []
    assert sum(g["name"].startswith("tensorrt-input/") for g in report["graphs"]) == 6
    assert all(g["max_rel"] < 1e-4 for g in report["graphs"])


def test_cli_export_of_a_missing_model_dir_is_a_clear_error(tmp_path, capsys):
    assert cli_main(["export", "onnx", "--model-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(not simplify_available(), reason="onnxslim is not installed")
def test_simplified_graph_keeps_dynamic_batch_and_parity(exported, torch_model, tmp_path):
    from engines.onnx_backend import BoundSession, OrtExpert
    from export.onnx_export import export_expert

    model_dir, _ = exported
    stage = torch_model.config.stage("sr")
    expert = stage.experts[0]
    manifest = export_expert(torch_model, stage, expert, tmp_path, source_sha256="x", simplify=True)
    assert "onnxslim" in manifest.exporter
    folder = denoiser_dir(tmp_path, "sr", expert.name)
    net = OrtExpert(BoundSession(folder / "model.onnx", manifest, torch.device("cpu"), threads=1), torch.float32)
    inputs = random_denoiser_inputs(torch_model.config, stage, expert, 3, seed=5)
    with torch.no_grad():
        ref = torch_model.stages["sr"].experts[expert.name](**inputs.as_kwargs())
    assert errors(net(**inputs.as_kwargs()), ref)[1] < GRAPH_MAX_REL["float32"]


# Largest error of a float16 graph (ONNX Runtime's CPU kernels) against the
# float32 PyTorch expert measured on the tiny model: 2.1e-3 (base0), 1.9e-3
# (sr0), 1.4e-3 (base1), 3 rows, seeds 0-5. The limit leaves 2.5x margin.
FLOAT16_GRAPH_MAX_REL = 5e-3


def test_float16_export_runs_and_stays_close(torch_model, tmp_path):
    """--dtype float16 (for ONNX Runtime on CUDA): float16 I/O, the mask
    stays bool, and every expert agrees with float32 PyTorch within what a
    correct float16 graph measures (with margin), not just within 2e-2."""
    from engines.onnx_backend import BoundSession, OrtExpert
    from export.onnx_export import export_expert

    for stage, expert in _experts(torch_model):
        manifest = export_expert(torch_model, stage, expert, tmp_path, source_sha256="x", dtype="float16")
        dtypes = {t.name: t.dtype for t in [*manifest.inputs, *manifest.outputs]}
        assert manifest.dtype == "float16" and dtypes["x"] == dtypes["denoised"] == "float16"
        assert dtypes["context_mask"] == "bool"
        folder = denoiser_dir(tmp_path, stage.name, expert.name)
        net = OrtExpert(BoundSession(folder / "model.onnx", manifest, torch.device("cpu"), 1), torch.float16)
        for seed in (2, 3):
            inputs = random_denoiser_inputs(torch_model.config, stage, expert, 3, seed=seed)
            with torch.no_grad():
                ref = torch_model.stages[stage.name].experts[expert.name](**inputs.as_kwargs())
            max_rel = errors(net(**inputs.as_kwargs()).float(), ref)[1]
            assert max_rel < FLOAT16_GRAPH_MAX_REL, (stage.name, expert.name, seed, max_rel)
