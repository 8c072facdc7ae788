"""The backend template: a graph's declared interface and a runner base class that does the
bookkeeping (loading, input validation, timing) so a backend writes only the `*_impl` methods.

`GraphSpec` is a manifest graph entry (`runtime.manifest.GraphSpec`, whose `TensorSpec`s it reuses)
resolved for loading: a name and a real path. `GraphRunner` follows Polygraphy's
runner template: `activate()` loads, `infer(feeds)` validates the feeds against the spec, times the
call and delegates to `_infer_impl`, `deactivate()` releases. Runners are context managers.
"""

from __future__ import annotations

import ctypes
import functools
import math
import operator
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import numpy as np

from nvlm_export.errors import BundleError, InputError
from nvlm_export.runtime.manifest import Dim, EngineRecord, TensorSpec
from nvlm_export.runtime.manifest import GraphSpec as ManifestGraph


@dataclass(frozen=True)
class GraphSpec:
    """A graph ready to load: its name, resolved file path and declared inputs and outputs."""

    name: str
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    engine: EngineRecord | None = None  # the graph's TensorRT engine, when the bundle has one
    precision: str | None = None  # the manifest's; None: not declared (may hold anything)
    kv_in_place: bool = False  # the file is a variant that writes its keys/values in place
    _inputs_by_name: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "_inputs_by_name", {t.name: t for t in self.inputs})

    @classmethod
    def from_manifest(
        cls,
        name: str,
        graph: ManifestGraph,
        bundle_dir: Path,
        *,
        backend: str | None = None,
        engine: EngineRecord | None = None,
    ) -> GraphSpec:
        """The manifest's entry for graph `name`, with its file resolved inside the bundle: the
        variant declared for `backend` if there is one (None: always the standard graph), and
        its TensorRT engine record if it has one."""
        path = Path(bundle_dir) / graph.file_for(backend)
        variant = graph.variant_for(backend)
        in_place = variant is not None and variant.kv_in_place
        return cls(name, path, graph.inputs, graph.outputs, engine, graph.precision, in_place)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def output(self, name: str) -> TensorSpec:
        for tensor in self.outputs:
            if tensor.name == name:
                return tensor
        raise InputError(
            f"Graph '{self.name}' has no output '{name}'",
            why=f"its outputs are {list(self.output_names)}",
        )

    def has_input(self, name: str) -> bool:
        return name in self._inputs_by_name

    def existing_path(self) -> Path:
        """The graph file, or a BundleError when it is missing."""
        if not self.path.is_file():
            raise BundleError(
                f"The {self.name} graph file {self.path} does not exist",
                fix="Check the bundle directory or re-export it",
            )
        return self.path


