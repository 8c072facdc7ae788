"""`nvlm-export make-tiny`: write a small random checkpoint in a real on-disk layout."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from nvlm_export.errors import require_export_extra
from nvlm_export.models.registry import LAYOUTS, SIZES
from nvlm_export.output import CHECKPOINT, staged_output

# The choices come from the architecture registry: a new family's layouts appear here by themselves.
Layout = enum.Enum("Layout", [(name, name) for name in LAYOUTS], type=str)  # type: ignore[misc]
Size = enum.Enum("Size", [(size, size) for size in SIZES], type=str)  # type: ignore[misc]
_LAYOUT_HELP = "; ".join(f"{spec.name}: {spec.description}" for spec in LAYOUTS.values())


def make_tiny(
    layout: Annotated[
        Layout,
        typer.Option(
            "--layout",
            help=f"On-disk layout. {_LAYOUT_HELP}.",
            case_sensitive=False,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Directory to create.", file_okay=False),
    ],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random weights.")] = 0,
    size: Annotated[
        Size,
        typer.Option(
            "--size",
            help="tiny: a few MB, fp32, for tests. tiny-engine: tiny with a decoder of head size "
            "32, the smallest vLLM's CPU backend serves (nvlm-d, internvl; hand-off tests). "
            "bench: InternVL2-1B-shaped (InternViT-300M + Qwen2-0.5B), bf16, 1.7 GB, for "
            "performance work. 3b: InternViT-300M + Qwen2.5-3B-shaped decoder, bf16, 6.8 GB, for "
            "memory scaling (bench and 3b: internvl layouts only).",
            case_sensitive=False,
        ),
    ] = Size["tiny"],
    layers: Annotated[
        int | None,
        typer.Option(
            "--layers",
            min=1,
            help="Decoder layers (default: the size's own). Changes depth at fixed width, e.g. "
            "to show how a stage's memory grows with depth.",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists and is not empty.")
    ] = False,
) -> None:
    """Write a random vision-language checkpoint at real geometry (448 tiles, 256 tokens/tile).

    The checkpoint has config.json, safetensors weights and a tiny byte-level BPE tokenizer, and
    loads like the real model it imitates. Weights are deterministic for a seed. The NVLM vision
    encoders keep the 7 padded "dummy" attention heads, with non-zero weights; NVLM-X/H get a
    gated cross-attention block after every decoder layer, with non-zero gates. Tensors are drawn
    and written one shard at a time, so even the 3b size needs only about 3 GB of memory.

    Examples:

        nvlm-export make-tiny --layout nvlm-d -o ckpt/tiny-nvlm-d

        nvlm-export make-tiny --layout internvl-hf -o ckpt/tiny-hf --seed 3

        nvlm-export make-tiny --layout nvlm-x -o ckpt/tiny-nvlm-x

        nvlm-export make-tiny --layout internvl --size bench -o ckpt/bench

        nvlm-export make-tiny --layout internvl --size 3b --layers 72 -o ckpt/3b-deep
    """
    require_export_extra()
    from nvlm_export.models.tiny import make_tiny_checkpoint, shape_for

    shape_for(size.value, layout.value)  # reject an unsupported size/layout pair before any work
    output = Path(output)
    with staged_output(output, CHECKPOINT, overwrite=overwrite) as staged:
        made = make_tiny_checkpoint(staged.path, layout.value, seed, size.value, layers)
        staged.publish()
    total = sum(f.stat().st_size for f in output.iterdir() if f.is_file())
    depth = made.config.llm_config["num_hidden_layers"]
    typer.echo(
        f"Wrote {size.value} {layout.value} checkpoint to {output}: {len(made.files)} files, "
        f"{_human(total)}, {made.parameters:,} parameters, {depth} decoder layers (seed {seed})."
    )


def _human(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{nbytes} B"
        size /= 1024
    return f"{nbytes} B"
