"""Graph runners by backend name. Backends import lazily, so asking for one loads only it.

    runner = get_backend("onnxruntime")(spec, intra_op_threads=2)
    with runner:
        outputs = runner.infer(feeds)

Adding TensorRT later is one more `GraphRunner` subclass and one `register_backend` line.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from nvlm_export.errors import MissingExtraError, check_choice
from nvlm_export.runtime.backends.base import Backend, GraphRunner, GraphSpec, TensorSpec

__all__ = [
    "Backend",
    "BackendEntry",
    "GraphRunner",
    "GraphSpec",
    "TensorSpec",
    "available_backends",
    "get_backend",
    "register_backend",
]


@dataclass(frozen=True)
class BackendEntry:
    """Where a backend's runner class lives and which install extra provides its library."""

    name: str
    module: str
    runner_class: str
    extra: str | None = None


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


register_backend(
    BackendEntry("onnxruntime", "nvlm_export.runtime.backends.onnxruntime", "OnnxRuntimeRunner")
)
register_backend(
    BackendEntry(
        "tensorrt", "nvlm_export.runtime.backends.tensorrt", "TensorRTRunner", extra="tensorrt"
    )
)
register_backend(
    BackendEntry(
        "openvino", "nvlm_export.runtime.backends.openvino", "OpenVinoRunner", extra="openvino"
    )
)
