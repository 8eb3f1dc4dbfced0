"""Every TensorRT call of the project, in one thin module (TensorRT 10
Python API, 10.12 or newer, not 11: `SUPPORTED`). Nothing else imports
`tensorrt`.

NOT EXECUTED HERE: TensorRT cannot be installed on the machines this code
was written on (nor on the GPU machine lent to it). The calls follow the
documented TensorRT 10 Python API:

  build:   Builder, create_network(1 << STRONGLY_TYPED), OnnxParser.parse,
           create_builder_config, set_memory_pool_limit(WORKSPACE),
           one create_optimization_profile + set_shape(min = opt = max) +
           add_optimization_profile per batch bucket,
           create_timing_cache / set_timing_cache / serialize,
           build_serialized_network
  runtime: Runtime.deserialize_cuda_engine, num_io_tensors / get_tensor_name /
           get_tensor_mode / get_tensor_dtype, num_optimization_profiles,
           device_memory_size_v2, create_execution_context(USER_MANAGED),
           set_optimization_profile_async, set_device_memory(ptr, size),
           set_input_shape, set_tensor_address, execute_async_v3

Why strongly typed: weak typing (BuilderFlag.FP16/BF16, the builder picking
each layer's precision) is deprecated since TensorRT 10.12 and removed in
11, where every network is strongly typed. The precision is in the ONNX
graph itself (export/tensorrt_build.py `half_precision_graph`: float16 or
bfloat16, with the noise path, softmax and normalisations in float32), and
the builder keeps the types as given.
"""

from __future__ import annotations

from typing import Any

_trt: Any = None


SUPPORTED = ((10, 12), (11, 0))  # [10.12, 11): the optional extra pins the same range


def version_problem(text: str) -> str | None:
    """Why this TensorRT version is not supported (None: it is)."""
    try:
        numbers = tuple(int(p) for p in text.split(".")[:2])
    except ValueError:
        return f"unrecognised TensorRT version {text!r}"
    (lo, hi) = SUPPORTED
    if not lo <= numbers < hi:
        return (f"TensorRT {text} is not supported: this project builds strongly typed engines with the "
                f"TensorRT 10 API, {lo[0]}.{lo[1]} <= version < {hi[0]} (`pip install 'tensorrt>=10.12,<11'`)")
    return None


def available() -> tuple[bool, str]:
    """(True, version) or (False, why)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return False, f"the tensorrt Python package is not installed ({exc})"
    except OSError as exc:  # package present, libraries missing
        return False, f"TensorRT's libraries cannot be loaded ({exc})"
    problem = version_problem(version())
    return (False, problem) if problem else (True, version())


def require():
    """The tensorrt module, or a RuntimeError saying what is missing."""
    global _trt
    if _trt is None:
        ok, why = available()
        if not ok:
            raise RuntimeError(
                f"TensorRT is not available: {why}. Install TensorRT 10 (`pip install 'tensorrt>=10.12,<11'`) on a "
                "machine with an NVIDIA GPU, or use --backend onnxruntime / torch"
            )
        import tensorrt

        _trt = tensorrt
    return _trt


def version() -> str:
    import tensorrt

    return str(tensorrt.__version__)


def _logger():
    trt = require()
    return trt.Logger(trt.Logger.WARNING)


def build_serialized_engine(onnx_bytes: bytes, profiles: list[dict[str, tuple[tuple[int, ...], ...]]], *,
                            timing_cache: bytes | None = None, workspace_bytes: int | None = None) -> tuple[bytes, bytes]:
    """Parse a typed ONNX graph into a strongly typed network and build one
    engine with one optimization profile per entry of `profiles` ({input:
    (min, opt, max)}; profile i serves batch bucket i). Returns (plan,
    timing cache)."""
    trt = require()
    logger = _logger()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse the ONNX graph:\n{errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache or b"")
    config.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT failed to build the engine (see the log above)")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


class TrtEngine:
    """A deserialized engine whose execution contexts own no activation
    memory: the backend gives every context one shared buffer."""

    def __init__(self, plan: bytes, runtime=None):
        trt = require()
        self._trt = trt
        self._runtime = runtime or trt.Runtime(_logger())
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize the engine (built with another TensorRT or GPU?)")
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs.append(name)
            else:
                self.outputs.append(name)

    @property
    def profiles(self) -> int:
        return int(self.engine.num_optimization_profiles)

    def tensor_dtypes(self) -> dict[str, str]:
        """{tensor: TensorRT data type name} ("FLOAT", "HALF", "BF16", "BOOL", ...)."""
        return {name: self.engine.get_tensor_dtype(name).name for name in [*self.inputs, *self.outputs]}

    @property
    def activation_bytes(self) -> int:
        """Device memory one context needs for its activations (any profile)."""
        return int(self.engine.device_memory_size_v2)

    def create_context(self, profile: int, stream_handle: int):
        """A context without its own activation memory, on optimization
        profile `profile` (each bucket's context has a profile of its own)."""
        trt = self._trt
        context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise RuntimeError("TensorRT could not create an execution context")
        if not context.set_optimization_profile_async(int(profile), int(stream_handle)):
            raise RuntimeError(f"TensorRT rejected optimization profile {profile} (the engine has {self.profiles})")
        return TrtContext(context, self)


class TrtContext:
    """One execution context: shapes and tensor addresses set once (static
    buffers of one batch bucket), then enqueued or captured in a CUDA graph."""

    def __init__(self, context, engine: TrtEngine):
        self.context = context
        self.engine = engine

    def use_activation_memory(self, address: int, size: int) -> None:
        self.context.set_device_memory(int(address), int(size))

    def bind(self, tensors: dict[str, Any]) -> None:
        """Set every input's shape and every tensor's address (torch CUDA
        tensors, contiguous, of the engine's dtypes)."""
        for name in self.engine.inputs:
            t = tensors[name]
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise RuntimeError(f"TensorRT rejected shape {tuple(t.shape)} for input {name!r} (outside the profile?)")
        for name in [*self.engine.inputs, *self.engine.outputs]:
            if not self.context.set_tensor_address(name, int(tensors[name].data_ptr())):
                raise RuntimeError(f"TensorRT rejected the address of tensor {name!r}")

    def enqueue(self, stream_handle: int) -> None:
        if not self.context.execute_async_v3(int(stream_handle)):
            raise RuntimeError("TensorRT execute_async_v3 failed")


def runtime():
    """A trt.Runtime to deserialize several engines with."""
    trt = require()
    return trt.Runtime(_logger())
