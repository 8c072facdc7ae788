"""Graph runners by backend name. Backends import lazily, so asking for one loads only it.

    runner = get_backend("onnxruntime")(spec, intra_op_threads=2)
    with runner:
        outputs = runner.infer(feeds)

Adding TensorRT later is one more `GraphRunner` subclass and one `register_backend` line.

A pipeline may run each graph on another backend (`BackendChoice`): "vision=openvino" runs the
vision graph on OpenVINO and the others on ONNX Runtime; each runner gets the options it takes.
"auto" picks per graph by `AUTO_RULES` (the measured fastest where its library is installed).

Besides the graphs, a choice may name the decoder's prompt phase, "prefill": "prefill=openvino"
runs the decoder graph's prompt calls on OpenVINO and its one-token steps on the decoder's backend
(two runners of one graph, so its weights are resident twice). Unnamed, prefill goes wherever the
decoder goes.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from nvlm_export.errors import InputError, MissingExtraError, check_choice
from nvlm_export.runtime.backends.base import Backend, GraphRunner, GraphSpec, TensorSpec
from nvlm_export.runtime.manifest import DECODER_GRAPH, GRAPH_NAMES

__all__ = [
    "AUTO",
    "PREFILL",
    "Backend",
    "BackendChoice",
    "BackendEntry",
    "GraphRunner",
    "GraphSpec",
    "TensorSpec",
    "accepted_options",
    "available_backends",
    "backend_installed",
    "cpu_flags",
    "get_backend",
    "register_backend",
]


@dataclass(frozen=True)
class BackendEntry:
    """Where a backend's runner class lives, the library it needs and the install extra that
    provides that library."""

    name: str
    module: str
    runner_class: str
    extra: str | None = None
    library: str | None = None  # None: a core dependency, always installed


def backend_installed(name: str) -> bool:
    """Whether `name`'s library can be imported here (without importing it)."""
    library = _REGISTRY[name].library
    return library is None or importlib.util.find_spec(library) is not None


_REGISTRY: dict[str, BackendEntry] = {}


def register_backend(entry: BackendEntry) -> None:
    _REGISTRY[entry.name] = entry


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def get_backend(name: str) -> Backend:
    """The runner class registered as `name`, imported on first use."""
    check_choice(name, available_backends(), "backend")
    entry = _REGISTRY[name]
    try:
        module = importlib.import_module(entry.module)
    except ImportError as error:
        extra = f"[{entry.extra}]" if entry.extra else ""
        fix = f"Install it with: pip install 'nvlm-export{extra}'"
        raise MissingExtraError(
            f"The '{name}' backend cannot be loaded", why=str(error), fix=fix
        ) from None
    runner: type[GraphRunner] = getattr(module, entry.runner_class)
    return runner


def accepted_options(backend: str, options: Mapping[str, object]) -> dict[str, object]:
    """The `options` that `backend`'s runner takes as keywords."""
    parameters = inspect.signature(get_backend(backend)).parameters
    return {keyword: value for keyword, value in options.items() if keyword in parameters}


DEFAULT_BACKEND = "onnxruntime"
AUTO = "auto"
SPEC_EXAMPLE = "onnxruntime,vision=openvino"
# The decoder's prompt calls (every call of more than one token), named like a graph in a choice.
PREFILL = "prefill"


@dataclass(frozen=True)
class AutoRule:
    """Where "auto" leaves ONNX Runtime: a `graph` of one of `precisions` runs on `backend` when
    its library is installed and the CPU has one of `cpu_flags` (as /proc/cpuinfo names them)."""

    graph: str
    precisions: tuple[str, ...]
    backend: str
    cpu_flags: tuple[str, ...]

    def applies(self, graph: str, precision: str) -> bool:
        return (
            graph == self.graph
            and precision in self.precisions
            and backend_installed(self.backend)
            and not cpu_flags().isdisjoint(self.cpu_flags)
        )


