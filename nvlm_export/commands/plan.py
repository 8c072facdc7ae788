"""`--dry-run` of export and build: print the memory plan (export/memory_plan.py)."""

from __future__ import annotations

import json

import typer

from nvlm_export.export.memory_plan import MemoryPlan, StagePlan, gib


def print_memory_plan(plan: MemoryPlan, run: list[StagePlan], as_json: bool = False) -> None:
    """The per-stage table, with the stages this command would run marked, and the verdict."""
    if as_json:
        typer.echo(json.dumps(plan.to_dict() | {"runs": [s.stage for s in run]}, indent=2))
        return
    typer.echo(f"Memory plan for {plan.model} (predicted from config.json; ▶ = this command)")
    typer.echo(f"  {'stage':32} {'peak RSS':>10} {'output':>10}  holds")
    for stage in plan.stages.values():
        mark = "▶" if stage in run else " "
        holds = "the weights it runs" if stage.runs_model else "one tensor at a time"
        peak, output = gib(stage.peak_bytes), gib(stage.output_bytes)
        typer.echo(f"{mark} {stage.stage:32} {peak:>10} {output:>10}  {holds}")
    for line in verdict(plan, run):
        typer.echo(line)


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
