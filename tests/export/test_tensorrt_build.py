"""TensorRT: the logic around the engines runs here without TensorRT
(batch buckets, optimization profiles, engine cache keys, stale/mismatched
engine refusal, the float64 rewrite TensorRT needs); building and running
engines needs TensorRT and an NVIDIA GPU and skips with the reason."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from cli.main import main as cli_main
from ediffi.model import build_random_model_dir, load_model, weights_hash
from export import trt_runtime
from export.manifest import ArtifactManifest, ManifestMismatch, TensorSpec, denoiser_dir, expected_denoiser
from export.onnx_export import export_expert, random_denoiser_inputs
from export.tensorrt_build import (
    BatchProfile,
    GpuInfo,
    StaleEngine,
    binding_dtype_problems,
    bucket_for,
    check_engine,
    engine_cache_key,
    engine_manifest,
    engine_problems,
    half_precision_graph,
    make_profile,
    noise_only_nodes,
    parse_buckets,
    profile_shapes,
    strip_float64,
)

TRT_OK, TRT_WHY = trt_runtime.available()
CUDA = torch.cuda.is_available()
needs_trt = pytest.mark.skipif(
    not (TRT_OK and CUDA),
    reason=f"needs TensorRT 10 and an NVIDIA GPU: {TRT_WHY if not TRT_OK else 'CUDA is not available'}",
)
H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One real exported expert (the SR expert: it has every input)."""
    torch.set_num_threads(1)
    model_dir = build_random_model_dir(tmp_path_factory.mktemp("trt-model"), seed=0)
    model = load_model(model_dir)
    stage = model.config.stage("sr")
    expert = stage.experts[0]
    onnx_dir = model_dir / "onnx"
    manifest = export_expert(model, stage, expert, onnx_dir, source_sha256=weights_hash(model_dir, expert.weights))
    return model_dir, model, onnx_dir, manifest


# -- buckets and profiles ---------------------------------------------------------


def test_profile_from_max_batch_and_from_buckets():
    p = make_profile(16)
    assert p.buckets == (1, 2, 4, 8, 16) and (p.min, p.max) == (1, 16)
    assert make_profile(12).buckets == (1, 2, 4, 8, 12)
    p = make_profile(None, [8, 2, 4, 2])
    assert p.buckets == (2, 4, 8) and (p.min, p.max) == (2, 8)
    assert parse_buckets("1, 4,16") == [1, 4, 16] and parse_buckets("") is None and parse_buckets(None) is None
    with pytest.raises(ValueError, match="must equal max_batch"):
        make_profile(16, [1, 2, 8])
    with pytest.raises(ValueError, match=">= 1"):
        make_profile(None, [0, 4])


def test_bucket_choice():
    buckets = [1, 2, 4, 8, 12]
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 5, 8, 9, 12)] == [1, 2, 4, 8, 8, 12, 12]
    with pytest.raises(ValueError, match="chunk"):
        bucket_for(13, buckets)
    with pytest.raises(ValueError):
        bucket_for(0, buckets)


def test_one_static_profile_per_bucket_from_a_real_manifest(exported):
    """Each bucket gets a profile of its own with min = opt = max (kernels
    tuned for exactly that batch), not one profile spanning all buckets."""
    _, _, _, manifest = exported
    profiles = profile_shapes(manifest.inputs, make_profile(8))
    assert len(profiles) == 4
    for bucket, shapes in zip((1, 2, 4, 8), profiles):
        assert list(shapes) == manifest.input_names()
        assert shapes["x"] == ((bucket, 3, 32, 32),) * 3
        assert shapes["sigma"] == ((bucket,),) * 3
        assert shapes["pww_mask"][0] == (bucket, 32, 32, 32)
    with pytest.raises(ValueError, match="only axis 0"):
        profile_shapes([TensorSpec(name="x", dtype="float32", shape=["batch", "tokens"])], make_profile(2))
    with pytest.raises(ValueError, match="no dynamic batch axis"):
        profile_shapes([TensorSpec(name="x", dtype="float32", shape=[2, 3])], make_profile(2))