# Measured on a Xeon with AMX, bench INT8 bundle (docs/performance.md, "A second CPU backend"):
# OpenVINO runs the INT8 vision graph's GEMMs as int8 and the rest in bfloat16, 0.45x ONNX
# Runtime's time per tile, with the demo model's answers unchanged. Float vision graphs stay on
# ONNX Runtime: OpenVINO would run them in bfloat16, which an fp32 bundle does not promise.
# An INT4 decoder's prompt calls on OpenVINO too: ONNX Runtime's MatMulNBits does not use the
# matrix units at prefill sizes, and OpenVINO prefilled the bench INT4 bundle's 7-tile prompt (2005
# tokens) in 0.41x the time, the token steps staying on ONNX Runtime, which decodes twice as fast.
# The decoder's weights are then resident twice (peak 1.40 -> 2.31 GiB). An INT8 decoder stays:
# 0.61x the prefill time there would cost 1.53 -> 2.89 GiB ("prefill=openvino" opts in).
AUTO_RULES = (
    AutoRule("vision", ("int8",), "openvino", ("amx_int8", "avx512_bf16")),
    AutoRule(PREFILL, ("int4",), "openvino", ("amx_int8", "avx512_bf16")),
)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux x86: /proc/cpuinfo's "flags"); empty where unknown."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    flags = (line.split(":", 1)[1] for line in lines if line.startswith("flags"))
    return frozenset(next(flags, "").split())


def auto_backend(graph: str, precision: str) -> str:
    """The backend "auto" picks for `graph` of `precision` on this machine."""
    rule = next((rule for rule in AUTO_RULES if rule.applies(graph, precision)), None)
    return rule.backend if rule else DEFAULT_BACKEND


