"""The ONNX Runtime backend: manifests refused when they do not match the
model directory, and the engine's batch invariance through ONNX Runtime
(tiny random cascade, CPU, float32).

Tolerance for "the same image": max |diff| <= 2/255 per channel, as in
tests/engines/test_engine.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ediffi.model import build_random_model_dir, load_model, save_expert
from ediffi.pipeline import GenerationRequest, generate
from engines import Engine, EngineConfig
from engines.engine import make_backend
from engines.onnx_backend import OnnxRuntimeBackend, load_onnx_model
from export.manifest import ArtifactManifest, ManifestMismatch, denoiser_dir
from export.onnx_export import export_onnx

TOLERANCE = 2  # 8-bit levels


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py: the cores are shared


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = build_random_model_dir(tmp_path_factory.mktemp("ort-model"), seed=0)
    export_onnx(path, path / "onnx", simplify=False, log=lambda m: None)
    return path


@pytest.fixture(scope="module")
def backend(model_dir):
    return OnnxRuntimeBackend(model_dir, max_batch=8, threads=1)


@pytest.fixture(scope="module")
def torch_model(model_dir):
    return load_model(model_dir)


def max_diff(a, b) -> int:
    assert len(a) == len(b)
    return max(int(np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max()) for x, y in zip(a, b))


def _copy(model_dir, tmp_path):
    """A private copy of the model dir and its graphs, to break."""
    target = tmp_path / "model"
    shutil.copytree(model_dir, target)
    return target


# --------------------------------------------------------------------------
# Manifest matching
# --------------------------------------------------------------------------


def test_loads_when_everything_matches(backend):
    assert backend.describe() == "onnxruntime:cpu:float32"
    assert backend.experts() == [("base", "base0"), ("base", "base1"), ("sr", "sr0")]
    session = backend.model.stages["base"].experts["base0"].session.session
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert session.get_session_options().intra_op_num_threads == 1
    # The encoders run on ONNX Runtime too.
    assert hasattr(backend.model.encoders.t5, "session") and hasattr(backend.model.encoders.clip_vision, "session")


def test_changed_weights_are_refused(model_dir, tmp_path, torch_model):
    target = _copy(model_dir, tmp_path)
    net = torch_model.stages["base"].experts["base0"]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    try:
        save_expert(net, target / "stages/base/base0.safetensors")
    finally:
        with torch.no_grad():
            for p in net.parameters():
                p.sub_(0.01)
    with pytest.raises(ManifestMismatch) as info:
        load_onnx_model(target, threads=1)
    message = str(info.value)
    assert "base/base0" in message and "source weights stages/base/base0.safetensors" in message
    assert f"ediffi export onnx --model-dir {target} --out {target / 'onnx'}" in message


def test_changed_sigma_range_is_refused(model_dir, tmp_path):
    target = _copy(model_dir, tmp_path)
    config = json.loads((target / "model.json").read_text())
    experts = config["stages"][0]["experts"]
    experts[0]["sigma_lo"] = experts[1]["sigma_hi"] = 2.0
    (target / "model.json").write_text(json.dumps(config))
    with pytest.raises(ManifestMismatch, match=r"sigma_lo: artifact has 1.0, model directory has 2.0"):
        load_onnx_model(target, threads=1)


def test_graphs_from_another_model_are_refused(model_dir, tmp_path):
    other = build_random_model_dir(tmp_path / "other", seed=1)
    with pytest.raises(ManifestMismatch, match="source weights"):
        load_onnx_model(other, model_dir / "onnx", threads=1)


def test_missing_manifest_edited_graph_and_dtype_are_refused(model_dir, tmp_path):
    target = _copy(model_dir, tmp_path)
    folder = denoiser_dir(target / "onnx", "sr", "sr0")
    with pytest.raises(ManifestMismatch, match="dtype: artifact is float32, the backend runs float16"):
        load_onnx_model(target, dtype="float16", threads=1)
    with open(folder / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestMismatch, match="was changed after export"):
        load_onnx_model(target, threads=1)
    (folder / "manifest.json").unlink()
    with pytest.raises(ManifestMismatch, match=r"no exported graph for stage 'sr' expert 'sr0'"):
        load_onnx_model(target, threads=1)
    with pytest.raises(FileNotFoundError, match="no ONNX graphs at"):
        load_onnx_model(target, tmp_path / "nowhere", threads=1)


def test_half_precision_on_cpu_refused(model_dir):
    with pytest.raises(ValueError, match="float32 on CPU"):
        OnnxRuntimeBackend(model_dir, dtype="float16")


def test_manifest_roundtrip_and_hash_ignores_time(model_dir):
    folder = denoiser_dir(model_dir / "onnx", "base", "base1")
    a = ArtifactManifest.load(folder)
    b = a.model_copy(update={"created_at": a.created_at + 100})
    assert a.sha256() == b.sha256()
    assert a.sha256() != a.model_copy(update={"sigma_lo": 0.5}).sha256()


# --------------------------------------------------------------------------
# Through the engine
# --------------------------------------------------------------------------


def _requests():
    from tests.engines.test_engine import other_requests, target_request

    others = other_requests(6)
    return [*others[:3], target_request(), *others[3:]], 3


def _serve(backend, requests):
    engine = Engine(backend, EngineConfig())
    handles = [engine.submit(r) for r in requests]
    engine.run_until_idle()
    outcomes = [h.result(0) for h in handles]
    assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
    return outcomes, engine


def test_engine_batch_invariance_and_same_images_as_torch(backend, torch_model):
    requests, index = _requests()
    outcomes, engine = _serve(backend, requests)
    assert engine.scheduler.stats.rows / engine.scheduler.stats.batches > 2  # batches really were shared
    (alone,), _ = _serve(backend, [requests[index]])
    assert max_diff(alone.images, outcomes[index].images) <= TOLERANCE
    for request, outcome in zip(requests, outcomes):
        assert max_diff(outcome.images, generate(torch_model, request)) <= TOLERANCE, request


def test_engine_from_settings_selects_onnxruntime(model_dir, torch_model):
    settings = {"backend": "onnxruntime", "model_dir": model_dir, "onnx_dir": model_dir / "onnx", "max_batch": 4,
                "intra_op_threads": 1}
    engine = Engine.from_settings(settings, warmup=True)
    assert isinstance(engine.backend, OnnxRuntimeBackend)
    assert set(engine.backend.profile) == {("base", "base0"), ("base", "base1"), ("sr", "sr0")}
    request = GenerationRequest("a red circle", steps=3, seed=1, sampler="euler")
    outcome = engine.generate(request)
    assert outcome.ok and max_diff(outcome.images, generate(torch_model, request)) <= TOLERANCE


def test_backend_chunks_beyond_max_batch_and_reference_pipeline_runs_on_it(model_dir, torch_model):
    small = make_backend("onnxruntime", model_dir, max_batch=2, threads=1)
    inputs = small.dummy_inputs("base", 5, sigma=3.0)
    with torch.no_grad():
        ref = torch_model.stages["base"].experts["base0"](**inputs.as_kwargs())
    out = small.run("base", "base0", inputs)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-4)
    request = GenerationRequest("two blue squares", steps=2, seed=4, guidance_scale=2.0)
    assert max_diff(generate(small.model, request), generate(torch_model, request)) <= TOLERANCE
