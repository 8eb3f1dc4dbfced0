"""The ONNX Runtime backend: one InferenceSession per expert, all resident.

Graphs come from `ediffi export onnx` (default folder `<model dir>/onnx`,
or `EDIFFI_ONNX_DIR`); each one's manifest is checked against the model
directory before its session is created, and a mismatch is refused with the
command that fixes it (`export.manifest.ManifestMismatch`).

Each expert becomes an `OrtExpert`, an `nn.Module` with the same call as
`EDMDenoiser`, so the model this backend exposes is an ordinary
`EDiffIModel`: the engine, the reference pipeline (`ediffi.pipeline.generate`)
and sigma routing work unchanged. The T5 / CLIP towers run on ONNX Runtime
too when their graphs were exported (else on torch).

Calls use I/O binding: ONNX Runtime reads the torch input tensors in place
and writes `denoised` straight into a torch tensor allocated for it, so a
batch is never copied through numpy. CPU provider here; CUDA provider when
the device is CUDA and onnxruntime-gpu is installed (it then runs on torch's
current stream).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ediffi.config import ModelConfig
from ediffi.encoders import Encoders
from ediffi.model import EDiffIModel, ExpertEnsemble
from ediffi.pipeline import DenoiserInputs
from engines.backend import Backend, profile_buckets, parse_dtype, slice_rows
from export.onnx_export import session_options
from export.manifest import (
    BATCH,
    ENCODER_KINDS,
    ArtifactManifest,
    TensorSpec,
    load_checked_denoiser,
    load_checked_encoder,
)

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": (torch.float32, np.float32),
    "float16": (torch.float16, np.float16),
    "bool": (torch.bool, np.bool_),
    "int64": (torch.int64, np.int64),
    "int32": (torch.int32, np.int32),
}


def export_hint(model_dir: Path, onnx_dir: Path, dtype: str = "float32") -> str:
    extra = "" if dtype == "float32" else f" --dtype {dtype}"
    return f"ediffi export onnx --model-dir {model_dir} --out {onnx_dir}{extra}"


def providers_for(device: torch.device) -> list:
    import onnxruntime as ort

    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ValueError(
            f"device {device} asked for, but this onnxruntime has no CUDAExecutionProvider "
            f"(available: {ort.get_available_providers()}); install onnxruntime-gpu or use device cpu"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index).cuda_stream
    return [("CUDAExecutionProvider", {"device_id": index, "user_compute_stream": str(stream)}), "CPUExecutionProvider"]


class BoundSession:
    """An InferenceSession called with torch tensors through I/O binding."""

    def __init__(self, path: Path, manifest: ArtifactManifest, device: torch.device, threads: int | None,
                 providers: Sequence | None = None):
        import onnxruntime as ort

        self.path = path
        self.manifest = manifest
        self.device = device
        self.session = ort.InferenceSession(
            str(path), sess_options=session_options(threads), providers=list(providers or providers_for(device))
        )
        self.inputs: dict[str, TensorSpec] = {t.name: t for t in manifest.inputs}
        self.outputs: list[TensorSpec] = list(manifest.outputs)
        graph_inputs = [i.name for i in self.session.get_inputs()]
        if graph_inputs != list(self.inputs):
            raise ValueError(f"{path}: graph inputs {graph_inputs} differ from its manifest {list(self.inputs)}")
        self._device_type = "cuda" if device.type == "cuda" else "cpu"
        self._device_id = (device.index or 0) if device.type == "cuda" else 0

    def __call__(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        binding = self.session.io_binding()
        keep = []  # the bound tensors must outlive the run
        batch = None
        for name, spec in self.inputs.items():
            if name not in tensors or tensors[name] is None:
                raise ValueError(f"{self.path}: input {name!r} is required")
            torch_dtype, np_dtype = _DTYPES[spec.dtype]
            t = tensors[name].to(device=self.device, dtype=torch_dtype).contiguous()
            expected = [t.shape[0] if d == BATCH else d for d in spec.shape]
            if list(t.shape) != expected:
                raise ValueError(f"{self.path}: input {name!r} has shape {tuple(t.shape)}, the graph takes {spec.shape}")
            batch = t.shape[0] if batch is None else batch
            if t.shape[0] != batch:
                raise ValueError(f"{self.path}: inputs disagree on the batch size ({batch} vs {t.shape[0]} for {name!r})")
            keep.append(t)
            binding.bind_input(name, self._device_type, self._device_id, np_dtype, list(t.shape), t.data_ptr())
        results = {}
        for spec in self.outputs:
            torch_dtype, np_dtype = _DTYPES[spec.dtype]
            shape = [batch if d == BATCH else d for d in spec.shape]
            out = torch.empty(shape, dtype=torch_dtype, device=self.device)
            binding.bind_output(spec.name, self._device_type, self._device_id, np_dtype, shape, out.data_ptr())
            results[spec.name] = out
        self.session.run_with_iobinding(binding)
        if self._device_type == "cuda":
            binding.synchronize_outputs()
        del keep
        return results


class DeviceAnchor(nn.Module):
    """A module without weights whose (empty) parameter tells `EDiffIModel`
    and `Encoders` the device and dtype it runs at."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.anchor = nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False)