# -- engine cache keys and refusal ---------------------------------------------------


def test_cache_key_changes_with_gpu_version_manifest_precision_and_buckets():
    p = make_profile(16)
    base = engine_cache_key(H100, "10.3.0", "abc", "fp16", p)
    assert base == engine_cache_key(H100, "10.3.0", "abc", "fp16", make_profile(16))
    variants = [
        engine_cache_key(GpuInfo("NVIDIA A10G", "8.6"), "10.3.0", "abc", "fp16", p),
        engine_cache_key(GpuInfo(H100.name, "9.1"), "10.3.0", "abc", "fp16", p),
        engine_cache_key(H100, "10.4.0", "abc", "fp16", p),
        engine_cache_key(H100, "10.3.0", "abd", "fp16", p),
        engine_cache_key(H100, "10.3.0", "abc", "bf16", p),
        engine_cache_key(H100, "10.3.0", "abc", "fp16", make_profile(8)),
        engine_cache_key(H100, "10.3.0", "abc", "fp16", make_profile(16, [2, 16])),
    ]
    assert len({base, *variants}) == 8
    with pytest.raises(ValueError, match="precision"):
        engine_cache_key(H100, "10.3.0", "abc", "int8", p)


def _engine(exported, tmp_path, gpu=H100, version="10.3.0", precision="fp16"):
    _, _, _, onnx_manifest = exported
    profile = make_profile(8)
    key = engine_cache_key(gpu, version, onnx_manifest.sha256(), precision, profile)
    folder = tmp_path / "sr" / "sr0"
    folder.mkdir(parents=True)
    plan = folder / f"engine-{key}.plan"
    plan.write_bytes(b"not really an engine")
    from export.manifest import file_sha256

    manifest = engine_manifest(onnx_manifest, plan_file=plan.name, plan_sha256=file_sha256(plan), gpu=gpu,
                               trt_version=version, precision=precision, profile=profile, key=key)
    manifest.save(folder)
    return folder, ArtifactManifest.load(folder)


def test_engine_manifest_carries_source_and_build(exported, tmp_path):
    model_dir, model, _, onnx_manifest = exported
    folder, manifest = _engine(exported, tmp_path)
    assert manifest.kind == "tensorrt_engine" and (manifest.stage, manifest.expert) == ("sr", "sr0")
    assert manifest.source == onnx_manifest.source and manifest.inputs == onnx_manifest.inputs
    assert manifest.tensorrt.onnx_manifest_sha256 == onnx_manifest.sha256()
    assert (manifest.batch.min, manifest.batch.max) == (1, 8)
    stage = model.config.stage("sr")
    expected = expected_denoiser(model_dir, model.config, stage, stage.experts[0])
    expected.pop("kind")
    assert engine_problems(manifest, gpu=H100, trt_version="10.3.0", precision="fp16", onnx_manifest=onnx_manifest,
                           expected_source=expected, folder=folder) == []


def test_stale_or_mismatched_engines_are_refused(exported, tmp_path):
    model_dir, model, _, onnx_manifest = exported
    folder, manifest = _engine(exported, tmp_path)
    ok = dict(gpu=H100, trt_version="10.3.0", precision="fp16", onnx_manifest=onnx_manifest)

    def problems(**changes):
        return " | ".join(engine_problems(manifest, **{**ok, **changes}, folder=folder))

    assert "built for GPU 'NVIDIA H100 80GB HBM3', this GPU is 'NVIDIA L4'" in problems(gpu=GpuInfo("NVIDIA L4", "8.9"))
    assert "built with TensorRT 10.3.0, this is TensorRT 10.5.0" in problems(trt_version="10.5.0")
    assert "built for fp16, the backend runs bf16" in problems(precision="bf16")
    reexported = onnx_manifest.model_copy(update={"artifact_sha256": "0" * 64})
    assert "stale: the ONNX graph was re-exported" in problems(onnx_manifest=reexported)
    stage = model.config.stage("sr")
    expected = expected_denoiser(model_dir, model.config, stage, stage.experts[0])
    expected.pop("kind")
    expected["source"] = {**expected["source"], "sha256": "f" * 64}
    assert "source weights" in problems(expected_source=expected)
    forged = manifest.model_copy(deep=True)
    forged.tensorrt.buckets = [1, 2, 4, 8, 16]
    assert "does not match its own manifest" in " ".join(engine_problems(forged, **ok))
    (folder / manifest.artifact).write_bytes(b"tampered")
    assert "was changed after it was built" in problems()
    with pytest.raises(StaleEngine, match=r"refusing TensorRT engine sr/sr0(.|\n)*fix: rebuild") as info:
        check_engine(folder, manifest, fix="rebuild", **ok)
    assert isinstance(info.value, ManifestMismatch)
    assert engine_problems(ArtifactManifest.load(denoiser_dir(exported[2], "sr", "sr0")), **ok)[0].startswith("not a TensorRT")


