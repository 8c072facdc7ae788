"""`nvlm-export export` and `nvlm-export verify`: checkpoint -> bundle, and proof they agree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from nvlm_export.commands.options import BundleOutput, in_panel
from nvlm_export.defaults import DEFAULT_MAX_CONTEXT, DEFAULT_OPSET, SUPPORTED_OPSETS
from nvlm_export.errors import ValidationError, require_export_extra
from nvlm_export.runtime.limits import MAX_CONTEXT, MAX_TILES

Limits = in_panel("Limits")
DRY_RUN_HELP = (
    "Print the memory plan (peak RSS, disk and output size of every stage, predicted from "
    "config.json) and stop."
)


def export(
    model_dir: Annotated[
        Path, typer.Argument(help="Checkpoint directory (NVLM-D, InternVL, NVLM-X/H layouts).")
    ],
    output: BundleOutput,
    dtype: Annotated[
        str, typer.Option(help="Graph precision: fp32, or fp16 (norms and softmax stay fp32).")
    ] = "fp32",
    max_tiles: Annotated[
        int | None,
        Limits(min=1, max=MAX_TILES, help="Most tiles per image (default: the checkpoint's)."),
    ] = None,
    max_context: Annotated[
        int | None,
        Limits(
            min=1,
            max=MAX_CONTEXT,
            help="KV-cache capacity in tokens, prompt + answer (default: "
            f"{DEFAULT_MAX_CONTEXT} or the model's limit if smaller).",
        ),
    ] = None,
    opset: Annotated[
        int,
        typer.Option(
            min=SUPPORTED_OPSETS.start,
            max=SUPPORTED_OPSETS.stop - 1,
            help="ONNX opset of the float graphs (TensorRT 10.0-10.14 read up to 20).",
        ),
    ] = DEFAULT_OPSET,
    no_validate: Annotated[
        bool,
        typer.Option(
            "--no-validate",
            help="Skip the ONNX Runtime vs PyTorch check (keep a bundle that fails it).",
        ),
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help=DRY_RUN_HELP)] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Export a checkpoint's vision encoder and language decoder to ONNX, as a runnable bundle.

    Writes vision.onnx, decoder.onnx (+ cross_kv.onnx for NVLM-X/H), the token-embedding table,
    the tokenizer and manifest.json, then checks the bundle against the PyTorch model on a real
    tiled image. A failed export leaves nothing at the output path.

    Example:

      nvlm-export make-tiny --layout nvlm-d -o tiny/ && nvlm-export export tiny/ -o bundle/
    """
    require_export_extra()
    from nvlm_export.export.bundle import ExportSettings, export_bundle

    if dry_run:
        from nvlm_export.commands.plan import print_memory_plan
        from nvlm_export.export.memory_plan import available_memory, plan

        memory = plan(model_dir, max_tiles, max_context, available_memory())
        stage = f"export {dtype}" + ("" if no_validate else " + validation")
        print_memory_plan(memory, [memory.stages[stage]], dtype, as_json)
        return
    settings = ExportSettings(
        dtype=dtype,
        max_tiles=max_tiles,
        max_context=max_context,
        opset=opset,
        validate=not no_validate,
        overwrite=overwrite,
    )
    report = export_bundle(model_dir, output, settings)
    summary = {
        "bundle": str(report.bundle),
        "architecture": report.manifest.architecture,
        "precision": report.manifest.precision,
        "graphs": {name: g.file for name, g in report.manifest.graphs.items()},
        "bundle_bytes": report.bundle_bytes(),
        "stage_seconds": report.stage_seconds,
        "validation": report.validation.to_dict() if report.validation else None,
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        size = summary["bundle_bytes"] / 2**20
        typer.echo(f"Bundle written to {report.bundle} ({size:.1f} MiB)")


def verify(
    model_dir: Annotated[Path, typer.Argument(help="The checkpoint the bundle was exported from.")],
    bundle: Annotated[Path, typer.Argument(help="The bundle directory.")],
    image: Annotated[
        list[Path] | None,
        typer.Option("--image", "-i", help="Images to test with (default: the example image)."),
    ] = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The question.")] = (
        "Describe the image in detail."
    ),
    steps: Annotated[int, typer.Option(min=1, help="Greedy tokens that must be identical.")] = 16,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check a bundle against its PyTorch checkpoint end to end and print a per-stage table.

    Compares tiling (against an independent restatement of the reference transform), every
    vision output, the first-step logits, and greedy tokens for --steps steps. Exits non-zero on
    any failure.

    Example:

      nvlm-export verify tiny/ bundle/ --image photo.jpg --steps 24
    """
    require_export_extra()
    import torch

    from nvlm_export.export.architectures import architecture_for_layout
    from nvlm_export.export.validate import validate_bundle
    from nvlm_export.models.checkpoint import load_checkpoint
    from nvlm_export.models.config_io import check_checkpoint_of
    from nvlm_export.runtime.manifest import load_manifest

    manifest = load_manifest(bundle)
    dtype = torch.float16 if manifest.precision == "fp16" else torch.float32
    arch = architecture_for_layout(check_checkpoint_of(manifest, model_dir).layout)
    images = list(image) if image else None
    report = validate_bundle(
        bundle,
        lambda: load_checkpoint(model_dir, dtype=dtype),  # after the bundle ran: one at a time
        arch,
        images=images,
        question=prompt,
        greedy_steps=steps,
        check_tiling=True,
    )
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_report(report)
    if not report.passed:
        raise ValidationError(
            "The bundle does not match its checkpoint", why=report.failure_reason()
        )


def _print_report(report: object) -> None:
    table = Table(title="Bundle vs PyTorch reference")
    for column in ("stage", "max abs diff", "tolerance", "cosine", "result"):
        table.add_column(column)
    for c in report.comparisons:  # type: ignore[attr-defined]
        result = "[green]ok[/]" if c.passed else f"[red]FAILED[/] {c.detail}"
        table.add_row(c.name, f"{c.max_abs:.3g}", f"{c.tolerance:.3g}", f"{c.cosine:.6f}", result)
    tokens = report.tokens  # type: ignore[attr-defined]
    if tokens is not None:
        result = "[green]ok[/]" if tokens["identical"] else "[red]FAILED[/]"
        table.add_row(
            "greedy tokens",
            f"{tokens['identical_prefix']}/{tokens['steps']} identical",
            "",
            "",
            result,
        )
    Console().print(table)
