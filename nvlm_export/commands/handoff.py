"""`nvlm-export handoff`: hand a bundle's language model off to vLLM or TensorRT-LLM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from nvlm_export.commands.options import settings_from
from nvlm_export.errors import require_export_extra

ENGINE = "Engine launch settings"


def handoff(
    model_dir: Annotated[
        Path, typer.Argument(help="The NVLM-D / InternVL checkpoint the bundle was exported from.")
    ],
    bundle: Annotated[Path, typer.Argument(help="The bundle (its vision side is used as it is).")],
    engine: Annotated[
        str, typer.Option("--engine", "-e", help="vllm or tensorrt-llm.", rich_help_panel=ENGINE)
    ] = "vllm",
    tensor_parallel_size: Annotated[
        int,
        typer.Option(
            "--tensor-parallel-size",
            "--tp",
            help="GPUs the decoder is split across (must divide its attention heads).",
            rich_help_panel=ENGINE,
        ),
    ] = 1,
    dtype: Annotated[
        str,
        typer.Option(
            help="Decoder weights: auto (as stored), bfloat16, float16 or float32.",
            rich_help_panel=ENGINE,
        ),
    ] = "auto",
    max_context: Annotated[
        int | None,
        typer.Option(
            help="Prompt + answer tokens the engine serves (default: the bundle's).",
            rich_help_panel=ENGINE,
        ),
    ] = None,
    max_batch_size: Annotated[
        int,
        typer.Option(
            help="TensorRT-LLM: most concurrent requests the engine is built for.",
            rich_help_panel=ENGINE,
        ),
    ] = 8,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing hand-off.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest section.")] = False,
) -> None:
    """Write the bundle's decoder as a standard Hugging Face checkpoint (BUNDLE/llm/) for a
    serving engine, and record the engine and its launch settings in the manifest.

    The weights are streamed from the checkpoint tensor by tensor (no whole-model load). The
    vision side stays the bundle's own: `nvlm-export run --llm-engine vllm` tiles and encodes
    the images and hands vLLM the prompt embeddings. For TensorRT-LLM the manifest holds the
    checkpoint conversion, trtllm-build and trtllm-serve commands (docs/scale-out.md).

    Examples:

      nvlm-export handoff tiny/ bundle/ --engine vllm

      nvlm-export handoff NVLM-D-72B/ bundle/ --engine tensorrt-llm --tp 8 --dtype bfloat16
    """
    require_export_extra()
    from nvlm_export.handoff.bundle import HandoffSettings, handoff_bundle

    settings = settings_from(HandoffSettings, locals())
    manifest = handoff_bundle(model_dir, bundle, settings)
    spec = manifest.language_engine
    assert spec is not None
    if as_json:
        typer.echo(json.dumps(manifest.to_dict()["language_engine"], indent=2))
        return
    typer.echo(
        f"{spec.architecture} ({spec.dtype}) written to {bundle / spec.checkpoint} for "
        f"{spec.engine}, tensor parallel {spec.tensor_parallel_size}, context {spec.max_context}"
    )
    for command in spec.commands:
        typer.echo(f"  {command}")