# -- graph preparation -------------------------------------------------------------------


def test_strip_float64_keeps_the_graph_equivalent(exported, tmp_path):
    """TensorRT has no float64: the EDM preconditioning's float64 casts are
    rewritten to float32, and ONNX Runtime gives the same output."""
    import onnxruntime as ort

    _, model, onnx_dir, manifest = exported
    path = denoiser_dir(onnx_dir, "sr", "sr0") / manifest.artifact
    graph = onnx.load(str(path))
    stripped = copy.deepcopy(graph)
    assert strip_float64(stripped) > 0
    assert strip_float64(stripped) == 0  # idempotent
    onnx.checker.check_model(stripped, full_check=True)
    double = onnx.TensorProto.DOUBLE
    assert not [n for n in stripped.graph.node if n.op_type == "Cast" and n.attribute[0].i == double]
    assert not [t for t in stripped.graph.initializer if t.data_type == double]
    assert "elem_type: 11" not in str(stripped.graph)
    assert [n for n in graph.graph.node if n.op_type == "Cast" and n.attribute[0].i == double]  # there were some
    stage = model.config.stage("sr")
    inputs = random_denoiser_inputs(model.config, stage, stage.experts[0], 3, seed=9)
    feed = {k: v.numpy() for k, v in inputs.as_kwargs().items()}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    run = lambda m: ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)[0]  # noqa: E731
    before, after = run(graph), run(stripped)
    assert np.abs(before - after).max() <= 1e-5 * np.abs(before).max()


# -- strongly typed precision: the graph carries it ------------------------------------------


def _value_types(model) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    return {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}


def _ort_run(model, feed):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_noise_only_nodes_are_the_preconditioning_and_the_fourier_embedding(exported):
    _, _, onnx_dir, manifest = exported
    graph = onnx.load(str(denoiser_dir(onnx_dir, "sr", "sr0") / manifest.artifact)).graph
    keep = noise_only_nodes(graph)
    by_name = {n.name: n for n in graph.node}
    trig = [n.name for n in graph.node if n.op_type in ("Sin", "Cos")]
    assert len(trig) == 4 and set(trig) <= keep  # noise and augmentation embeddings
    assert any(by_name[n].op_type == "Log" for n in keep)  # c_noise = ln(sigma) / 4
    # The noise MLPs (per-row vectors) stay float32 too; nothing spatial does.
    assert {by_name[n].op_type for n in keep if "Gemm" == by_name[n].op_type} == {"Gemm"}
    assert all("_mlp" in n for n in keep if by_name[n].op_type == "Gemm")
    assert not [n for n in keep if by_name[n].op_type in ("Conv", "MatMul", "Softmax", "InstanceNormalization")]


# Measured (ONNX Runtime CPU kernels, 4 varied rows of the tiny SR expert,
# max |error| / max |torch float32|): 0.0027. Tolerance: about 2x.
FP16_GRAPH_MAX_REL = 0.006


