"""The compiled GPU path of the torch backend (engines/cuda_graphs.py).

The padding logic runs everywhere; everything marked `gpu` needs a CUDA
device and skips cleanly without one (run them with `bench/gpu.sh`, or
`pytest -m gpu` on a GPU machine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ediffi.model import build_random_model_dir, load_model
from ediffi.pipeline import GenerationRequest, generate
from engines.cuda_graphs import CompiledTorchBackend, pad_inputs, pad_rows

CUDA = torch.cuda.is_available()
TOLERANCE = 2  # 8-bit levels


def test_pad_rows_repeats_the_last_row():
    t = torch.arange(6.0).view(3, 2)
    padded = pad_rows(t, 5)
    assert padded.shape == (5, 2) and torch.equal(padded[:3], t) and torch.equal(padded[3:], t[-1:].expand(2, 2))
    assert pad_rows(t, 3) is t
    with pytest.raises(ValueError):
        pad_rows(t, 2)


def test_pad_inputs_keeps_absent_sr_inputs_absent(tiny_model):
    from engines.torch_backend import TorchBackend

    inputs = TorchBackend(tiny_model).dummy_inputs("base", 3)
    padded = pad_inputs(inputs, 4)
    assert len(padded) == 4 and padded.low_res is None and padded.context_mask.dtype == torch.bool
    assert torch.equal(padded.sigma[3], inputs.sigma[2])


@pytest.mark.skipif(CUDA, reason="CUDA is available here")
def test_compiled_backend_refuses_cpu(tiny_model_dir):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        CompiledTorchBackend(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def gpu_model_dir(tmp_path_factory):
    return build_random_model_dir(tmp_path_factory.mktemp("gpu-model"), seed=0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (none here)")
def test_graphed_expert_equals_eager_at_every_batch_size(gpu_model_dir):
    eager = load_model(gpu_model_dir, device="cuda")
    backend = CompiledTorchBackend(gpu_model_dir, device="cuda", max_batch=8, mode="cuda_graphs")
    backend.warmup()
    assert backend.profile and all(set(t) == {1, 2, 4, 8} for t in backend.profile.values())
    for stage, expert in backend.experts():
        for rows in (1, 3, 5, 8, 11):  # 11: chunked into 8 + 3
            inputs = backend.dummy_inputs(stage, rows, sigma=1.5)
            with torch.no_grad():
                ref = eager.stages[stage].experts[expert](**inputs.as_kwargs())
            out = backend.run(stage, expert, inputs)
            assert out.shape == ref.shape
            assert torch.allclose(out, ref, atol=1e-4 * float(ref.abs().max())), (stage, expert, rows)


def _max_diff(a, b) -> int:
    return max(int(np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max()) for x, y in zip(a, b))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (none here)")
def test_engine_with_cuda_graphs_is_batch_invariant_and_matches_eager(gpu_model_dir):
    from engines import Engine, EngineConfig
    from tests.test_engine import other_requests, target_request

    backend = CompiledTorchBackend(gpu_model_dir, device="cuda", max_batch=8)
    backend.warmup()
    requests = [*other_requests(6)[:3], target_request(), *other_requests(6)[3:]]
    engine = Engine(backend, EngineConfig())
    handles = [engine.submit(r) for r in requests]
    engine.run_until_idle()
    outcomes = [h.result(0) for h in handles]
    assert all(o.ok for o in outcomes)
    alone = Engine(backend, EngineConfig()).generate(target_request())
    assert _max_diff(alone.images, outcomes[3].images) <= TOLERANCE
    eager = load_model(gpu_model_dir, device="cuda")
    for request, outcome in zip(requests, outcomes):
        assert _max_diff(outcome.images, generate(eager, request)) <= TOLERANCE


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (none here)")
def test_torch_compile_mode_matches_eager(gpu_model_dir):
    backend = CompiledTorchBackend(gpu_model_dir, device="cuda", max_batch=2, mode="torch_compile")
    eager = load_model(gpu_model_dir, device="cuda")
    inputs = backend.dummy_inputs("base", 2, sigma=0.5)
    with torch.no_grad():
        ref = eager.stages["base"].experts["base1"](**inputs.as_kwargs())
    out = backend.run("base", "base1", inputs)
    assert torch.allclose(out, ref, atol=1e-3 * float(ref.abs().max()))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (none here)")
def test_onnxruntime_cuda_provider_if_installed(gpu_model_dir):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed (CPU onnxruntime only)")
    from engines.onnx_backend import OnnxRuntimeBackend
    from export.onnx_export import export_onnx

    export_onnx(gpu_model_dir, gpu_model_dir / "onnx", simplify=False, log=lambda m: None)
    backend = OnnxRuntimeBackend(gpu_model_dir, device="cuda", max_batch=4)
    request = GenerationRequest("a red circle", steps=3, seed=2)
    eager = load_model(gpu_model_dir, device="cuda")
    assert _max_diff(generate(backend.model, request), generate(eager, request)) <= TOLERANCE
