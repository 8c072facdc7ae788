"""TensorRT runner: one deserialized engine, device buffers allocated once, one CUDA stream.

    engine = manifest.engines.get("decoder")
    spec = GraphSpec.from_manifest("decoder", graph, bundle_dir, engine=engine)
    runner = get_backend("tensorrt")(spec)
    with runner:
        outputs = runner.infer(feeds)   # numpy in, numpy out, like the ONNX Runtime runner

The engine file and the TensorRT version / compute capability it was built with come from the
bundle manifest's `engines[graph]` record (an `EngineRecord`, written by `nvlm-export engine` and
validated by `load_manifest`); an engine built for another GPU or TensorRT version is refused
before TensorRT sees it.

Per call: pick the first optimisation profile whose min..max box holds the input shapes (the
planner lists the decoder's `decode` profile first, so one-token steps use it), set input shapes,
copy inputs host->device, `execute_async_v3` on the runner's stream, copy outputs back. Device
buffers are sized once at activation for the largest shape of every profile, so no call allocates
device memory. The KV cache still round-trips through the host each step; a device-resident cache
(a KVCacheLike whose feeds are device pointers) is the next step and needs no change here beyond
binding its addresses.

TensorRT API (10.x and 11 alike): Runtime.deserialize_cuda_engine, ICudaEngine.num_io_tensors /
get_tensor_name / get_tensor_mode / get_tensor_dtype / get_tensor_profile_shape,
IExecutionContext.set_optimization_profile_async / set_input_shape / get_tensor_shape /
set_tensor_address / execute_async_v3. Device memory and the stream: polygraphy.cuda
(DeviceArray, Stream). `tensorrt` and polygraphy are imported on activation only.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nvlm_export.errors import BundleError, InputError, MissingExtraError
from nvlm_export.runtime import nvidia_smi
from nvlm_export.runtime.backends.base import GraphRunner, GraphSpec
from nvlm_export.runtime.manifest import EngineRecord

GiB = 2**30
Shape = tuple[int, ...]


class TensorRTRunner(GraphRunner):
    """Runs one TensorRT engine of a bundle."""

    backend_name = "tensorrt"

    def __init__(
        self,
        spec: GraphSpec,
        *,
        validate_inputs: bool = True,
    ) -> None:
        require_tensorrt()  # fail at construction, before any bundle work, when TensorRT is absent
        super().__init__(spec, validate_inputs=validate_inputs)
        self.bundle_dir = spec.path.parent
        self.record = spec.engine  # the manifest's engines[graph], through Pipeline.load
        self._trt: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._buffers: dict[str, Any] = {}
        self._profiles: list[dict[str, tuple[Shape, Shape]]] = []
        self._active_profile = -1

    # -- activation -----------------------------------------------------------------------------
    def _activate_impl(self) -> None:
        trt = _import_tensorrt()
        from polygraphy import cuda

        record = self.record
        if record is None:
            raise BundleError(
                f"The bundle has no TensorRT engine for the {self.spec.name} graph",
                fix="Build the engines on this device with: nvlm-export engine BUNDLE",
            )
        check_engine_compatible(record, self.spec.name, trt.__version__, local_gpu().sm)
        path = self.bundle_dir / record.file
        if not path.is_file():
            raise BundleError(
                f"The {self.spec.name} engine {path} does not exist",
                fix="Build the engines with: nvlm-export engine BUNDLE",
            )
        self._trt = trt
        logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(logger)
        self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            raise BundleError(
                f"TensorRT cannot load the {self.spec.name} engine {path}",
                why="the file is corrupt or was built by another TensorRT",
                fix="Rebuild the engines with: nvlm-export engine BUNDLE --overwrite",
            )
        self._context = self._engine.create_execution_context()
        self._stream = cuda.Stream()
        self._check_interface()
        self._profiles = [
            self._profile_box(i) for i in range(self._engine.num_optimization_profiles)
        ]
        self._allocate(cuda)

    def _io_names(self, mode: Any) -> list[str]:
        names = (self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors))
        return [n for n in names if self._engine.get_tensor_mode(n) == mode]

    def _check_interface(self) -> None:
        inputs = self._io_names(self._trt.TensorIOMode.INPUT)
        outputs = self._io_names(self._trt.TensorIOMode.OUTPUT)
        for kind, declared, real in (
            ("inputs", self.spec.input_names, inputs),
            ("outputs", self.spec.output_names, outputs),
        ):
            if set(declared) != set(real):
                raise BundleError(
                    f"The {self.spec.name} engine's {kind} differ from the manifest",
                    why=f"engine {sorted(real)}, manifest {sorted(declared)}",
                    fix="Rebuild the engines with: nvlm-export engine BUNDLE --overwrite",
                )
        self._input_names = list(self.spec.input_names)
        self._output_names = list(self.spec.output_names)

    def _profile_box(self, index: int) -> dict[str, tuple[Shape, Shape]]:
        box = {}
        for name in self._input_names:
            low, _, high = self._engine.get_tensor_profile_shape(name, index)
            box[name] = (tuple(low), tuple(high))
        return box

    def _allocate(self, cuda: Any) -> None:
        """One device buffer per tensor, at the largest shape any profile allows."""
        largest: dict[str, Shape] = {}
        for index, box in enumerate(self._profiles):
            self._use_profile(index)
            for name, (_, high) in box.items():
                self._context.set_input_shape(name, high)
                largest[name] = _elementwise_max(largest.get(name), high)
            for name in self._output_names:
                shape = tuple(self._context.get_tensor_shape(name))
                largest[name] = _elementwise_max(largest.get(name), shape)
        for name, shape in largest.items():
            dtype = self._numpy_dtype(name)
            self._buffers[name] = cuda.DeviceArray(shape=shape, dtype=dtype)
        self._bind_addresses()

    def _numpy_dtype(self, name: str) -> np.dtype:
        trt_dtype = self._engine.get_tensor_dtype(name)
        try:
            return np.dtype(self._trt.nptype(trt_dtype))
        except TypeError:
            raise BundleError(
                f"Engine tensor '{name}' has type {trt_dtype}, which numpy cannot hold",
                fix="Export graph inputs/outputs as float32, float16, int64, int32 or bool",
            ) from None

    def _bind_addresses(self) -> None:
        for name, buffer in self._buffers.items():
            self._context.set_tensor_address(name, buffer.ptr)

    def _use_profile(self, index: int) -> None:
        if index != self._active_profile:
            self._context.set_optimization_profile_async(index, self._stream.ptr)
            self._active_profile = index
            self._bind_addresses()

    # -- inference ------------------------------------------------------------------------------
    def _infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = {name: tuple(feeds[name].shape) for name in self._input_names}
        self._use_profile(select_profile(self._profiles, shapes, self.spec.name))
        for name in self._input_names:
            array = np.ascontiguousarray(feeds[name])
            self._context.set_input_shape(name, array.shape)
            self._buffers[name].resize(array.shape).copy_from(array, stream=self._stream)
        if not self._context.execute_async_v3(self._stream.ptr):
            raise InputError(f"TensorRT failed to run the {self.spec.name} engine")
        outputs = {}
        for name in self._output_names:
            shape = tuple(self._context.get_tensor_shape(name))
            host = np.empty(shape, dtype=self._numpy_dtype(name))
            self._buffers[name].resize(shape).copy_to(host, stream=self._stream)
            outputs[name] = host
        self._stream.synchronize()
        return outputs

    def _deactivate_impl(self) -> None:
        for buffer in self._buffers.values():
            buffer.free()
        self._buffers.clear()
        if self._stream is not None:
            self._stream.free()
        self._context = self._engine = self._stream = None
        self._active_profile = -1


def select_profile(
    profiles: Sequence[Mapping[str, tuple[Shape, Shape]]], shapes: Mapping[str, Shape], graph: str
) -> int:
    """Index of the first profile whose min..max box holds every input shape."""
    for index, box in enumerate(profiles):
        if all(_inside(shapes[name], *box[name]) for name in shapes if name in box):
            return index
    limits = "; ".join(
        ", ".join(f"{name} {list(lo)}..{list(hi)}" for name, (lo, hi) in box.items())
        for box in profiles
    )
    raise InputError(
        f"Input shapes {dict(shapes)} are outside every profile of the {graph} engine",
        why=f"the engine accepts {limits}",
        fix="Shorten the prompt or use fewer tiles, or rebuild the engine with larger limits",
    )


def _inside(shape: Shape, low: Shape, high: Shape) -> bool:
    return len(shape) == len(low) and all(
        lo <= s <= hi for s, lo, hi in zip(shape, low, high, strict=True)
    )


def _elementwise_max(a: Shape | None, b: Shape) -> Shape:
    return tuple(b) if a is None else tuple(max(x, y) for x, y in zip(a, b, strict=True))


def require_tensorrt() -> None:
    """MissingExtraError unless `tensorrt` and polygraphy are importable (nothing is imported)."""
    missing = [m for m in ("tensorrt", "polygraphy") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(
            "The 'tensorrt' backend cannot be used here",
            why=f"{' and '.join(missing)} is not installed",
            fix="Install it with: pip install 'nvlm-export[tensorrt]' (JetPack ships tensorrt)",
        )


def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError:
        raise MissingExtraError(
            "The 'tensorrt' backend needs TensorRT",
            why="tensorrt is not installed",
            fix="Install it with: pip install 'nvlm-export[tensorrt]' (JetPack ships it)",
        ) from None
    return trt


# --- compatibility of an engine with this machine ---------------------------------------------


def check_engine_compatible(
    record: EngineRecord, graph: str, trt_version: str, device_sm: str
) -> None:
    """Refuse an engine built for another GPU or TensorRT version, saying what to do instead."""
    built_trt, built_sm = record.tensorrt_version, record.compute_capability
    if built_sm != device_sm:
        raise BundleError(
            f"The {graph} engine was built for compute capability {built_sm} "
            f"({record.device or 'unknown GPU'})",
            why=f"this GPU is {device_sm}; a TensorRT engine runs only on the GPU it was built for",
            fix="Rebuild the engines here with: nvlm-export engine BUNDLE --overwrite",
        )
    if built_trt != trt_version:
        raise BundleError(
            f"The {graph} engine was built with TensorRT {built_trt}",
            why=f"this machine has TensorRT {trt_version}; an engine is tied to one version",
            fix="Rebuild the engines here with: nvlm-export engine BUNDLE --overwrite",
        )


# --- the local GPU (shared with the exporter's target detection) ------------------------------


@dataclass(frozen=True)
class LocalGpu:
    name: str
    compute_capability: tuple[int, int]
    memory_gib: float  # 0 when unknown (Jetson's nvidia-smi has no memory.total)

    @property
    def sm(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


# Jetson modules named in the device tree, with their GPU's compute capability. Thor is sm_110
# under CUDA 13 (JetPack 7); CUDA 12.8/12.9 called it sm_101.
JETSON_MODULES = (("thor", (11, 0)), ("orin", (8, 7)))
JETSON_MODEL_FILE = Path("/proc/device-tree/model")


def local_gpu() -> LocalGpu:
    """This machine's first GPU; BundleError when none can be read."""
    gpu = detect_local_gpu()
    if gpu is None:
        raise BundleError(
            "No CUDA GPU found",
            why="nvidia-smi, cuda-python and the Jetson device tree report none",
            fix="Run TensorRT engines on the GPU they were built for",
        )
    return gpu