def test_float16_graph_keeps_noise_path_softmax_and_norms_in_float32(exported):
    _, model, onnx_dir, manifest = exported
    graph = onnx.load(str(denoiser_dir(onnx_dir, "sr", "sr0") / manifest.artifact))
    half = half_precision_graph(graph, "fp16")
    strip_float64(half)
    onnx.checker.check_model(half, full_check=True)
    types = _value_types(half)
    FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    kinds = {}
    for node in half.graph.node:
        kinds.setdefault(node.op_type, set()).update(types.get(o) for o in node.output)
    for op in ("Sin", "Cos", "Softmax", "InstanceNormalization", "Log"):
        assert kinds[op] == {FLOAT}, op
    assert kinds["Conv"] == {FLOAT16} and kinds["MatMul"] == {FLOAT16}
    assert {i.name: i.type.tensor_type.elem_type for i in half.graph.input}["x"] == FLOAT  # float32 I/O
    assert half.graph.output[0].type.tensor_type.elem_type == FLOAT
    # The Fourier frequencies stay float32 initializers.
    embed_muls = [n for n in half.graph.node if n.op_type == "Mul" and "noise_embed" in n.name]
    initializers = {t.name: t for t in half.graph.initializer}
    assert any(initializers[i].data_type == FLOAT for n in embed_muls for i in n.input if i in initializers)
    stage = model.config.stage("sr")
    inputs = random_denoiser_inputs(model.config, stage, stage.experts[0], 4, seed=3)
    with torch.no_grad():
        ref = model.stages["sr"].experts["sr0"](**inputs.as_kwargs()).numpy()
    out = _ort_run(half, {k: v.numpy() for k, v in inputs.as_kwargs().items()})
    assert out.dtype == np.float32
    assert np.abs(out - ref).max() / np.abs(ref).max() <= FP16_GRAPH_MAX_REL


def test_bfloat16_graph_has_the_same_float32_islands(exported):
    """bfloat16 (for TensorRT's parser: ONNX Runtime's CPU kernels have no
    bfloat16 convolutions to run it): the float16 graph's types with
    bfloat16 for float16, weights rounded from their float32 originals."""
    _, _, onnx_dir, manifest = exported
    graph = onnx.load(str(denoiser_dir(onnx_dir, "sr", "sr0") / manifest.artifact))
    bf16 = half_precision_graph(graph, "bf16")
    strip_float64(bf16)
    onnx.checker.check_model(bf16)
    BF16, FLOAT16 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16
    assert "elem_type: 10" not in str(bf16.graph) and not [t for t in bf16.graph.initializer if t.data_type == FLOAT16]
    half = half_precision_graph(graph, "fp16")
    strip_float64(half)
    assert [n.op_type for n in bf16.graph.node] == [n.op_type for n in half.graph.node]
    cast_to = lambda m: [a.i for n in m.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]  # noqa: E731
    assert [BF16 if t == FLOAT16 else t for t in cast_to(half)] == cast_to(bf16)
    originals = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
    converted = [t for t in bf16.graph.initializer if t.data_type == BF16]
    assert converted
    for t in converted[:5]:
        bits = np.frombuffer(t.raw_data, dtype=np.int16).copy()
        values = torch.from_numpy(bits).view(torch.bfloat16).float().numpy().reshape(tuple(t.dims))
        expected = torch.from_numpy(originals[t.name]).to(torch.bfloat16).float().numpy()
        assert np.array_equal(values, expected)
    assert half_precision_graph(graph, "fp32").SerializeToString() == graph.SerializeToString()
    with pytest.raises(ValueError, match="precision"):
        half_precision_graph(graph, "int8")


# -- binding dtypes and the supported TensorRT versions ------------------------------------------


def test_binding_dtypes_are_checked_against_the_engine():
    engine = {"x": "FLOAT", "context_mask": "BOOL", "denoised": "FLOAT"}
    assert binding_dtype_problems(engine, {"x": "float32", "context_mask": "bool", "denoised": "float32"}) == []
    problems = binding_dtype_problems({**engine, "x": "HALF"}, {"x": "float32", "context_mask": "bool", "extra": "float32"})
    assert "tensor 'x': the engine has HALF (float16), the buffer is float32" in problems
    assert "engine tensor 'denoised' has no buffer" in problems
    assert not [p for p in problems if "extra" in p]  # a buffer the engine does not read is just not bound
    assert binding_dtype_problems({"x": "BF16"}, {"x": "bfloat16"}) == []


