"""`--dry-run` of export and build: print the memory plan (export/memory_plan.py)."""

from __future__ import annotations

import json

import typer

from nvlm_export.export.memory_plan import REUSE_CACHE_BYTES, MemoryPlan, StagePlan, gib


def print_memory_plan(
    plan: MemoryPlan, run: list[StagePlan], served: str, as_json: bool = False
) -> None:
    """The per-stage table, with the stages this command would run marked, the verdict, and
    what serving the bundle it leaves (`served`, a `SERVED` kind) will hold."""
    if as_json:
        extra = {"runs": [s.stage for s in run], "serves": served}
        typer.echo(json.dumps(plan.to_dict() | extra, indent=2))
        return
    typer.echo(f"Memory plan for {plan.model} (predicted from config.json; ▶ = this command)")
    typer.echo(f"  {'stage':32} {'peak RSS':>10} {'output':>10}  holds")
    for stage in plan.stages.values():
        mark = "▶" if stage in run else " "
        holds = "the weights it runs" if stage.runs_model else "one tensor at a time"
        peak, output = gib(stage.peak_bytes), gib(stage.output_bytes)
        typer.echo(f"{mark} {stage.stage:32} {peak:>10} {output:>10}  {holds}")
    for line in [*verdict(plan, run), serving_line(plan, served)]:
        typer.echo(line)


def serving_line(plan: MemoryPlan, served: str) -> str:
    context = plan.inventory.max_context
    return (
        f"Serving the {served} bundle (run, chat, the C API; ONNX Runtime on a CPU): peak "
        f"{gib(plan.serving[served])} at a full {context}-token context, plus up to "
        f"{gib(REUSE_CACHE_BYTES)} as the reuse caches fill; its prompt on OpenVINO (what auto "
        f"does for an INT4 decoder on CPUs with AMX or AVX-512 BF16) adds "
        f"{gib(plan.openvino_prompt[served])}."
    )


def verdict(plan: MemoryPlan, run: list[StagePlan]) -> list[str]:
    worst = max(run, key=lambda s: s.peak_bytes)
    disk = sum(s.output_bytes for s in run)
    lines = [
        f"This command (▶): peak {gib(worst.peak_bytes)} ({worst.stage}); "
        f"disk {gib(disk)} for its outputs and work files."
    ]
    if plan.available_bytes is not None:
        fits = "fits" if worst.peak_bytes <= plan.available_bytes else "does NOT fit"
        lines.append(f"Available memory here: {gib(plan.available_bytes)}: it {fits}.")
    lines.append(f"Accuracy check: {plan.accuracy_check}.")
    return lines + plan.notes