class CallTimings:
    """Count, total, fastest and slowest of a runner's graph calls: constant memory however long
    the host process runs (a list of every call's time grew by one entry per call forever)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # concurrent requests share runners
        self.reset()

    def reset(self) -> None:
        self.calls, self.total_seconds = 0, 0.0
        self.min_seconds, self.max_seconds = math.inf, 0.0

    def add(self, seconds: float) -> None:
        with self._lock:
            self.calls += 1
            self.total_seconds += seconds
            self.min_seconds = min(self.min_seconds, seconds)
            self.max_seconds = max(self.max_seconds, seconds)

    @property
    def mean_seconds(self) -> float:
        return self.total_seconds / self.calls if self.calls else 0.0


class GraphRunner(ABC):
    """Template for running one graph: the base owns the life cycle, validation and timing.

    Subclasses implement `_activate_impl` (load; check the real graph against `spec`),
    `_infer_impl(feeds) -> {output name: array}` and optionally `_deactivate_impl`; one that can
    write outputs into the caller's arrays sets `writes_in_place` and implements
    `_infer_into_impl(feeds, outputs_into)`.
    """

    backend_name: str = "base"
    # Whether `infer(..., outputs_into=...)` can write outputs into arrays the caller owns.
    writes_in_place: bool = False

    def __init__(self, spec: GraphSpec, *, validate_inputs: bool = True) -> None:
        self.spec = spec
        self.validate_inputs = validate_inputs
        self.timings = CallTimings()
        self.is_active = False
        # numpy dtypes resolved once: `array.dtype.name` is slow Python code on the hot path.
        self._input_dtypes = [_numpy_dtype(t.dtype) for t in spec.inputs]
        self._input_checks = [
            _FastCheck.of(t, d) for t, d in zip(spec.inputs, self._input_dtypes, strict=True)
        ]
        self._input_names = frozenset(spec.input_names)
        self._output_dtypes = {t.name: _numpy_dtype(t.dtype) for t in spec.outputs}

    # -- life cycle -------------------------------------------------------------------------
    def activate(self) -> GraphRunner:
        if not self.is_active:
            self._activate_impl()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate_impl()
            self.is_active = False
            return_freed_memory()

    def __enter__(self) -> GraphRunner:
        return self.activate()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.deactivate()

    @property
    def keeps_kv_in_place(self) -> bool:
        """Whether this runner's graph writes each step's keys/values into the past buffers it
        is given (`GraphSpec.kv_in_place`) and this backend can bind them as its outputs."""
        return self.writes_in_place and self.spec.kv_in_place

    # -- inference --------------------------------------------------------------------------
    def infer(
        self,
        feeds: Mapping[str, np.ndarray],
        *,
        outputs_into: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run the graph once; returns every declared output by name.

        `outputs_into` maps outputs to arrays the graph writes them into (C-contiguous, of the
        output's dtype and full shape), returned as they are: on a backend that `writes_in_place`,
        the decoder's presents bound to its past buffers (docs/decoder-graph.md).
        """
        if not self.is_active:
            self.activate()
        if self.validate_inputs:
            self.check_feeds(feeds)
        start = time.perf_counter()
        if outputs_into is None:
            outputs = self._infer_impl(feeds)
        else:
            self._check_outputs_into(outputs_into)
            outputs = self._infer_into_impl(feeds, outputs_into)
        self.timings.add(time.perf_counter() - start)
        return outputs

    __call__ = infer

    def _check_outputs_into(self, outputs_into: Mapping[str, np.ndarray]) -> None:
        if not self.writes_in_place:
            raise InputError(
                f"The {self.backend_name} backend cannot write graph outputs into given arrays",
                fix="Call infer without outputs_into (the graph returns new arrays)",
            )
        for name, array in outputs_into.items():
            if name not in self._output_dtypes:
                self.spec.output(name)  # raises, naming the outputs there are
            if not (
                isinstance(array, np.ndarray)
                and array.flags.c_contiguous
                and array.flags.writeable
                and array.dtype == self._output_dtypes[name]
            ):
                raise InputError(
                    f"The array given for output '{name}' of graph '{self.spec.name}' cannot "
                    "receive it",
                    why="it must be a writeable C-contiguous numpy array of "
                    + self.spec.output(name).dtype,
                )

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Names, dtypes, ranks and fixed dimensions of `feeds` against the spec.

        Runs once per decode step, so the common case (everything right) is a few C-level
        comparisons per input; only a failing feed goes through the explaining checks.
        """
        if feeds.keys() == self._input_names and all(
            check.passes(feeds[check.name]) for check in self._input_checks
        ):
            return
        self._explain_bad_feeds(feeds)

    def _explain_bad_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        expected = self.spec.input_names
        if len(feeds) != len(expected) or any(name not in feeds for name in expected):
            missing = [n for n in expected if n not in feeds]
            unexpected = [n for n in feeds if not self.spec.has_input(n)]
            raise InputError(
                f"Graph '{self.spec.name}' got the wrong set of inputs",
                why=", ".join(
                    part
                    for part in (
                        f"missing {missing}" if missing else "",
                        f"unexpected {unexpected}" if unexpected else "",
                    )
                    if part
                ),
                fix=f"Feed exactly {list(expected)}",
            )
        for tensor, dtype in zip(self.spec.inputs, self._input_dtypes, strict=True):
            _check_array(self.spec.name, tensor, dtype, feeds[tensor.name])

    # -- profiling --------------------------------------------------------------------------
    @property
    def calls(self) -> int:
        return self.timings.calls

    @property
    def total_seconds(self) -> float:
        return self.timings.total_seconds

    def reset_timings(self) -> None:
        self.timings.reset()

    # -- backend hooks ----------------------------------------------------------------------
    @abstractmethod
    def _activate_impl(self) -> None: ...

    @abstractmethod
    def _infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def _infer_into_impl(
        self, feeds: Mapping[str, np.ndarray], outputs_into: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        raise NotImplementedError  # only backends that set `writes_in_place`

    def _deactivate_impl(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        pass


def return_freed_memory() -> None:
    """Hand the heap pages that are free back to the OS (glibc; a no-op on other C libraries).

    glibc keeps freed memory in its heap for reuse, so a closed session's working memory stays
    resident: 1.2 GiB after the bench fp16 vision graph, which then counts again under the next
    graph a process loads (export validation and the accuracy check load one graph at a time; an
    application may swap bundles). Called whenever a runner is deactivated; it takes milliseconds.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _numpy_dtype(name: str) -> np.dtype | None:
    """The numpy dtype called `name`; None for types numpy lacks (bfloat16), left unchecked."""
    try:
        return np.dtype(name)
    except TypeError:
        return None


