"""Command modules of the CLI. Each exposes plain functions with Typer annotations.

Heavy dependencies (torch, transformers, onnx) are imported inside the command bodies, so `--help`
and the runtime-side commands work on a runtime-only install.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nvlm_export.commands import (
    chat,
    demo,
    engine,
    export,
    handoff,
    make_tiny,
    profile,
    quantize,
    run,
    tile,
)

RUNTIME = "Run"
EXPORT = "Export"
TOOLS = "Tools"

# (command name, function, help panel) in the order `--help` lists them.
COMMANDS: list[tuple[str, Callable[..., Any], str]] = [
    ("tile", tile.tile, RUNTIME),
    ("run", run.run, RUNTIME),
    ("chat", chat.chat, RUNTIME),
    ("export", export.export, EXPORT),
    ("verify", export.verify, EXPORT),
    ("build", quantize.build, EXPORT),
    ("calibrate", quantize.calibrate, EXPORT),
    ("quantize", quantize.quantize, EXPORT),
    ("engine", engine.engine, EXPORT),
    ("handoff", handoff.handoff, EXPORT),
    ("profile", profile.profile, TOOLS),
    ("lint", engine.lint, TOOLS),
    ("make-tiny", make_tiny.make_tiny, TOOLS),
    ("demo-eval", demo.evaluate_demo, TOOLS),
]
