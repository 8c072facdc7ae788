"""`nvlm-export calibrate`, `quantize` and `build`: explicit INT8 / FP8 / INT4 bundles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from nvlm_export.commands.export import DRY_RUN_HELP
from nvlm_export.commands.options import BundleOutput, in_panel, lowercase, settings_from
from nvlm_export.defaults import (
    ACCURACY_REQUESTS,
    CALIBRATION_DECODE_STEPS,
    CALIBRATION_REQUESTS,
)
from nvlm_export.errors import require_export_extra

if TYPE_CHECKING:
    from nvlm_export.export.accuracy import AccuracyReport

Data = in_panel("Calibration data")
Budget = in_panel("Accuracy budget")

BundleArg = Annotated[
    Path, typer.Argument(metavar="BUNDLE", help="Bundle directory (unquantized).")
]
ImagesOption = Annotated[
    str | None,
    Data(
        "--images",
        help="Directory or glob of calibration images (default: a built-in synthetic set).",
    ),
]
PromptsOption = Annotated[
    Path | None,
    Data(
        "--prompts", help='JSONL file, one {"prompt": "..."} per line (default: generic prompts).'
    ),
]
MaxSamplesOption = Annotated[
    int,
    Data("--max-samples", help="Requests (image + prompt) to record."),
]
SeedOption = Annotated[
    int,
    Data("--seed", min=0, help="Seed: image order and the built-in set."),
]
DecodeStepsOption = Annotated[
    int,
    Data("--decode-steps", help="Decode steps recorded per request after the prefill."),
]
ExcludeOption = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude",
        help="Keep matching nodes in float: a glob over module paths (layers.0.mlp.*, lm_head) "
        "or node names. Repeatable.",
    ),
]
LmHeadOption = Annotated[
    str,
    Budget(
        "--lm-head",
        help="The decoder's LM head: auto (quantize it, keep it only if the accuracy check stays "
        "within budget, otherwise float; the build summary and accuracy.json say which, with "
        "the figures), quantized (at the decoder's precision), or float.",
    ),
]
OldLmHeadOption = Annotated[
    bool | None,
    typer.Option(
        "--quantize-lm-head/--keep-lm-head",
        help="Deprecated: use --lm-head quantized / --lm-head float.",
        hidden=True,
        show_default=False,
    ),
]
AccuracyCheckOption = Annotated[
    bool,
    Budget(
        "--accuracy-check/--no-accuracy-check",
        help="Compare the quantized bundle with its source on held-out requests (default). "
        "Without it nothing but the quantized graphs is held in memory (a 70B-class model that "
        "does not fit twice); a warning says the bundle is unchecked and no accuracy.json is "
        "written.",
    ),
]
ForceOption = Annotated[
    bool, typer.Option("--force", help="Keep the output even when accuracy is outside the budget.")
]
AccuracyRequestsOption = Annotated[
    int,
    Budget(
        "--accuracy-requests",
        min=1,
        help="Held-out requests the accuracy check runs (each: the reference and the quantized "
        "bundle decode 16 tokens). Fewer is faster on large models; the report says how many.",
    ),
]


def calibrate(
    bundle: BundleArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Calibration set directory.")],
    images: ImagesOption = None,
    prompts: PromptsOption = None,
    max_samples: MaxSamplesOption = CALIBRATION_REQUESTS,
    seed: SeedOption = 0,
    decode_steps: DecodeStepsOption = CALIBRATION_DECODE_STEPS,
    graphs: Annotated[
        str | None,
        Data(
            "--graphs",
            help="Comma-separated graphs to record (default: all). 'vision' alone is what an "
            "INT4 bundle's INT8 vision graph needs: it only tiles and encodes the images, much "
            "faster.",
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing calibration set.")] = False,
) -> None:
    """Record a calibration set: the inputs every graph sees when the bundle answers requests.

    Runs the real runtime (tiling, prompt, vision, splice, prefill, decode steps) on each image
    with a prompt and stores the feeds of every graph call as .npz files, streamed to disk, with
    calibration.json (bundle fingerprint, images, seed, counts). With 5 or more images, 20% are
    held out for quantize's accuracy report. Unreadable images are skipped and counted.

    Example:

      nvlm-export calibrate bundle/ --images photos/ -o calib/

      nvlm-export calibrate bundle/ --images photos/ --graphs vision -o calib-vision/  # for int4
    """
    from nvlm_export.calibration.collect import CalibrationOptions, collect_calibration

    options = settings_from(CalibrationOptions, locals(), graphs=_names(graphs))
    calib = collect_calibration(bundle, output, options, overwrite=overwrite, warn=_warn)
    info = calib.info
    counts = ", ".join(f"{g} {s.count} ({s.bytes / 2**20:.1f} MiB)" for g, s in info.graphs.items())
    skipped = f", {len(info.skipped)} unreadable images skipped" if info.skipped else ""
    typer.echo(f"Calibration set written to {output}: {info.requests} requests; {counts}{skipped}")


def quantize(
    bundle: BundleArg,
    precision: Annotated[
        str, typer.Option("--precision", "-p", callback=lowercase, help="int8, fp8 or int4.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Quantized bundle directory.")],
    calib: Annotated[
        Path | None,
        typer.Option(
            "--calib",
            help="Calibration set from nvlm-export calibrate: required for int8/fp8; for int4 it "
            "quantizes the vision graph to INT8 (without it vision stays in float, with a "
            "warning).",
        ),
    ] = None,
    components: Annotated[
        str | None,
        typer.Option(
            "--components",
            help="Comma-separated graphs: vision, decoder, cross_kv (default: all). In an int4 "
            "bundle vision is INT8 (W8A8), decoder and cross_kv INT4 weight-only.",
        ),
    ] = None,
    exclude: ExcludeOption = None,
    lm_head: LmHeadOption = "auto",
    quantize_lm_head: OldLmHeadOption = None,
    min_cosine: Annotated[
        float | None, Budget(help="Lowest cosine of any vision/cross_kv output.")
    ] = None,
    min_top1: Annotated[float | None, Budget(help="Lowest next-token top-1 agreement.")] = None,
    max_kl: Annotated[float | None, Budget(help="Highest mean KL divergence per token.")] = None,
    accuracy_requests: AccuracyRequestsOption = ACCURACY_REQUESTS,
    check_accuracy: AccuracyCheckOption = True,
    force: ForceOption = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the accuracy report as JSON.")
    ] = False,
) -> None:
    """Quantize a bundle with explicit Q/DQ (INT8, FP8 or INT4 weight-only) and measure it.

    INT4 bundles quantize the decoder (and cross_kv) to INT4 weight-only and, given --calib, the
    vision encoder to INT8 W8A8: weight-only INT4 does not speed up the ViT's compute-bound GEMMs.

    Every run compares the quantized bundle with its source on held-out requests (cosine of each
    quantized vision/cross_kv output, next-token top-1 agreement, KL divergence, identical greedy
    tokens), writes accuracy.json into the output and fails, leaving no output, when the budget
    is exceeded (defaults per precision; see docs/quantization.md) unless --force.

    Example:

      nvlm-export quantize bundle/ --precision int8 --calib calib/ -o bundle-int8/
    """
    require_export_extra()
    from nvlm_export.export.accuracy import DEFAULT_THRESHOLDS, Thresholds
    from nvlm_export.export.quantize import QuantizeSettings, quantize_bundle

    defaults = DEFAULT_THRESHOLDS.get(precision)
    thresholds = None
    if defaults is not None:
        thresholds = Thresholds(
            min_cosine=defaults.min_cosine if min_cosine is None else min_cosine,
            min_top1=defaults.min_top1 if min_top1 is None else min_top1,
            max_kl=defaults.max_kl if max_kl is None else max_kl,
        )
    settings = settings_from(
        QuantizeSettings,
        locals(),
        components=_names(components),
        exclude=tuple(exclude or ()),
        lm_head=_lm_head_setting(lm_head, quantize_lm_head),
    )
    report = quantize_bundle(bundle, output, settings, calib, warn=_warn)
    if as_json:
        typer.echo(json.dumps(report.accuracy.to_dict() if report.accuracy else None, indent=2))
    else:
        if report.accuracy is not None:
            print_accuracy(report.accuracy)
        typer.echo(
            f"Quantized bundle written to {output} ({report.bundle_bytes() / 2**20:.1f} MiB)"
        )


def build(
    model_dir: Annotated[
        Path | None, typer.Argument(help="Checkpoint directory (default: the built-in demo model).")
    ] = None,
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            "-p",
            callback=lowercase,
            help="fp16, int8, fp8 or int4 (INT4 weight-only decoder, INT8 vision: calibrates the "
            "vision graph only).",
        ),
    ] = ...,
    output: BundleOutput = ...,
    images: ImagesOption = None,
    prompts: PromptsOption = None,
    target: Annotated[
        str | None,
        typer.Option(
            "--target", "-t", help="GPU to deploy on (orin, thor, h100, ...); checked first."
        ),
    ] = None,
    backend: Annotated[
        str, typer.Option(help="onnxruntime (stop at the bundle) or tensorrt (build engines).")
    ] = "onnxruntime",
    max_samples: MaxSamplesOption = CALIBRATION_REQUESTS,
    seed: SeedOption = 0,
    exclude: ExcludeOption = None,
    lm_head: LmHeadOption = "auto",
    quantize_lm_head: OldLmHeadOption = None,
    accuracy_requests: AccuracyRequestsOption = ACCURACY_REQUESTS,
    validate: Annotated[
        bool,
        Budget(
            "--validate/--no-validate",
            help="Compare the exported bundle with the PyTorch model (default). Without it the "
            "export only moves weights, one tensor at a time; a warning says it is unchecked.",
        ),
    ] = True,
    check_accuracy: AccuracyCheckOption = True,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Keep the output even when accuracy is outside the budget, and start even when "
            "the memory plan predicts more memory than this machine has available.",
        ),
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help=DRY_RUN_HELP)] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Checkpoint to deployable bundle in one command: export, calibrate, quantize, engines.

    Stages run in a work directory beside the output (.OUTPUT.build/) and are recorded with the
    fingerprints of their inputs: rerunning after an interruption resumes, and a finished stage
    is not redone. TensorRT engines are built with --backend tensorrt, on the target with TensorRT
    (refused before any work elsewhere); otherwise the build stops after the ONNX bundle and names
    the `nvlm-export engine` command to run there. Before any work the
    memory plan predicts every stage's peak from config.json; a build that would not fit in the
    available memory is refused unless --force (--dry-run prints the plan, docs/memory.md).
    A model too large to run here (NVLM-D-72B on a workstation) builds INT4 weight-only with
    --no-validate --no-accuracy-check: no stage then holds more than one tensor at a time.

    Examples:

      nvlm-export build --precision int8 -o demo-int8/     # the built-in demo model

      nvlm-export build ckpt/ --precision int4 -o bundle-int4/ --dry-run

      nvlm-export build nvlm-d-72b/ -p int4 --no-validate --no-accuracy-check -o nvlm-d-int4/

      nvlm-export build ckpt/ --precision int8 --images photos/ --target orin -o bundle-int8/
    """
    require_export_extra()
    if model_dir is None:
        from nvlm_export.demo import default_checkpoint

        model_dir = default_checkpoint()
    from nvlm_export.export.build import BuildSettings, check_target
    from nvlm_export.export.build import build as run_build

    if dry_run:
        from nvlm_export.commands.plan import print_memory_plan
        from nvlm_export.export.memory_plan import available_memory, plan

        # A bad precision, target or missing TensorRT first, as the build itself would.
        check_target(output, BuildSettings.of(precision, backend=backend, target=target))
        memory = plan(model_dir, available_bytes=available_memory())
        stages = memory.build_stages(precision, check_accuracy, validate)
        served = memory.served(precision, validate, check_accuracy)
        print_memory_plan(memory, stages, served, as_json)
        return
    values = {name: value for name, value in locals().items() if name in BuildSettings.names()}
    values["exclude"] = tuple(exclude or ())
    values["lm_head"] = _lm_head_setting(lm_head, quantize_lm_head)
    settings = BuildSettings.of(**values)
    report = run_build(model_dir, output, settings, warn=_warn)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    _print_build_summary(report)