@dataclass(frozen=True)
class BackendChoice:
    """The backend of each graph: `default` for every graph `per_graph` does not name.

    Written as text (`parse`, `str`): a backend name ("openvino"), graph=backend pairs with the
    others on ONNX Runtime ("vision=openvino"), or both ("onnxruntime,vision=openvino"). "auto"
    stands for a backend chosen per graph when the bundle is loaded (`resolve`).
    """

    default: str = DEFAULT_BACKEND
    per_graph: tuple[tuple[str, str], ...] = ()  # (graph, backend), sorted by graph

    @classmethod
    def of(cls, choice: str | Mapping[str, str] | BackendChoice) -> BackendChoice:
        """A choice from its text, from {graph: backend} (others on ONNX Runtime) or itself."""
        if isinstance(choice, BackendChoice):
            return choice
        if isinstance(choice, str):
            return cls.parse(choice)
        return cls.build(DEFAULT_BACKEND, dict(choice), shown=str(dict(choice)))

    @classmethod
    def parse(cls, text: str) -> BackendChoice:
        default: str | None = None
        per_graph: dict[str, str] = {}
        for item in (part.strip() for part in text.split(",")):
            graph, equals, backend = (s.strip() for s in item.partition("="))
            if not item or (equals and not (graph and backend)) or (not equals and default):
                raise InputError(
                    f"Backend choice '{text}' is not a backend or graph=backend pairs",
                    fix=f"Write a backend name, graph=backend pairs or both, e.g. {SPEC_EXAMPLE}",
                )
            if not equals:
                default = graph
            elif graph in per_graph:
                raise InputError(
                    f"Backend choice '{text}' names the {graph} graph twice",
                    fix=f"Name each graph once, e.g. {SPEC_EXAMPLE}",
                )
            else:
                per_graph[graph] = backend
        return cls.build(default or DEFAULT_BACKEND, per_graph, shown=text)

    @classmethod
    def build(cls, default: str, per_graph: Mapping[str, str], *, shown: str) -> BackendChoice:
        """A choice whose graph and backend names are checked: one line naming the valid ones."""
        names = [AUTO, *available_backends()]
        check_choice(default, names, "backend")
        for graph, backend in per_graph.items():
            if graph not in (*GRAPH_NAMES, PREFILL):
                raise InputError(
                    f"Unknown graph '{graph}' in backend choice '{shown}'",
                    fix=f"Choose graphs from: {', '.join(GRAPH_NAMES)}, or {PREFILL} (the "
                    "decoder's prompt calls)",
                )
            check_choice(backend, names, "backend")
        return cls(default, tuple(sorted(per_graph.items())))

    def resolve(self, precisions: Mapping[str, str]) -> BackendChoice:
        """This choice with "auto" replaced, for graphs of `precisions` ({graph: precision}; the
        decoder's prefill is resolved with the decoder)."""
        if DECODER_GRAPH in precisions:
            precisions = {**precisions, PREFILL: precisions[DECODER_GRAPH]}
        chosen = {}
        for graph, precision in precisions.items():
            backend = self.for_graph(graph)
            chosen[graph] = auto_backend(graph, precision) if backend == AUTO else backend
        default = DEFAULT_BACKEND if self.default == AUTO else self.default
        return BackendChoice._describing(default, chosen)

    @classmethod
    def of_runners(cls, backends: Mapping[str, str]) -> BackendChoice:
        """The choice that describes graphs already loaded ({graph: backend name}, with a
        "prefill" entry where the decoder's prompt calls have a runner of their own): the backend
        of most graphs as the default, ONNX Runtime on a tie."""
        if not backends:
            return cls()
        counts = Counter(b for g, b in backends.items() if g != PREFILL)
        default = max(counts, key=lambda name: (counts[name], name == DEFAULT_BACKEND))
        return cls._describing(default, backends)

    @classmethod
    def _describing(cls, default: str, backends: Mapping[str, str]) -> BackendChoice:
        """`default` plus the graphs of `backends` that run elsewhere; "prefill" is named only
        where it leaves the decoder's backend (unnamed, it follows the decoder)."""
        named = {g: b for g, b in backends.items() if b != default and g != PREFILL}
        prefill = backends.get(PREFILL)
        if prefill is not None and prefill != backends.get(DECODER_GRAPH, default):
            named[PREFILL] = prefill
        return cls(default, tuple(sorted(named.items())))

    def for_graph(self, graph: str) -> str:
        """The backend of `graph` ("prefill": of the decoder's prompt calls)."""
        per_graph = dict(self.per_graph)
        if graph == PREFILL and PREFILL not in per_graph:
            return self.for_graph(DECODER_GRAPH)
        return per_graph.get(graph, self.default)

    @property
    def prefill_apart(self) -> bool:
        """Whether the decoder's prompt calls run on another backend than its one-token steps."""
        return self.for_graph(PREFILL) != self.for_graph(DECODER_GRAPH)

    def backends(self, graphs: Collection[str] | None = None) -> list[str]:
        """The backends that run `graphs` (default: every backend the choice names)."""
        names = (
            [self.default, *(b for _, b in self.per_graph)]
            if graphs is None
            else [self.for_graph(graph) for graph in graphs]
        )
        # Before `resolve`, "auto" counts as ONNX Runtime: it keeps the decoder there at least.
        return list(dict.fromkeys(DEFAULT_BACKEND if name == AUTO else name for name in names))

    def check_graphs(self, graphs: Collection[str]) -> None:
        """Refuse a choice that names a graph the bundle does not have."""
        for graph, _ in self.per_graph:
            if (DECODER_GRAPH if graph == PREFILL else graph) not in graphs:
                raise InputError(
                    f"Backend choice '{self}' names the {graph} graph, which this bundle has not",
                    fix=f"Name only its graphs: {', '.join(graphs)}",
                )

    def check_options(
        self,
        options: Mapping[str, object],
        graphs: Collection[str] | None = None,
        shown: Mapping[str, str] | None = None,
    ) -> None:
        """Refuse an option that no runner of `graphs` takes; `shown` names options the way the
        user wrote them (e.g. {"intra_op_threads": "--threads"})."""
        if not options:
            return
        backends = self.backends(graphs)
        taken = {keyword for b in backends for keyword in accepted_options(b, options)}
        for keyword in options:
            if keyword not in taken:
                plural = "s" if len(backends) > 1 else ""
                raise InputError(
                    f"{(shown or {}).get(keyword, keyword)} does not apply to the "
                    f"{' or '.join(repr(b) for b in backends)} backend{plural}",
                    why="its runner sets that itself" if len(backends) == 1 else None,
                    fix=f"Leave {(shown or {}).get(keyword, keyword)} out",
                )

    def __str__(self) -> str:
        pairs = [f"{graph}={backend}" for graph, backend in self.per_graph]
        return ",".join([self.default, *pairs]) if pairs else self.default


register_backend(
    BackendEntry("onnxruntime", "nvlm_export.runtime.backends.onnxruntime", "OnnxRuntimeRunner")
)
register_backend(
    BackendEntry(
        "tensorrt",
        "nvlm_export.runtime.backends.tensorrt",
        "TensorRTRunner",
        extra="tensorrt",
        library="tensorrt",
    )
)
register_backend(
    BackendEntry(
        "openvino",
        "nvlm_export.runtime.backends.openvino",
        "OpenVinoRunner",
        extra="openvino",
        library="openvino",
    )
)
