"""ONNX Runtime runner: session set-up, load-time interface check, plain `run()`.

The session settings, and why (measurements: docs/performance.md "What was changed for speed",
docs/decoder-graph.md "What ONNX Runtime makes of it"):

- plain `run()`, no IOBinding: on CPU `run()` reads numpy inputs in place and returns its outputs
  without a copy. IOBinding only where outputs go into the caller's arrays (`outputs_into`): a
  decoder variant that writes its keys/values into the past buffers (`kv_in_place`), so no step
  copies the cache (docs/decoder-graph.md).
- ONNX Runtime's own log lines (fatal only unless debug logging is on, the CLI's `--verbose`): a
  failed run already reaches the user as one line of ours, and its load-time warnings are noise.
- the optimised graph is not saved beside the bundle unless `optimized_model_path` asks: loading is
  bound by reading and pre-packing weights, and the saved graph is machine-specific.
- intra-op workers spin (`allow_spinning=True`, ORT's default): the fastest decode on cores of
  your own; `allow_spinning=False` (`--no-spin`) where other jobs need the CPU, or to save power.
- no CPU memory arena (`memory_arena=False`): the arena would keep the load-time and peak
  activation buffers resident for the life of the process.
- no common-subexpression elimination: it merges the per-consumer Q/DQ pairs of INT8 graphs,
  which ORT's integer MatMul fusion then refuses (the exporter already shares what fp32 and INT4
  graphs could share).
- exact int8 GEMMs on x86 CPUs without VNNI or AMX (`session.x64quantprecision`): there ORT's
  fast u8·s8 kernels add pairs of products in saturating 16-bit lanes and can return wrong sums;
  its exact kernels cost some decode speed there (docs/quantization.md, "INT8 on x86 CPUs without
  VNNI"). CPUs with VNNI or AMX add int8 products in 32 bits and keep the fast kernels, and so do
  graphs without int8 Q/DQ GEMMs: the setting slowed an INT4 decoder (`MatMulNBits`, whose 4-bit
  weights cannot overflow a 16-bit pair sum) by 4-8 % there and changed nothing in fp32 graphs.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from nvlm_export.errors import BundleError, InputError, check_choice
from nvlm_export.runtime.backends import cpu_flags
from nvlm_export.runtime.backends.base import GraphRunner, GraphSpec, TensorSpec
from nvlm_export.runtime.manifest import Precision

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# CPU flags of int8 dot products that accumulate in 32 bits (no 16-bit saturation; docstring).
INT8_DOT_PRODUCT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
# Graph optimisers not run (see the module docstring): CSE undoes the per-consumer Q/DQ pairs that
# ORT's integer MatMul fusions need.
DISABLED_OPTIMIZERS = ("CommonSubexpressionElimination",)
# ONNX Runtime's own log lines (warnings at load; an error line before each failed run, which the
# runner turns into one InputError) only with debug logging on (the CLI's --verbose): by debug
# logging, ONNX Runtime's warning level (2), else fatal only (4).
ORT_LOG_SEVERITY = {True: 2, False: 4}
# ONNX Runtime's type strings ("tensor(float)") as numpy dtype names.
ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}
# ORT's pybind exceptions (Fail, InvalidProtobuf, NoSuchFile, ...) derive from Exception directly.
ORT_ERRORS: tuple[type[Exception], ...] = (
    *(
        value
        for value in vars(ort_state).values()
        if isinstance(value, type) and issubclass(value, Exception)
    ),
    RuntimeError,
)


class OnnxRuntimeRunner(GraphRunner):
    """Runs one ONNX graph (external-data files beside it are found automatically)."""

    backend_name = "onnxruntime"

    def __init__(
        self,
        spec: GraphSpec,
        *,
        providers: Sequence[str | tuple[str, dict[str, Any]]] = (CPU,),
        intra_op_threads: int | None = None,
        optimization_level: str = "all",
        optimized_model_path: Path | None = None,
        allow_spinning: bool = True,
        memory_arena: bool = False,
        disabled_optimizers: Sequence[str] = DISABLED_OPTIMIZERS,
        exact_int8: bool | None = None,
        validate_inputs: bool = True,
    ) -> None:
        super().__init__(spec, validate_inputs=validate_inputs)
        check_choice(optimization_level, OPTIMIZATION_LEVELS, "graph optimisation level")
        self.requested_providers = tuple(providers)
        self.intra_op_threads = intra_op_threads
        self.optimization_level = optimization_level
        self.optimized_model_path = optimized_model_path
        self.allow_spinning = allow_spinning
        self.memory_arena = memory_arena
        self.disabled_optimizers = tuple(disabled_optimizers)
        # None: exact where this graph's int8 GEMMs would saturate in the CPU's fast kernels.
        if exact_int8 is None:
            exact_int8 = needs_exact_int8() and spec.precision in (None, Precision.INT8)
        self.exact_int8 = exact_int8
        self.session: ort.InferenceSession | None = None
        self._bindings = _ThreadBindings()

    @property
    def providers(self) -> list[str]:
        """The providers the live session really uses, in priority order."""
        return self.session.get_providers() if self.session else []

    def _session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = OPTIMIZATION_LEVELS[self.optimization_level]
        if self.intra_op_threads is not None:
            options.intra_op_num_threads = self.intra_op_threads
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if self.allow_spinning else "0"
        )
        options.enable_cpu_mem_arena = self.memory_arena
        options.log_severity_level = ORT_LOG_SEVERITY[log.isEnabledFor(logging.DEBUG)]
        if self.exact_int8:
            options.add_session_config_entry("session.x64quantprecision", "1")
        if self.optimized_model_path is not None:
            # ORT writes the optimised graph here once; load it later with level "disable".
            options.optimized_model_filepath = str(self.optimized_model_path)
        return options

    def _activate_impl(self) -> None:
        path = self.spec.existing_path()
        try:
            self.session = ort.InferenceSession(
                str(path),
                sess_options=self._session_options(),
                providers=self._usable_providers(),
                disabled_optimizers=list(self.disabled_optimizers),
            )
        except ORT_ERRORS as error:
            raise BundleError(
                f"ONNX Runtime cannot load the {self.spec.name} graph {path}",
                why=_first_line(error),
                fix="The file is corrupt or incomplete; re-export or re-copy the bundle",
            ) from None
        self._check_interface()

    def _usable_providers(self) -> list[str | tuple[str, dict[str, Any]]]:
        """Requested providers this onnxruntime build has, CPU always last as the fallback."""
        available = set(ort.get_available_providers())
        usable = []
        for provider in self.requested_providers:
            name = provider if isinstance(provider, str) else provider[0]
            if name in available:
                usable.append(provider)
            else:
                log.warning("%s is not available in this onnxruntime build; skipping it", name)
        if not any((p if isinstance(p, str) else p[0]) == CPU for p in usable):
            usable.append(CPU)
        return usable

    def _check_interface(self) -> None:
        """The loaded graph must have exactly the inputs and outputs the manifest declares."""
        assert self.session is not None
        _check_tensors(self.spec, "input", self.spec.inputs, self.session.get_inputs())
        _check_tensors(self.spec, "output", self.spec.outputs, self.session.get_outputs())
        self._output_names = list(self.spec.output_names)

    def _infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.session is not None
        try:
            values = self.session.run(self._output_names, dict(feeds))
        except ORT_ERRORS as error:
            raise InputError(
                f"ONNX Runtime failed to run the {self.spec.name} graph",
                why=_first_line(error),
            ) from None
        return dict(zip(self._output_names, values, strict=True))

    @property
    def writes_in_place(self) -> bool:  # type: ignore[override]
        """Outputs bound to caller arrays are host memory: the CPU provider alone reads them."""
        return self.providers == [CPU]

    def _infer_into_impl(
        self, feeds: Mapping[str, np.ndarray], outputs_into: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        assert self.session is not None
        binding = self._bindings.binding_for(self.session)
        inputs = {name: np.ascontiguousarray(array) for name, array in feeds.items()}  # kept alive
        for name, array in inputs.items():
            binding.bind_input(name, array)
        for name in self._output_names:
            binding.bind_output(name, outputs_into.get(name))
        try:
            self.session.run_with_iobinding(binding.io)
        except ORT_ERRORS as error:
            raise InputError(
                f"ONNX Runtime failed to run the {self.spec.name} graph",
                why=_first_line(error),
            ) from None
        values = binding.io.get_outputs()
        return {
            name: outputs_into[name] if name in outputs_into else value.numpy()
            for name, value in zip(self._output_names, values, strict=True)
        }

    def _deactivate_impl(self) -> None:
        self.session = None
        self._bindings = _ThreadBindings()  # a binding holds its session: let both go


class _Binding:
    """One thread's IOBinding of a session, bound to host arrays by address. A decode step
    feeds the same cache buffers every time, so only what moved is bound again: binding every
    tensor of a 24-layer decoder costs 0.7 ms a step (bench INT4 decoder, 18 ms steps)."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.io = session.io_binding()
        # Weak: a finished request's cache buffers are freed, not kept alive by the binding.
        self._bound: dict[str, weakref.ref[np.ndarray]] = {}

    def bind_input(self, name: str, array: np.ndarray) -> None:
        if self._rebind(name, array):
            self.io.bind_input(name, *_host_memory(array))

    def bind_output(self, name: str, array: np.ndarray | None) -> None:
        """Into `array`, or (None) into memory ONNX Runtime allocates for this run."""
        if array is None:
            self._bound.pop(name, None)
            self.io.bind_output(name, "cpu")
        elif self._rebind(name, array):
            self.io.bind_output(name, *_host_memory(array))

    def _rebind(self, name: str, array: np.ndarray) -> bool:
        """Whether `name` must be bound to `array`: not if it is bound to this very array (a
        freed array's name is bound again, whatever took its address)."""
        bound = self._bound.get(name)
        if bound is not None and bound() is array:
            return False
        self._bound[name] = weakref.ref(array)
        return True