def _lm_head_setting(lm_head: str, deprecated: bool | None) -> str:
    """--lm-head, or the deprecated --quantize-lm-head / --keep-lm-head mapped onto it."""
    if deprecated is None:
        return lm_head
    mapped = "quantized" if deprecated else "float"
    flag = "--quantize-lm-head" if deprecated else "--keep-lm-head"
    if lm_head not in ("auto", mapped):
        from nvlm_export.errors import InputError

        raise InputError(
            f"{flag} contradicts --lm-head {lm_head}", fix=f"Pass only --lm-head {lm_head}"
        )
    _warn(f"{flag} is deprecated; use --lm-head {mapped}")
    return mapped


def _names(csv: str | None) -> tuple[str, ...] | None:
    """A comma-separated option as a tuple of names (None when not given)."""
    return tuple(c.strip() for c in csv.split(",") if c.strip()) if csv else None


def print_accuracy(report: AccuracyReport) -> None:
    from rich.console import Console
    from rich.table import Table

    limits = report.thresholds
    table = Table(
        title=f"Accuracy of the {report.precision} bundle ({len(report.requests)} "
        "held-out requests)",
        title_justify="left",
    )
    for column in ("measure", "value", "budget"):
        table.add_column(column)
    for out in report.outputs:
        table.add_row(
            f"{out.graph}.{out.output} cosine (min)",
            f"{out.min_cosine:.5f}",
            f">= {limits.min_cosine}",
        )
        table.add_row(f"{out.graph}.{out.output} max rel error", f"{out.max_rel_error:.4f}", "")
    for graph in report.unchanged_graphs:
        table.add_row(graph, "not quantized (identical to the source)", "")
    d = report.decoder
    table.add_row("next-token top-1 agreement", f"{d.top1_agreement:.3f}", f">= {limits.min_top1}")
    table.add_row(
        "KL divergence (mean / max)", f"{d.mean_kl:.4f} / {d.max_kl:.4f}", f"<= {limits.max_kl}"
    )
    table.add_row(
        "identical greedy tokens (mean)", f"{d.mean_identical:.1f} / {d.greedy_steps}", ""
    )
    if report.lm_head is not None:
        table.add_row("LM head", report.lm_head["reason"], f"--lm-head {report.lm_head['setting']}")
    capped = _capped_tiles(report)
    if capped:
        table.add_row(
            f"tile budget, capped to fit {report.max_context} tokens",
            capped,
            f"bundle: {report.bundle_max_tiles}",
        )
    status = "[green]within budget[/]" if report.passed else "[red]outside budget[/]"
    table.add_row("result", status, "")
    Console(stderr=True).print(table)


