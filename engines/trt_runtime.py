"""Every TensorRT call of the project, in one thin module (TensorRT 10
Python API). Nothing else imports `tensorrt`.

NOT EXECUTED HERE: TensorRT cannot be installed on the machines this code
was written on (nor on the GPU machine lent to it). The calls follow the
documented TensorRT 10 API; where 10.x minor releases renamed something, the
newer name is tried first and the older one second:

  build:   Builder, create_network, OnnxParser.parse, create_builder_config,
           set_memory_pool_limit(WORKSPACE), set_flag(FP16 | BF16),
           create_optimization_profile + set_shape + add_optimization_profile,
           create_timing_cache / set_timing_cache / serialize,
           build_serialized_network
  runtime: Runtime.deserialize_cuda_engine, num_io_tensors / get_tensor_name /
           get_tensor_mode / get_tensor_dtype,
           device_memory_size_v2 (10.1+; else device_memory_size),
           create_execution_context(USER_MANAGED) (10.0+; else
           create_execution_context_without_device_memory),
           set_device_memory(ptr, size) (else the device_memory property),
           set_input_shape, set_tensor_address, execute_async_v3
"""

from __future__ import annotations

from typing import Any

_trt: Any = None


def available() -> tuple[bool, str]:
    """(True, version) or (False, why)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return False, f"the tensorrt Python package is not installed ({exc})"
    except OSError as exc:  # package present, libraries missing
        return False, f"TensorRT's libraries cannot be loaded ({exc})"
    return True, version()


def require():
    """The tensorrt module, or a RuntimeError saying what is missing."""
    global _trt
    if _trt is None:
        ok, why = available()
        if not ok:
            raise RuntimeError(
                f"TensorRT is not available: {why}. Install TensorRT 10 (`pip install tensorrt`) on a machine "
                "with an NVIDIA GPU, or use --backend onnxruntime / torch"
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


def build_serialized_engine(onnx_bytes: bytes, shapes: dict[str, tuple[tuple[int, ...], ...]], *, precision: str,
                            timing_cache: bytes | None = None, workspace_bytes: int | None = None) -> tuple[bytes, bytes]:
    """Parse an ONNX graph and build one engine with one optimization
    profile. shapes: {input: (min, opt, max)}. Returns (plan, timing cache)."""
    trt = require()
    logger = _logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse the ONNX graph:\n{errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    elif precision != "fp32":
        raise ValueError(f"unknown precision {precision!r}")
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
    def activation_bytes(self) -> int:
        """Device memory one context needs for its activations."""
        size = getattr(self.engine, "device_memory_size_v2", None)
        return int(size if size is not None else self.engine.device_memory_size)

    def create_context(self):
        trt = self._trt
        strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
        if strategy is not None:
            context = self.engine.create_execution_context(strategy)
        else:
            context = self.engine.create_execution_context_without_device_memory()
        if context is None:
            raise RuntimeError("TensorRT could not create an execution context")
        return TrtContext(context, self)


class TrtContext:
    """One execution context: shapes and tensor addresses set once (static
    buffers of one batch bucket), then enqueued or captured in a CUDA graph."""

    def __init__(self, context, engine: TrtEngine):
        self.context = context
        self.engine = engine

    def use_activation_memory(self, address: int, size: int) -> None:
        try:
            self.context.set_device_memory(int(address), int(size))
        except (TypeError, AttributeError):  # TensorRT 10.0: the property, size implied
            self.context.device_memory = int(address)

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