class _ThreadBindings(threading.local):
    """Each thread's `_Binding` of the live session (runners may be shared between threads);
    the runner replaces the whole object when it lets its session go."""

    binding: _Binding | None = None

    def binding_for(self, session: ort.InferenceSession) -> _Binding:
        if self.binding is None:
            self.binding = _Binding(session)
        return self.binding


def _host_memory(array: np.ndarray) -> tuple[Any, ...]:
    """IOBinding's description of host array `array`: device, id, type, shape, address."""
    return "cpu", 0, array.dtype.type, list(array.shape), array.ctypes.data


def _check_tensors(
    spec: GraphSpec, kind: str, declared: Sequence[TensorSpec], real: Sequence[Any]
) -> None:
    real_by_name = {node.name: node for node in real}
    for tensor in declared:
        node = real_by_name.get(tensor.name)
        if node is None:
            raise BundleError(
                f"The {spec.name} graph {spec.path} has no {kind} '{tensor.name}'",
                why=f"its {kind}s are {sorted(real_by_name)}",
                fix="The manifest and the graph disagree; re-export the bundle",
            )
        dtype = ORT_DTYPES.get(node.type, node.type)
        if dtype != tensor.dtype or len(node.shape) != len(tensor.shape):
            raise BundleError(
                f"The {spec.name} graph's {kind} '{tensor.name}' is {dtype} of rank "
                f"{len(node.shape)}",
                why=f"the manifest declares {tensor.dtype} of rank {len(tensor.shape)}",
                fix="The manifest and the graph disagree; re-export the bundle",
            )
    extra = sorted(set(real_by_name) - {t.name for t in declared})
    if extra and kind == "input":
        raise BundleError(
            f"The {spec.name} graph {spec.path} has undeclared inputs {extra}",
            fix="The manifest and the graph disagree; re-export the bundle",
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def needs_exact_int8() -> bool:
    """Whether ONNX Runtime's fast int8 GEMMs would saturate here: an x86 CPU with AVX2 but no
    int8 dot product that accumulates in 32 bits (VNNI, AMX)."""
    flags = cpu_flags()
    return "avx2" in flags and flags.isdisjoint(INT8_DOT_PRODUCT_FLAGS)