def _capped_tiles(report: AccuracyReport) -> str | None:
    """'1-3 in 2 of 4 requests': the tile budgets held-out requests were lowered to, or None."""
    budgets = sorted(t.max_tiles for t in report.tiling if t.max_tiles < report.bundle_max_tiles)
    if not budgets:
        return None
    cap = f"{budgets[0]}" if budgets[0] == budgets[-1] else f"{budgets[0]}-{budgets[-1]}"
    return f"{cap} in {len(budgets)} of {len(report.tiling)} requests"


def _print_build_summary(report: Any) -> None:
    typer.echo(
        f"Bundle: {report.bundle} ({report.bundle_bytes / 2**20:.1f} MiB; checkpoint "
        f"{report.checkpoint_bytes / 2**20:.1f} MiB)"
    )
    typer.echo(
        f"Stages run: {', '.join(report.ran) or 'none'}; skipped (already done): "
        f"{', '.join(report.skipped) or 'none'}"
    )
    if report.accuracy:
        d = report.accuracy["decoder"]
        cosines = "".join(
            f"{o['graph']} cosine {o['min_cosine']:.4f}; " for o in report.accuracy["outputs"]
        )
        typer.echo(
            f"Accuracy: {cosines}top-1 {d['top1_agreement']:.3f}; "
            f"KL {d['mean_kl']:.4f}; passed {report.accuracy['passed']}"
        )
        if report.accuracy.get("lm_head"):
            typer.echo(f"LM head: {report.accuracy['lm_head']['reason']}")
    for note in report.notes:
        typer.echo(f"Note: {note}")
    if report.work_bytes:
        typer.echo(
            f"Kept for resuming and rebuilding: {report.work_dir} "
            f"({report.work_bytes / 2**20:.1f} MiB); delete it when the bundle is final"
        )


def _warn(message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(
        f"[yellow]warning:[/] {escape(message)}", highlight=False
    )