@dataclass(frozen=True)
class _FastCheck:
    """One input's dtype, rank and fixed sizes, precomputed for a quick yes/no on the hot path."""

    name: str
    dtype: np.dtype | None
    rank: int
    fixed_axes: Callable[[tuple[int, ...]], Any] | None  # shape -> the sizes on fixed axes
    fixed_sizes: Any

    @classmethod
    def of(cls, tensor: TensorSpec, dtype: np.dtype | None) -> _FastCheck:
        fixed = [(axis, d) for axis, d in enumerate(tensor.shape) if isinstance(d, int) and d >= 0]
        axes, sizes = [a for a, _ in fixed], tuple(d for _, d in fixed)
        # itemgetter of one index returns the item, of several a tuple: match that shape.
        getter = operator.itemgetter(*axes) if axes else None
        return cls(
            tensor.name, dtype, len(tensor.shape), getter, sizes[0] if len(sizes) == 1 else sizes
        )

    def passes(self, array: Any) -> bool:
        return (
            isinstance(array, np.ndarray)
            and (self.dtype is None or array.dtype == self.dtype)
            and array.ndim == self.rank
            and (self.fixed_axes is None or self.fixed_axes(array.shape) == self.fixed_sizes)
        )


def _check_array(graph: str, tensor: TensorSpec, dtype: np.dtype | None, array: np.ndarray) -> None:
    if not isinstance(array, np.ndarray):
        raise InputError(
            f"Input '{tensor.name}' of graph '{graph}' is a {type(array).__name__}",
            fix="Pass a numpy array",
        )
    if dtype is not None and array.dtype != dtype:
        raise InputError(
            f"Input '{tensor.name}' of graph '{graph}' has dtype {array.dtype.name}",
            why=f"the graph expects {tensor.dtype}",
            fix=f"Convert it with .astype(np.{tensor.dtype})",
        )
    if array.ndim != len(tensor.shape):
        raise InputError(
            f"Input '{tensor.name}' of graph '{graph}' has rank {array.ndim} "
            f"(shape {tuple(array.shape)})",
            why=f"the graph expects rank {len(tensor.shape)}, shape {_shape_text(tensor.shape)}",
        )
    for axis, (size, dim) in enumerate(zip(array.shape, tensor.shape, strict=True)):
        if isinstance(dim, int) and dim >= 0 and size != dim:
            raise InputError(
                f"Input '{tensor.name}' of graph '{graph}' has size {size} on axis {axis}",
                why=f"the graph expects shape {_shape_text(tensor.shape)}",
            )


def _shape_text(shape: tuple[Dim, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


class Backend(Protocol):
    """What `get_backend` returns: a runner factory, normally the runner class itself."""

    def __call__(self, spec: GraphSpec, **options: Any) -> GraphRunner: ...
