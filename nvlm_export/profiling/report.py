"""A profile report as a rich table, JSON, CSV and a PNG chart."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from nvlm_export.profiling.chart import save_chart

JSON_NAME, CSV_NAME, PNG_NAME = "profile.json", "profile.csv", "profile.png"
CSV_FIELDS = ("case", "tiles", "prompt_tokens", "metric", "unit", "median", "p90", "p99", "count")
TABLE_WIDTH = 124  # every column readable even when stdout is not a terminal


def write_outputs(report: dict[str, Any], directory: Path) -> dict[str, Path]:
    """profile.json, profile.csv and profile.png in `directory` (created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"json": directory / JSON_NAME, "csv": directory / CSV_NAME}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    write_csv(report, paths["csv"])
    paths["png"] = save_chart(report, directory / PNG_NAME)
    return paths


def csv_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per case and metric, with its median / p90 / p99."""
    rows = []
    for case in report["cases"]:
        metrics = {
            **{f"stage {name}": d for name, d in case["stages_ms"].items()},
            "vision per tile": case["vision_ms_per_tile"],
            "ttft": case["ttft_ms"],
            "follow-up ttft": case["follow_up_ttft_ms"],
            "decode per token": case["decode_ms_per_token"],
            "e2e": case["e2e_ms"],
        }
        batching = case.get("vision_batching")
        if batching:
            metrics["vision per tile, 1 per call"] = batching["ms_per_tile_one_per_call"]
            metrics[f"vision per tile, {batching['batch']} per call"] = batching[
                "ms_per_tile_batched"
            ]
        for row in (case.get("prefill_chunking") or {}).get("chunks", []):
            metrics[f"prefill, {_chunk_name(row['chunk_tokens'])}"] = row["prefill_ms"]
        base = {
            "case": case["label"],
            "tiles": case["tiles"],
            "prompt_tokens": case["prompt_tokens"],
        }
        for metric, dist in metrics.items():
            if dist is None:
                continue
            rows.append(
                {**base, "metric": metric, "unit": "ms", **{k: dist[k] for k in CSV_FIELDS[5:]}}
            )
        rows.append(
            {
                **base,
                "metric": "decode tokens per second",
                "unit": "tokens/s",
                "median": case["decode_tokens_per_second"],
                "p90": "",
                "p99": "",
                "count": len(case["runs"]),
            }
        )
    return rows


def write_csv(report: dict[str, Any], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(csv_rows(report))


def print_report(report: dict[str, Any], console: Console) -> None:
    """The stage table, then memory and the analytic decode cost next to the measured one."""
    if not console.is_terminal and console.width < TABLE_WIDTH:  # piped: nothing to wrap for
        console = Console(file=console.file, width=TABLE_WIDTH)
    console.print(_stage_table(report))
    for line in summary_lines(report):
        console.print(line, highlight=False)


def _stage_table(report: dict[str, Any]) -> Table:
    settings = report["settings"]
    table = Table(
        title=f"{report['architecture']} {report['precision']}, {report['backend']} "
        f"({', '.join(report['providers']) or '?'}), KV cache {report['kv_cache']}: "
        f"median ms of {settings['runs']} runs, "
        f"{settings['new_tokens']} new tokens",
        title_justify="left",
    )
    table.add_column("case")
    headers = ("prompt", "prep", "vision", "/tile", "splice", "prefill", "TTFT", "follow-up")
    headers += ("ms/tok", "p90", "p99", "tok/s", "e2e")
    for header in headers:
        table.add_column(header, justify="right")
    for case in report["cases"]:
        stages, decode = case["stages_ms"], case["decode_ms_per_token"]
        table.add_row(
            case["label"],
            str(case["prompt_tokens"]),
            *(
                _ms(value)
                for value in (
                    stages["prepare"]["median"],
                    stages["vision"]["median"],
                    case["vision_ms_per_tile"]["median"],
                    stages["splice"]["median"],
                    stages["prefill"]["median"],
                    case["ttft_ms"]["median"],
                    case["follow_up_ttft_ms"]["median"],
                    decode["median"],
                    decode["p90"],
                    decode["p99"],
                )
            ),
            f"{case['decode_tokens_per_second']:.1f}",
            _ms(case["e2e_ms"]["median"]),
        )
    return table


def summary_lines(report: dict[str, Any]) -> list[str]:
    memory, cost = report["memory"], report["analytic"]
    lines = [_batching_line(case) for case in report["cases"] if case.get("vision_batching")]
    lines += [_chunking_line(case) for case in report["cases"] if case.get("prefill_chunking")]
    lines += [
        f"memory: peak RSS {_size(memory['peak_rss_bytes'])} ({memory['peak_rss_scope']}), "
        f"{memory['peak_rss_over_weights']:.2f}x the bundle's "
        f"{_size(memory['bundle_weight_bytes'])} of weights; GPU "
        + (
            f"{_size(memory['gpu_peak_bytes'])}"
            if memory["gpu_peak_bytes"] is not None
            else (memory["gpu_note"] or "not reported")
        ),
        f"decode cost at {cost['context']} tokens of context: "
        f"{_size(cost['bytes_per_token'])} read and "
        f"{cost['flops_per_token'] / 1e9:.3f} GFLOP per token"
        + ("" if cost["exact"] else " (estimated from file sizes)")
        + f"; measured {_size(cost['measured_bytes_per_second'])}/s effective",
    ]
    if cost["bandwidth_bound_tokens_per_second"]:
        lines.append(
            f"bandwidth bound at {cost['bandwidth_gbs']:.1f} GB/s: "
            f"{cost['bandwidth_bound_tokens_per_second']:.2f} tok/s; measured "
            f"{cost['measured_tokens_per_second']:.2f} tok/s = {cost['fraction_of_bound']:.0%}"
        )
    tegra = report.get("tegrastats")
    if tegra and tegra.get("total_power_mw"):
        power = tegra["total_power_mw"]
        gpu = tegra.get("gpu_percent")
        lines.append(
            f"power: mean {power['mean'] / 1000:.1f} W, peak {power['peak'] / 1000:.1f} W"
            + (f"; GPU load mean {gpu['mean']:.0f} %" if gpu else "")
            + f" ({tegra['samples']} tegrastats samples)"
        )
    return lines


def _batching_line(case: dict[str, Any]) -> str:
    batching = case["vision_batching"]
    one = batching["ms_per_tile_one_per_call"]["median"]
    many = batching["ms_per_tile_batched"]["median"]
    ratio = batching["batched_over_one_per_call"]
    verdict = "faster" if ratio < 1 else "not faster"
    peaks = (batching["peak_rss_rise_bytes_one_per_call"], batching["peak_rss_rise_bytes_batched"])
    return (
        f"vision batching, {case['label']}: {_ms(one)} ms/tile one tile per call, {_ms(many)} "
        f"ms/tile {batching['batch']} per call ({ratio:.2f}x: {verdict}); memory peak +"
        f"{_maybe_size(peaks[0])} vs +{_maybe_size(peaks[1])}"
    )


def _chunking_line(case: dict[str, Any]) -> str:
    parts = [
        f"{_chunk_name(row['chunk_tokens'])} {_ms(row['prefill_ms']['median'])} ms, memory peak "
        f"+{_maybe_size(row['peak_rss_rise_bytes'])}"
        for row in case["prefill_chunking"]["chunks"]
    ]
    return f"prefill chunking, {case['label']} ({case['prompt_tokens']} tokens): " + "; ".join(
        parts
    )


def _chunk_name(tokens: int) -> str:
    return f"{tokens}-token chunks" if tokens else "one call"


def _maybe_size(value: int | None) -> str:
    return _size(value) if value is not None else "?"


def _ms(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _size(value: float) -> str:
    """Bytes in the largest unit that keeps a leading digit (1.23 GB, 45.6 MB)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"
