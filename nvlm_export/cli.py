"""The `nvlm-export` command line.

Each command lives in its own module under `nvlm_export/commands/` and is registered here through
`_guarded`, the one place where project errors become a one-line message and an exit code.
Results go to stdout (tables or `--json`), diagnostics to stderr.
"""

from __future__ import annotations

import functools
import logging
import sys
import traceback
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from nvlm_export import __version__
from nvlm_export.commands.helptext import reflowed
from nvlm_export.errors import NvlmError

app = typer.Typer(
    name="nvlm-export",
    help="Export, quantize, build and run NVLM / InternVL vision-language models for edge GPUs.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

stderr = Console(stderr=True)
_state = {"verbose": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nvlm-export {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show tracebacks and debug detail on errors.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Export NVLM models to ONNX, quantize them, build TensorRT engines and run them.

    Start with [bold]nvlm-export tile IMAGE[/bold] to see how an image is split into tiles.
    """
    _state["verbose"] = verbose
    if verbose:  # debug detail, ONNX Runtime's own log lines included
        logging.getLogger("nvlm_export").setLevel(logging.DEBUG)


def _guarded(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn project errors into one line on stderr and a non-zero exit (tracebacks with -v)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except NvlmError as error:
            if _state["verbose"]:
                traceback.print_exc()
            stderr.print(
                f"[bold red]error:[/] {escape(error.one_line())}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            stderr.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def _register() -> None:
    from nvlm_export.commands import COMMANDS, TOOLS
    from nvlm_export.commands.capi import make_capi_app

    for name, func, panel in COMMANDS:
        app.command(name, help=reflowed(func.__doc__), rich_help_panel=panel)(_guarded(func))
    app.add_typer(make_capi_app(_guarded), name="capi", rich_help_panel=TOOLS)


_register()


def main() -> None:
    try:
        app()
    except Exception as error:  # an unexpected bug: still one line unless --verbose
        if _state["verbose"] or "--verbose" in sys.argv or "-v" in sys.argv:
            raise
        stderr.print(
            f"[bold red]internal error:[/] {type(error).__name__}: {escape(str(error))}. "
            "Re-run with --verbose for the traceback and please report it.",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
