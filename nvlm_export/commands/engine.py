"""`nvlm-export engine` (build TensorRT engines) and `nvlm-export lint` (GPU-free checks)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from nvlm_export.commands.options import in_panel, lowercase, settings_from

if TYPE_CHECKING:
    from nvlm_export.export.engine_plan import BuildPlan
    from nvlm_export.export.lint import Finding

Build = in_panel("Build")
Output = in_panel("Output")

BundleArg = Annotated[
    Path,
    typer.Argument(metavar="BUNDLE", help="Bundle directory (with manifest.json).", exists=False),
]
TargetOption = Annotated[
    str,
    Build(
        "--target",
        "-t",
        help="GPU to build for: auto (this machine), orin, orin-nano, thor, a100, h100, h200, "
        "l4, l40s, rtx-ada.",
    ),
]


def engine(
    bundle: BundleArg,
    target: TargetOption = "auto",
    precision: Annotated[
        str | None,
        Build(
            "--precision",
            "-p",
            callback=lowercase,
            help="fp32, fp16, int8, fp8 or int4. Default: what each graph's ONNX holds.",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        Build(
            "--dry-run",
            help="Lint and plan only: write engine_plan.json and print the plan (no TensorRT).",
        ),
    ] = False,
    optimization_level: Annotated[
        int,
        Build(
            "--opt-level",
            help="Builder optimisation level 0 (fast build) to 5 (slow build, faster engine).",
        ),
    ] = 3,
    workspace_gib: Annotated[
        float | None,
        Build(
            "--workspace",
            help="Builder workspace in GiB. Default: the target's (small on shared-memory Jetson).",
        ),
    ] = None,
    timing_cache: Annotated[
        Path | None,
        Build(
            "--timing-cache",
            help="Timing cache file, reused across builds. Default: one per GPU and TensorRT "
            "version under ~/.cache/nvlm-export.",
        ),
    ] = None,
    overwrite: Annotated[bool, Build("--overwrite", help="Replace existing engines.")] = False,
    as_json: Annotated[bool, Output("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Build TensorRT engines for a bundle: lint, plan, then build on this GPU.

    One engine per graph with optimisation profiles over tiles (vision), prefill and decode
    (decoder) and the cross-attention length (NVLM-X/H). Engines are tied to one GPU and one
    TensorRT version, so build on the target itself (e.g. the Jetson); --dry-run works anywhere
    and writes the plan to BUNDLE/engine_plan.json.

    Example, on a Jetson AGX Orin:

        nvlm-export engine bundle/ --target orin
    """
    from nvlm_export.export.engine_build import import_tensorrt, installed_tensorrt_version
    from nvlm_export.export.engine_plan import PlanOptions, plan_build
    from nvlm_export.export.targets import building_here, check_precision, resolve_target
    from nvlm_export.runtime.manifest import load_manifest

    manifest = load_manifest(bundle)
    tensorrt_version = installed_tensorrt_version()
    resolved = building_here(resolve_target(target), target, tensorrt_version)
    # Before any work: fp8 on orin, or INT4 where the TensorRT cannot read its opset, fail here.
    check_precision(resolved, precision or manifest.precision)
    if not dry_run:
        import_tensorrt()  # MissingExtraError: build on the target with the tensorrt extra
    options = settings_from(PlanOptions, locals())
    _lint_or_note(bundle, resolved)
    plan = plan_build(manifest, resolved, options)
    if dry_run:
        path = plan.save(bundle)
        _print_plan(plan, as_json)
        _stderr(f"plan written to {path}")
        return
    _print_plan(plan, as_json)
    from nvlm_export.export.engine_build import build_engines

    _, built = build_engines(bundle, manifest, plan, overwrite=overwrite, progress=_stderr)
    total = sum(b.size_bytes for b in built) / 2**30
    seconds = sum(b.seconds for b in built)
    _stderr(
        f"built {len(built)} engines ({total:.2f} GiB) in {seconds:.0f} s with TensorRT "
        f"{tensorrt_version} for {resolved.description}"
    )


