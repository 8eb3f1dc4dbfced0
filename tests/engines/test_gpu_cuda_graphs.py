"""The compiled GPU path of the torch backend (engines/cuda_graphs.py).

The padding logic and torch.compile's recompile-limit handling run
everywhere (CPU, Dynamo only); everything marked `gpu` needs a CUDA
device and skips cleanly without one (run them with `bench/gpu.sh`, or
`pytest -m gpu` on a GPU machine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ediffi.model import build_random_model_dir, load_model
from ediffi.pipeline import generate
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


def _varied_inputs(backend, stage: str, expert: str, rows: int, dtype: torch.dtype, seed: int = 0):
    """Per-row sigmas over the expert's interval, partly masked contexts (one
    row unconditional), painted masks with non-zero strengths, per-row SR
    augmentation levels (export/onnx_export.py random_denoiser_inputs); the
    noise levels stay float32 at any dtype, as the pipeline sends them."""
    from export.onnx_export import random_denoiser_inputs

    config = backend.model.config
    stage_cfg = config.stage(stage)
    expert_cfg = next(e for e in stage_cfg.experts if e.name == expert)
    inputs = random_denoiser_inputs(config, stage_cfg, expert_cfg, rows, seed=seed, device="cuda")
    assert float(inputs.pww_strength.min()) > 0 and (rows == 1 or not bool(inputs.context_mask.all()))
    return type(inputs)(**{
        name: v if (v := getattr(inputs, name)) is None or name in ("sigma", "low_res_sigma", "context_mask")
        else v.to(dtype)
        for name in inputs.__dataclass_fields__
    })


# Relative to max |reference|. float32: graph replay vs eager, same kernels.
# Half precision: against the float32 eager model (the rounding of the
# network itself, measured on CPU at 0.015 bf16 / 0.0017 fp16 for the tiny
# model, tests/model/test_half_precision.py); GPU kernels differ, so 2x that again.
GPU_MAX_REL = {torch.float32: 1e-4, torch.bfloat16: 0.06, torch.float16: 0.008}


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (none here)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_graphed_expert_equals_eager_at_every_batch_size(gpu_model_dir, dtype):
    eager = load_model(gpu_model_dir, device="cuda")
    backend = CompiledTorchBackend(gpu_model_dir, device="cuda", dtype=dtype, max_batch=8, mode="cuda_graphs")
    backend.warmup()
    assert backend.profile and all(set(t) == {1, 2, 4, 8} for t in backend.profile.values())
    for stage, expert in backend.experts():
        for rows in (1, 3, 5, 8, 11):  # 11: chunked into 8 + 3
            inputs = _varied_inputs(backend, stage, expert, rows, dtype, seed=rows)
            reference_inputs = _varied_inputs(backend, stage, expert, rows, torch.float32, seed=rows)
            with torch.no_grad():
                ref = eager.stages[stage].experts[expert](**reference_inputs.as_kwargs())
            out = backend.run(stage, expert, inputs)
            assert out.shape == ref.shape and out.dtype == dtype
            error = float((out.float() - ref).abs().max() / ref.abs().max())
            assert error <= GPU_MAX_REL[dtype], (stage, expert, rows, error)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_graphs_on_a_second_device_capture_real_work(gpu_model_dir):
    """Captured on cuda:1 while cuda:0 is current: without the device guard
    the graph records nothing and replays return the capture's outputs."""
    torch.cuda.set_device(0)
    eager = load_model(gpu_model_dir, device="cuda:1")
    backend = CompiledTorchBackend(gpu_model_dir, device="cuda:1", max_batch=4)
    backend.warmup()
    stage, expert = backend.experts()[0]
    for seed in (1, 2):
        inputs = _varied_inputs(backend, stage, expert, 3, torch.float32, seed=seed)
        inputs = type(inputs)(**{n: None if (v := getattr(inputs, n)) is None else v.to("cuda:1")
                                 for n in inputs.__dataclass_fields__})
        with torch.no_grad():
            ref = eager.stages[stage].experts[expert](**inputs.as_kwargs())
        out = backend.run(stage, expert, inputs)
        assert out.device == torch.device("cuda:1")
        assert torch.allclose(out, ref, atol=1e-4 * float(ref.abs().max()))


