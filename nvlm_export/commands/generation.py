"""The generate options as command-line options, declared once for `run` and `chat`.

Typer reads options from a command's signature, so each command lists these parameters; their
flags, help and panel live here, and `generate_options` turns them into the one
`GenerateOptions` (nvlm_export/runtime/generation.py) that validates them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from nvlm_export.runtime.generation import GenerateOptions

SAMPLING = "Sampling"

MaxNewTokens = Annotated[
    int,
    typer.Option("--max-new-tokens", "-n", help="Longest answer, in tokens (it may end sooner)."),
]
Temperature = Annotated[
    float, typer.Option(help="0 = greedy; > 0 samples.", rich_help_panel=SAMPLING)
]
TopK = Annotated[
    int, typer.Option(help="Sample among the k likeliest (0 = all).", rich_help_panel=SAMPLING)
]
TopP = Annotated[float, typer.Option(help="Nucleus sampling mass.", rich_help_panel=SAMPLING)]
Seed = Annotated[
    int | None,
    typer.Option(min=0, help="Seed for reproducible sampling.", rich_help_panel=SAMPLING),
]
Stop = Annotated[list[str] | None, typer.Option(help="Stop when this text appears; repeatable.")]


def generate_options(
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    stop: list[str] | None,
) -> GenerateOptions:
    """The command's generate options, validated (an invalid one is refused before any work)."""
    from nvlm_export.runtime.generation import GenerateOptions

    return GenerateOptions(max_new_tokens, temperature, top_k, top_p, seed, tuple(stop or ()))