def lint(
    bundle: BundleArg,
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            "-t",
            help="Also check what this GPU lacks (fp8, bf16) and its TensorRT's opset range.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print findings as JSON.")] = False,
) -> None:
    """Check a bundle's files and its ONNX graphs against TensorRT's ONNX parser, without a GPU.

    First every file is compared with the size and SHA-256 its manifest records (a mismatch names
    the file). Then it reports operators outside TensorRT's support list, opsets it cannot parse,
    unsupported types, Q/DQ nodes TensorRT refuses (non-zero zero points, per-channel activations,
    bad block sizes), inputs whose fixed sizes contradict the engine profiles, and large INT64
    tensors.
    Exits with status 1 when there are errors.
    """
    from nvlm_export.errors import require_extra
    from nvlm_export.export.lint import lint_bundle
    from nvlm_export.export.targets import resolve_target

    require_extra("export", "onnx")
    resolved = resolve_target(target) if target else None
    findings = lint_bundle(bundle, resolved)
    if as_json:
        typer.echo(json.dumps([f.to_dict() for f in findings], indent=2))
    else:
        _print_findings(findings)
    if any(f.severity == "error" for f in findings):
        raise typer.Exit(1)


def _lint_or_note(bundle: Path, target: object) -> None:
    """Lint before planning a build; on a device without onnx, say that it was skipped."""
    if importlib.util.find_spec("onnx") is None:
        _stderr("lint skipped: onnx is not installed (run nvlm-export lint on the export host)")
        return
    from nvlm_export.errors import ExportError
    from nvlm_export.export.lint import lint_bundle

    findings = lint_bundle(bundle, target)  # type: ignore[arg-type]
    errors = [f for f in findings if f.severity == "error"]
    if findings:
        _print_findings(findings, stderr=True)
    if errors:
        first = errors[0]
        raise ExportError(
            f"Lint found {len(errors)} TensorRT problem(s) in the bundle",
            why=f"first: {first.graph} {first.where}: {first.message}",
            fix="Fix them before building (nvlm-export lint BUNDLE lists all)",
        )


def _print_plan(plan: BuildPlan, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(plan.to_dict(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    title = (
        f"TensorRT build plan: {plan.target.name} (sm {plan.target.sm}), TensorRT "
        f"{plan.tensorrt_version}, opt level {plan.optimization_level}, workspace "
        f"{plan.workspace_bytes / 2**30:.1f} GiB"
    )
    table = Table(title=title, title_justify="left")
    for column in ("graph", "engine", "precision", "typing", "profile", "axes (min/opt/max)"):
        table.add_column(column)
    for engine in plan.engines:
        typing = "strong" if engine.strongly_typed else "weak + FP16 flag"
        for index, profile in enumerate(engine.profiles):
            axes = ", ".join(f"{axis} {r.text()}" for axis, r in profile.axes.items()) or "static"
            first = index == 0
            table.add_row(
                engine.graph if first else "",
                engine.engine if first else "",
                engine.precision if first else "",
                typing if first else "",
                profile.name,
                axes,
            )
    console = Console(soft_wrap=True)
    console.print(table)
    console.print(f"timing cache: {plan.timing_cache}")
    for note in plan.notes:
        console.print(f"note: {note}")


def _print_findings(findings: list[Finding], *, stderr: bool = False) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(stderr=stderr, soft_wrap=True)
    if not findings:
        console.print("lint: no TensorRT problems found")
        return
    table = Table(title="TensorRT lint", title_justify="left")
    for column in ("severity", "graph", "where", "problem", "what to do"):
        table.add_column(column)
    for f in findings:
        style = "bold red" if f.severity == "error" else "yellow"
        table.add_row(
            f"[{style}]{f.severity}[/]",
            f.graph,
            escape(f.where),
            escape(f"{f.code}: {f.message}"),
            escape(f.fix),
        )
    console.print(table)


def _stderr(message: str) -> None:
    typer.echo(message, err=True)
