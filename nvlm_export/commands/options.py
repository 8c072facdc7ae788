"""Command-line options that several commands take, each declared once: flags, help and panel.

Typer reads a command's options from its signature, so every command still lists the parameter;
its declaration lives here (the generate options live in commands/generation.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

Settings = TypeVar("Settings")

RUNTIME = "Runtime"
ENGINE = "Language engine"


def settings_from(cls: type[Settings], arguments: Mapping[str, Any], **given: Any) -> Settings:
    """The settings dataclass `cls` from a command's arguments (its `locals()`), plus `given`.

    A command's parameters take the names of the settings fields they set, so each setting is
    named once, in the signature; fields no argument names keep their defaults.
    """
    names = {field.name for field in dataclasses.fields(cls)} - given.keys()  # type: ignore[arg-type]
    return cls(**{name: arguments[name] for name in names if name in arguments}, **given)


def lowercase(value: str | None) -> str | None:
    """A choice written as the docs write it (INT8, FP16) means the same as its lowercase name."""
    return value.lower() if isinstance(value, str) else value


def in_panel(panel: str) -> Callable[..., Any]:
    """`typer.Option` for the options of one --help panel, so a group names its panel once."""
    return functools.partial(typer.Option, rich_help_panel=panel)


BundleDir = Annotated[
    Path, typer.Argument(help="Bundle directory written by `nvlm-export export`.")
]
BundleOutput = Annotated[Path, typer.Option("--output", "-o", help="Bundle directory to write.")]
TileBudget = Annotated[
    int | None, typer.Option(help="Tile budget per image (fewer tiles: faster, less detail).")
]
SystemMessage = Annotated[
    str | None, typer.Option(help="Replace the chat template's default system message.")
]
Backend = Annotated[
    str,
    in_panel(RUNTIME)(
        help="Inference backend: auto (ONNX Runtime, with an INT8 vision graph and the prompt "
        "of an INT4 decoder on OpenVINO where the openvino extra is installed and the CPU "
        "has AMX or AVX-512 BF16: about half the time per tile and per prompt token, the INT4 "
        "decoder's weights held twice); onnxruntime; tensorrt (engines built on the target, the "
        "tensorrt extra); openvino (OpenVINO's CPU plugin, the openvino extra). Or one per "
        "graph: vision=openvino runs the vision graph on OpenVINO and the others on onnxruntime; "
        "openvino,decoder=onnxruntime names the others' backend first; prefill=openvino runs "
        "the decoder's prompt on OpenVINO and its token steps on the decoder's backend.",
    ),
]
Threads = Annotated[
    int | None,
    in_panel(RUNTIME)(min=1, help="CPU threads for ONNX Runtime (default: all cores)."),
]
Spin = Annotated[
    bool,
    in_panel(RUNTIME)(
        help="ONNX Runtime's worker threads spin between ops (fastest on cores of your own); "
        "--no-spin on a machine shared with other jobs, or to save power."
    ),
]
LlmEngine = Annotated[
    str,
    in_panel(ENGINE)(
        help="bundle: the bundle's decoder graph. vllm: the decoder handed off with "
        "`nvlm-export handoff`, served by vLLM (needs the vllm extra)."
    ),
]
TensorParallelSize = Annotated[
    int | None,
    in_panel(ENGINE)(
        "--tensor-parallel-size",
        "--tp",
        help="vLLM: devices to split the decoder across (default: the manifest's).",
    ),
]


RUNNER_FLAGS = {"intra_op_threads": "--threads", "allow_spinning": "--no-spin"}


def runner_options(backend: str, threads: int | None, spin: bool) -> dict[str, Any]:
    """--threads and --no-spin as runner keywords, given only when set, so each runner keeps
    its own defaults; each reaches the runners whose backend has that knob. A bad --backend, or
    a flag that no chosen backend's runner has, is refused in one line."""
    from nvlm_export.runtime.backends import BackendChoice

    given: dict[str, Any] = {} if threads is None else {"intra_op_threads": threads}
    if not spin:
        given["allow_spinning"] = False
    BackendChoice.parse(backend).check_options(given, shown=RUNNER_FLAGS)
    return given