def _max_diff(a, b) -> int:
    return max(int(np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max()) for x, y in zip(a, b))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (none here)")
def test_engine_with_cuda_graphs_is_batch_invariant_and_matches_eager(gpu_model_dir):
    from engines import Engine, EngineConfig
    from tests.engines.test_engine import other_requests, target_request

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
    inputs = _varied_inputs(backend, "base", "base1", 2, torch.float32, seed=4)
    with torch.no_grad():
        ref = eager.stages["base"].experts["base1"](**inputs.as_kwargs())
    out = backend.run("base", "base1", inputs)
    assert torch.allclose(out, ref, atol=1e-3 * float(ref.abs().max()))


# -- torch.compile: the recompile limit covers every bucket, and a hit is an error (CPU, Dynamo only) --------


def _small_denoiser(seed: int):
    from ediffi.config import UNetConfig
    from ediffi.edm import EDMDenoiser

    torch.manual_seed(seed)
    cfg = UNetConfig(model_channels=8, channel_mult=[1, 2], attention_resolutions=[8], num_heads=2, context_dim=8,
                     pooled_dim=4, embedding_dim=16, groups=4)
    return EDMDenoiser(cfg, 16).eval()


def _small_inputs(rows: int):
    from ediffi.pipeline import DenoiserInputs

    g = torch.Generator().manual_seed(rows)
    return DenoiserInputs(
        x=torch.randn(rows, 3, 16, 16, generator=g), sigma=torch.rand(rows, generator=g) + 0.1,
        context=torch.randn(rows, 3, 8, generator=g), context_mask=torch.ones(rows, 3, dtype=torch.bool),
        pooled=torch.randn(rows, 4, generator=g), pww_mask=torch.rand(rows, 3, 16, 16, generator=g),
        pww_strength=torch.rand(rows, generator=g),
    )


@pytest.fixture
def dynamo_graphs():
    """A Dynamo backend that records each compiled graph (and runs it as
    is), under a low recompile limit that the tests' buckets exceed."""
    import torch._dynamo
    import torch._dynamo.config as dynamo

    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with dynamo.patch(recompile_limit=2, fail_on_recompile_limit_hit=False):
        yield graphs, recording_backend
    torch._dynamo.reset()


def test_compile_experts_compiles_every_bucket_instead_of_falling_back_to_eager(dynamo_graphs):
    from engines.cuda_graphs import compile_experts

    graphs, backend = dynamo_graphs
    nets = {("base", f"base{i}"): _small_denoiser(i) for i in range(3)}
    compiled = compile_experts(nets, {k: [1, 2, 4] for k in nets}, backend=backend)
    with torch.no_grad():
        for key, net in nets.items():
            for rows in (1, 2, 3, 4):  # 3 runs padded to bucket 4
                inputs = _small_inputs(rows)
                assert torch.allclose(compiled[key](inputs), net(**inputs.as_kwargs()), atol=1e-5)
    # One graph per bucket (experts of one architecture share it); past the
    # default limit torch would have run bucket 4 eagerly: 2 graphs.
    assert len(graphs) == 3


def test_compile_experts_fails_loudly_past_the_limit(dynamo_graphs):
    from engines.cuda_graphs import compile_experts

    graphs, backend = dynamo_graphs
    net = _small_denoiser(0)
    compiled = compile_experts({"e": net}, {"e": [1]}, backend=backend)  # limit 1 + 2 spare
    with torch.no_grad():
        for rows in (1, 2, 4):  # the undeclared sizes compile up to the limit ...
            compiled["e"].compiled(**_small_inputs(rows).as_kwargs())
        with pytest.raises(Exception, match="(?i)recompile|cache.?size|limit"):  # ... then raise, not run eagerly
            compiled["e"].compiled(**_small_inputs(8).as_kwargs())
    assert len(graphs) == 3
