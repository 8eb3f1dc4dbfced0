"""The TensorRT backend (`--backend tensorrt`, engines from
`ediffi export tensorrt`, default folder `<model dir>/tensorrt` or
`EDIFFI_TENSORRT_DIR`).

NOT EXECUTED HERE: TensorRT is not installable on the machines this was
written on. Its pure logic (bucket choice, profiles, cache keys, stale and
mismatched engine refusal) lives in `export/tensorrt_build.py` and is tested
on CPU; the TensorRT calls are in `export/trt_runtime.py`; the tests that
need TensorRT skip with the reason.

As TensorRT's demo/Diffusion engine: build -> load -> activate -> allocate
buffers -> infer.
- load: every engine's manifest is checked against the model directory (the
  source weights' sha256, the expert's sigma range, the network config),
  this GPU, this TensorRT version and the requested precision, before any
  engine is deserialized; then all engines are deserialized once and stay
  resident.
- activate: one execution context per (expert, batch bucket), on that
  bucket's optimization profile (engines have one per bucket, min = opt =
  max), none owning activation memory; one shared activation buffer, sized
  for the largest, serves them all (experts run one at a time).
- allocate: static input/output buffers per (stage, bucket), shared by the
  experts of a stage; each buffer's dtype is checked against the engine's
  (`get_tensor_dtype`) and tensors are bound by name once per context.
- infer: rows are copied into the bucket's buffers (spare rows repeat the
  last row) on torch's current stream; the backend's own stream waits for
  them, the context's CUDA graph (captured at warmup on that stream, one per
  bucket) is replayed there, torch's stream waits for it, and the first rows
  of the output are returned. TensorRT work never goes to the legacy default
  stream (which synchronizes with every other stream). Everything runs under
  `torch.cuda.device(device)`.

The model's encoders run on torch (CUDA); experts are `TrtExpert` modules
with `EDMDenoiser`'s call, so `backend.model` works with the reference
pipeline too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ediffi.config import ModelConfig
from ediffi.encoders import Encoders
from ediffi.model import EDiffIModel, ExpertEnsemble
from ediffi.pipeline import DenoiserInputs
from engines.backend import Backend, parse_dtype, slice_rows
from engines.onnx_backend import DeviceAnchor
from export.manifest import ArtifactManifest, ManifestMismatch, expected_denoiser, load_checked_denoiser
from export.tensorrt_build import (
    DTYPE_TO_PRECISION,
    binding_dtype_problems,
    bucket_for,
    check_engine,
    current_gpu,
)

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "bool": torch.bool,
                 "int64": torch.int64, "int32": torch.int32}


class TrtExpert(DeviceAnchor):
    """One engine, called like `EDMDenoiser` (float32 I/O)."""

    def __init__(self, backend: TensorRTBackend, stage: str, expert: str, device: torch.device):
        super().__init__(device, torch.float32)
        self._backend = [backend]  # not a submodule
        self.stage, self.expert = stage, expert

    def forward(self, x, sigma, context, context_mask, pooled, pww_mask, pww_strength, low_res=None, low_res_sigma=None):
        inputs = DenoiserInputs(x, sigma, context, context_mask, pooled, pww_mask, pww_strength, low_res, low_res_sigma)
        return self._backend[0].run(self.stage, self.expert, inputs)


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(
        self,
        model: EDiffIModel | str | Path | None = None,
        *,
        tensorrt_dir: str | Path | None = None,
        onnx_dir: str | Path | None = None,
        device: str | torch.device = "cuda",
        dtype: str | torch.dtype = "float16",
        max_batch: int = 16,
        cuda_graphs: bool = True,
    ):
        self._device = torch.device(device)
        if self._device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"the tensorrt backend needs a CUDA device (got {device!r}, CUDA available: {torch.cuda.is_available()})")
        if self._device.index is None:
            self._device = torch.device("cuda", torch.cuda.current_device())
        # dtype selects the engines' precision; tensors in and out stay float32.
        self._precision = DTYPE_TO_PRECISION[str(parse_dtype(dtype)).removeprefix("torch.")]
        self._tensorrt_dir = tensorrt_dir
        self._onnx_dir = onnx_dir
        self._max_batch = int(max_batch)
        self._cuda_graphs = cuda_graphs
        self._model: EDiffIModel | None = None
        if model is not None:
            self.load(model)

    # -- load: check, deserialize, activate, allocate ---------------------------------
    def load(self, model: EDiffIModel | str | Path) -> None:
        with torch.cuda.device(self._device):
            self._load(model)

    def _load(self, model: EDiffIModel | str | Path) -> None:
        from export import trt_runtime

        trt_runtime.require()
        model_dir = model.model_dir if isinstance(model, EDiffIModel) else Path(model)
        trt_dir = Path(self._tensorrt_dir) if self._tensorrt_dir else model_dir / "tensorrt"
        onnx_dir = Path(self._onnx_dir) if self._onnx_dir else model_dir / "onnx"
        config = ModelConfig.load(model_dir)
        gpu, version = current_gpu(self._device.index), trt_runtime.version()
        fix = (f"ediffi export onnx --model-dir {model_dir} --out {onnx_dir} && "
               f"ediffi export tensorrt --onnx {onnx_dir} --out {trt_dir} --precision {self._precision}")
        hashes: dict[str, str] = {}
        manifests: dict[tuple[str, str], tuple[Path, ArtifactManifest]] = {}
        for stage in config.stages:
            for expert in stage.experts:
                folder = trt_dir / stage.name / expert.name
                if not (folder / "manifest.json").is_file():
                    raise ManifestMismatch(f"no TensorRT engine for {stage.name}/{expert.name} at {folder}\nfix: {fix}")
                manifest = ArtifactManifest.load(folder)
                expected = expected_denoiser(model_dir, config, stage, expert, hashes)
                expected.pop("kind")
                onnx_manifest = None
                if (onnx_dir / stage.name / expert.name / "manifest.json").is_file():
                    _, onnx_manifest = load_checked_denoiser(onnx_dir, model_dir, config, stage, expert, dtype=None,
                                                             fix=fix, hashes=hashes)
                check_engine(folder, manifest, fix=fix, gpu=gpu, trt_version=version, precision=self._precision,
                             onnx_manifest=onnx_manifest, expected_source=expected)
                if manifest.batch.max is None or manifest.batch.max < self._max_batch:
                    raise ManifestMismatch(
                        f"engine {stage.name}/{expert.name} takes batches up to {manifest.batch.max}, the backend "
                        f"sends up to max_batch={self._max_batch}\nfix: {fix} --max-batch {self._max_batch}"
                    )
                manifests[(stage.name, expert.name)] = (folder, manifest)

        runtime = trt_runtime.runtime()
        self._engines = {key: trt_runtime.TrtEngine((folder / m.artifact).read_bytes(), runtime)
                         for key, (folder, m) in manifests.items()}
        self._manifests = {key: m for key, (_, m) in manifests.items()}
        self._buckets = {key: [b for b in m.tensorrt.buckets] for key, m in self._manifests.items()}
        # One activation buffer for every context (experts run one at a time).
        size = max(e.activation_bytes for e in self._engines.values())
        self._activations = torch.empty(max(size, 1), dtype=torch.uint8, device=self._device)
        # Static buffers per (stage, bucket), shared by the stage's experts.
        self._stream = torch.cuda.Stream(self._device)
        self._static: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        self._contexts: dict[tuple[str, str, int], object] = {}
        self._graphs: dict[tuple[str, str, int], torch.cuda.CUDAGraph] = {}
        for (stage, expert), manifest in self._manifests.items():
            engine = self._engines[(stage, expert)]
            buckets = self._buckets[(stage, expert)]
            if engine.profiles != len(buckets):
                raise ManifestMismatch(f"engine {stage}/{expert} has {engine.profiles} optimization profiles for "
                                       f"{len(buckets)} batch buckets {buckets}\nfix: {fix} --force")
            for profile, bucket in enumerate(buckets):
                buffers = self._static.setdefault((stage, bucket), self._allocate(manifest, bucket))
                problems = binding_dtype_problems(
                    engine.tensor_dtypes(), {n: str(t.dtype).removeprefix("torch.") for n, t in buffers.items()})
                if problems:
                    raise ManifestMismatch(f"engine {stage}/{expert} does not match its manifest's tensors:\n  - "
                                           + "\n  - ".join(problems) + f"\nfix: {fix} --force")
                context = engine.create_context(profile, self._stream.cuda_stream)
                context.use_activation_memory(self._activations.data_ptr(), self._activations.numel())
                context.bind(buffers)
                self._contexts[(stage, expert, bucket)] = context
        self._stream.synchronize()  # the profile switches above were queued on it

        encoders = Encoders(model_dir, config.encoders).to(self._device).eval()
        stages = {
            stage.name: ExpertEnsemble(stage, {e.name: TrtExpert(self, stage.name, e.name, self._device) for e in stage.experts})
            for stage in config.stages
        }
        self._model = EDiffIModel(config, encoders, stages, model_dir)

    def _allocate(self, manifest: ArtifactManifest, bucket: int) -> dict[str, torch.Tensor]:
        buffers = {}
        for spec in [*manifest.inputs, *manifest.outputs]:
            shape = [bucket if isinstance(d, str) else d for d in spec.shape]
            buffers[spec.name] = torch.zeros(shape, dtype=_TORCH_DTYPES[spec.dtype], device=self._device)
        return buffers

    # -- Backend interface -------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # I/O; the engines compute in their precision

    def describe(self) -> str:
        return f"tensorrt:{self._device}:{self._precision}"

    def max_batch(self, stage: str, expert: str) -> int:
        return self._max_batch

    def buckets(self, stage: str, expert: str) -> list[int]:
        built, cap = self._buckets[(stage, expert)], self._max_batch
        return [b for b in built if b < cap] + [min(b for b in built if b >= cap)]

    def _enqueue(self, stage: str, expert: str, bucket: int) -> None:
        """Run one context on the backend's stream, ordered after the input
        copies queued on torch's current stream and before whatever torch
        queues next."""
        key = (stage, expert, bucket)
        current = torch.cuda.current_stream(self._device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            graph = self._graphs.get(key)
            if graph is not None:
                graph.replay()
            else:
                self._contexts[key].enqueue(self._stream.cuda_stream)
        current.wait_stream(self._stream)

    def _capture(self, stage: str, expert: str, bucket: int) -> None:
        key = (stage, expert, bucket)
        context = self._contexts[key]
        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        context.enqueue(self._stream.cuda_stream)  # one plain run first (TensorRT's lazy setup)
        self._stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self._stream):
            context.enqueue(self._stream.cuda_stream)
        self._graphs[key] = graph

    @torch.inference_mode()
    def warmup(self, repeats: int = 3) -> None:
        """Capture a CUDA graph per (expert, bucket), then time each bucket
        into `profile`."""
        from engines.backend import profile_buckets

        with torch.cuda.device(self._device):
            for stage, expert in self.experts():
                for bucket in self.buckets(stage, expert):
                    if self._cuda_graphs and (stage, expert, bucket) not in self._graphs:
                        self._capture(stage, expert, bucket)
            self.synchronize()
            self.profile = profile_buckets(self, repeats)

    @torch.inference_mode()
    def run(self, stage: str, expert: str, inputs: DenoiserInputs) -> torch.Tensor:
        with torch.cuda.device(self._device):
            return self._run(stage, expert, inputs)

    def _run(self, stage: str, expert: str, inputs: DenoiserInputs) -> torch.Tensor:
        cap = self.max_batch(stage, expert)
        rows = len(inputs)
        if rows > cap:
            return torch.cat([self._run(stage, expert, slice_rows(inputs, i, min(i + cap, rows))) for i in range(0, rows, cap)])
        bucket = bucket_for(rows, self.buckets(stage, expert))
        buffers = self._static[(stage, bucket)]
        for name, value in inputs.as_kwargs().items():
            target = buffers[name]
            target[:rows].copy_(value)
            if rows < bucket:
                target[rows:].copy_(value[-1:].expand(bucket - rows, *value.shape[1:]))
        self._enqueue(stage, expert, bucket)
        return buffers["denoised"][:rows].clone()

    def synchronize(self) -> None:
        torch.cuda.synchronize(self._device)