class OrtExpert(DeviceAnchor):
    """One exported expert, called like `EDMDenoiser`."""

    def __init__(self, session: BoundSession, dtype: torch.dtype):
        super().__init__(session.device, dtype)
        self.session = session
        self.manifest = session.manifest
        self.is_super_resolution = bool(session.manifest.super_resolution)

    def forward(self, x, sigma, context, context_mask, pooled, pww_mask, pww_strength, low_res=None, low_res_sigma=None):
        tensors = dict(x=x, sigma=sigma, context=context, context_mask=context_mask, pooled=pooled,
                       pww_mask=pww_mask, pww_strength=pww_strength)
        if self.is_super_resolution:
            if low_res is None or low_res_sigma is None:
                raise ValueError("a super-resolution expert needs low_res and its noise level")
            tensors.update(low_res=low_res, low_res_sigma=low_res_sigma)
        return self.session(tensors)["denoised"].to(x.dtype)


class OrtTextTower(DeviceAnchor):
    """Stands in for T5EncoderModel / CLIPTextModelWithProjection."""

    def __init__(self, session: BoundSession, config):
        super().__init__(session.device, torch.float32)
        self.session = session
        self.config = config

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(**self.session({"input_ids": input_ids, "attention_mask": attention_mask}))


class OrtVisionTower(DeviceAnchor):
    """Stands in for CLIPVisionModelWithProjection."""

    def __init__(self, session: BoundSession, config):
        super().__init__(session.device, torch.float32)
        self.session = session
        self.config = config

    def forward(self, pixel_values):
        return SimpleNamespace(**self.session({"pixel_values": pixel_values}))


def load_onnx_model(model_dir: str | Path, onnx_dir: str | Path | None = None, *, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype = "float32", threads: int | None = None, providers: Sequence | None = None,
                    onnx_encoders: bool = True) -> EDiffIModel:
    """An `EDiffIModel` whose experts (and encoders, where exported) are
    ONNX Runtime sessions. Refuses graphs whose manifests do not match."""
    model_dir = Path(model_dir)
    onnx_dir = Path(onnx_dir) if onnx_dir is not None else model_dir / "onnx"
    device = torch.device(device)
    torch_dtype = parse_dtype(dtype)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    fix = export_hint(model_dir, onnx_dir, dtype_name)
    if not onnx_dir.is_dir():
        raise FileNotFoundError(f"no ONNX graphs at {onnx_dir}\nfix: {fix}")
    config = ModelConfig.load(model_dir)
    hashes: dict[str, str] = {}
    # Check every manifest before creating any session.
    checked = {
        (stage.name, expert.name): load_checked_denoiser(onnx_dir, model_dir, config, stage, expert, dtype=dtype_name,
                                                         fix=fix, hashes=hashes)
        for stage in config.stages for expert in stage.experts
    }
    encoder_graphs = {kind: load_checked_encoder(onnx_dir, model_dir, config, kind, fix=fix, hashes=hashes)
                      for kind in ENCODER_KINDS} if onnx_encoders else {}
    stages = {}
    for stage in config.stages:
        experts = {}
        for expert in stage.experts:
            path, manifest = checked[(stage.name, expert.name)]
            experts[expert.name] = OrtExpert(BoundSession(path, manifest, device, threads, providers), torch_dtype)
        stages[stage.name] = ExpertEnsemble(stage, experts).eval()
    encoders = Encoders(model_dir, config.encoders).to(device).eval()
    for kind, found in encoder_graphs.items():
        if found is None:
            log.info("encoder %s has no exported graph in %s: it runs on torch", kind, onnx_dir)
            continue
        session = BoundSession(found[0], found[1], device, threads, providers)
        if kind == "t5":
            encoders.t5 = OrtTextTower(session, encoders.t5.config)
        elif kind == "clip_text":
            encoders.clip_text = OrtTextTower(session, encoders.clip_text.config)
        else:
            encoders.clip_vision = OrtVisionTower(session, encoders.clip_vision.config)
    return EDiffIModel(config, encoders, stages, model_dir)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(
        self,
        model: EDiffIModel | str | Path | None = None,
        *,
        onnx_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32,
        max_batch: int | dict[tuple[str, str], int] = 16,
        threads: int | None = None,
        providers: Sequence | None = None,
        onnx_encoders: bool = True,
    ):
        self._device = torch.device(device)
        self._dtype = parse_dtype(dtype)
        if self._device.type == "cpu" and self._dtype != torch.float32:
            raise ValueError("the onnxruntime backend runs float32 on CPU; float16 graphs need a CUDA device")
        self._onnx_dir = onnx_dir
        self._max_batch = max_batch
        self._threads = threads
        self._providers = providers
        self._onnx_encoders = onnx_encoders
        self._model: EDiffIModel | None = None
        if model is not None:
            self.load(model)

    def load(self, model: EDiffIModel | str | Path) -> None:
        model_dir = model.model_dir if isinstance(model, EDiffIModel) else Path(model)
        self._model = load_onnx_model(
            model_dir, self._onnx_dir, device=self._device, dtype=self._dtype, threads=self._threads,
            providers=self._providers, onnx_encoders=self._onnx_encoders,
        )

    @torch.inference_mode()
    def warmup(self, repeats: int = 3) -> None:
        """Each expert at each batch bucket; timings into `profile`."""
        self.profile = profile_buckets(self, repeats)

    @torch.inference_mode()
    def run(self, stage: str, expert: str, inputs: DenoiserInputs) -> torch.Tensor:
        net = self._expert(stage, expert)
        cap = self.max_batch(stage, expert)
        rows = len(inputs)
        if rows <= cap:
            return net(**inputs.as_kwargs())
        return torch.cat([net(**slice_rows(inputs, i, min(i + cap, rows)).as_kwargs()) for i in range(0, rows, cap)])

    def synchronize(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