def detect_local_gpu(model_file: Path = JETSON_MODEL_FILE) -> LocalGpu | None:
    return _gpu_from_nvidia_smi() or _gpu_from_cuda_python() or gpu_from_device_tree(model_file)


def _gpu_from_nvidia_smi() -> LocalGpu | None:
    out = nvidia_smi.query("gpu", ("name", "compute_cap", "memory.total"), timeout=20)
    return None if out is None else parse_nvidia_smi(out)


def parse_nvidia_smi(text: str) -> LocalGpu | None:
    """The first GPU of `nvidia-smi --query-gpu=name,compute_cap,memory.total` CSV output."""
    for line in text.strip().splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 3:
            continue
        name, cc, memory = parts
        try:
            major, minor = (int(x) for x in cc.split("."))
        except ValueError:
            continue
        try:
            memory_gib = float(memory) / 1024  # MiB
        except ValueError:  # "[N/A]" on Jetson (shared memory)
            memory_gib = 0.0
        return LocalGpu(name, (major, minor), memory_gib)
    return None


def _gpu_from_cuda_python() -> LocalGpu | None:
    """cuda-python's runtime bindings (cuda.bindings.runtime; cuda.cudart before 12.6)."""
    try:
        from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[import-not-found,no-redef]
        except ImportError:
            return None
    try:
        err, props = cudart.cudaGetDeviceProperties(0)
    except Exception:  # no driver or no device: cuda-python raises or returns an error code
        return None
    if int(err) != 0:
        return None
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return LocalGpu(name.strip("\x00"), (props.major, props.minor), props.totalGlobalMem / GiB)


def gpu_from_device_tree(model_file: Path = JETSON_MODEL_FILE) -> LocalGpu | None:
    """Jetsons name their module in the device tree even where nvidia-smi is missing."""
    try:
        model = model_file.read_bytes().decode(errors="replace").strip("\x00").strip()
    except OSError:
        return None
    lowered = model.lower()
    if "jetson" not in lowered:
        return None
    for family, cc in JETSON_MODULES:
        if family in lowered:
            return LocalGpu(model, cc, total_memory_gib())
    return None


def total_memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    except (ValueError, OSError, AttributeError):
        return 0.0
