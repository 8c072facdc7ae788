"""`nvlm-export capi build`: compile the C API (libnvlm.so, nvlm.h, nvlm.pc) for this Python."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from nvlm_export.commands.helptext import reflowed


def capi_build(
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Directory for lib/, include/ and lib/pkgconfig/."),
    ] = Path("dist/capi"),
    show_compiler_output: Annotated[
        bool, typer.Option("--show-compiler-output", help="Print the compiler and linker output.")
    ] = False,
) -> None:
    """Build the C API: DIR/lib/libnvlm.so, DIR/include/nvlm.h and DIR/lib/pkgconfig/nvlm.pc.

    The library embeds this Python environment (it must stay installed) and needs no environment
    variables at run time. Compile a program against it with pkg-config:

      nvlm-export capi build -o dist/capi

      cc app.c $(PKG_CONFIG_PATH=dist/capi/lib/pkgconfig pkg-config --cflags --libs nvlm)
    """
    from nvlm_export.capi.build import build_library

    built = build_library(output, verbose=show_compiler_output)
    typer.echo(f"library     {built.library}")
    typer.echo(f"header      {built.header}")
    typer.echo(f"pkg-config  {built.pkgconfig}")
    typer.echo(
        f"compile with: cc app.c $(PKG_CONFIG_PATH={built.pkgconfig.parent} "
        "pkg-config --cflags --libs nvlm)"
    )


def _capi_group() -> None:
    """Use bundles from C and C++: build libnvlm.so and its header (see docs/capi.md)."""


def make_capi_app(
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]] = lambda command: command,
) -> typer.Typer:
    """The `capi` command group; `wrap` is applied to every command (the CLI passes its error
    guard, so project errors print as one line)."""
    app = typer.Typer(name="capi", no_args_is_help=True, rich_markup_mode="rich")
    app.callback()(_capi_group)  # a group even with one command: `capi build`, not `capi`
    app.command("build", help=reflowed(capi_build.__doc__))(wrap(capi_build))
    return app


capi_app = make_capi_app()