def test_supported_tensorrt_versions():
    assert trt_runtime.version_problem("10.12.0.36") is None and trt_runtime.version_problem("10.13.3") is None
    for old_or_new in ("10.3.0", "10.11.0", "11.0.0", "9.3.0"):
        assert "is not supported" in trt_runtime.version_problem(old_or_new)
    assert "unrecognised" in trt_runtime.version_problem("banana")


# -- without TensorRT / without CUDA: clear errors --------------------------------------------


@pytest.mark.skipif(TRT_OK, reason="TensorRT is installed here")
def test_without_tensorrt_the_cli_says_so(exported, tmp_path, capsys):
    model_dir, _, onnx_dir, _ = exported
    code = cli_main(["export", "tensorrt", "--onnx", str(onnx_dir), "--out", str(tmp_path / "trt"), "--max-batch", "4"])
    assert code == 2
    assert "TensorRT is not available" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="TensorRT is not available"):
        trt_runtime.require()


@pytest.mark.skipif(CUDA, reason="CUDA is available here")
def test_tensorrt_backend_needs_cuda(exported):
    from engines.tensorrt_backend import TensorRTBackend

    with pytest.raises(ValueError, match="needs a CUDA device"):
        TensorRTBackend(exported[0], device="cpu")


def test_batch_profile_is_hashable_and_ordered():
    assert BatchProfile((1, 2)) == make_profile(2) and hash(BatchProfile((1, 2))) == hash(make_profile(2))
    assert make_profile(2).as_range().model_dump() == {"min": 1, "opt": None, "max": 2}


# -- with TensorRT and a GPU (skipped here) -------------------------------------------------------------


# Relative to max |torch float32|, varied per-row inputs (sigma over each
# expert's interval, masked tokens, non-zero paint strengths). fp32: TensorRT
# may pick TF32 tactics. fp16: the float16 graph measured 0.0027 on ONNX
# Runtime's CPU kernels (test above); GPU kernels differ, so 3x that.
TRT_MAX_REL = {"fp32": 2e-3, "fp16": 0.008}


@pytest.mark.gpu
@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_engines_cache_and_run_against_torch(tmp_path, precision):
    """Export the tiny cascade, build strongly typed engines, reuse them from
    the cache, run the backend's CUDA graphs on varied per-row inputs."""
    from engines.tensorrt_backend import TensorRTBackend
    from export.onnx_export import export_onnx
    from export.tensorrt_build import build_engines

    model_dir = build_random_model_dir(tmp_path / "m", seed=0)
    export_onnx(model_dir, model_dir / "onnx", simplify=False, encoders=False, log=lambda m: None)
    profile = make_profile(4)
    built = build_engines(model_dir / "onnx", model_dir / "tensorrt", profile=profile, precision=precision, log=lambda m: None)
    assert len(built) == 3 and (model_dir / "tensorrt" / "timing.cache").is_file()
    again = build_engines(model_dir / "onnx", model_dir / "tensorrt", profile=profile, precision=precision, log=lambda m: None)
    assert [m.artifact_sha256 for m in again] == [m.artifact_sha256 for m in built]  # cache hit, not a rebuild
    dtype = {"fp32": "float32", "fp16": "float16"}[precision]
    backend = TensorRTBackend(model_dir, dtype=dtype, max_batch=4)
    backend.warmup()
    model = load_model(model_dir, device="cuda")
    for stage, expert in backend.experts():
        stage_cfg = model.config.stage(stage)
        expert_cfg = next(e for e in stage_cfg.experts if e.name == expert)
        for rows in (1, 3, 4, 7):
            inputs = random_denoiser_inputs(model.config, stage_cfg, expert_cfg, rows, seed=rows, device="cuda")
            with torch.no_grad():
                ref = model.stages[stage].experts[expert](**inputs.as_kwargs())
            out = backend.run(stage, expert, inputs)
            error = float((out - ref).abs().max() / ref.abs().max())
            assert error <= TRT_MAX_REL[precision], (stage, expert, rows, error)
