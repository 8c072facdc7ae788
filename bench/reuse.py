"""Reuse on the bench checkpoint: a follow-up question's time to first token against the first
question's, and a new question about an image seen before against a cold request (issue #17).

    .venv/bin/python bench/reuse.py --bundle fp32=BENCH_FP32 --bundle int8=BENCH_INT8

Each bundle runs in its own worker process (bench/systems.py's `ReuseSystem`, caches on). A
round clears the caches, then times back to back: a cold request (a 7-tile image, 2x3 grid +
thumbnail, and a 32-token question) and a new 32-token question about the same image; then the
same image's first question in a conversation and a follow-up. Each ratio's two sides are
measured next to each other in every round, so a shared machine's drift hits both; medians over
the rounds are quoted. Writes bench/reuse-results.md (kept in docs/performance.md by bench/run.py)
and replaces that section of docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from run import GB, Row, _load, median, print_table, refresh_section, require_usable_cores
from systems import Worker

from nvlm_export.profiling.profiler import machine_description

ROOT = Path(__file__).resolve().parent.parent
SECTION = ROOT / "bench" / "reuse-results.md"
HEADING = "## Conversations and reuse"
FOLLOW_UP_TARGET = 0.1
SAME_IMAGE_TARGET = 0.15


def measure(name: str, bundle: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One bundle's rounds, with when and under which load they ran."""
    run: dict[str, Any] = {
        "commit": _commit(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_before": _load(),
        "settings": {
            "threads": args.threads,
            "grid": list(args.grid),
            "question_tokens": args.question_tokens,
            "new_tokens": args.new_tokens,
        },
    }
    worker = Worker("reuse", str(bundle), args.threads)
    try:
        questions = worker.call("questions", args.question_tokens)
        worker.call("reuse_round", (1, 1), questions, 2)  # warm-up: first calls allocate
        rounds = []
        for index in range(args.rounds):
            print(f"{name}: round {index + 1}/{args.rounds}...", flush=True)
            rounds.append(worker.call("reuse_round", args.grid, questions, args.new_tokens))
        run["peak_rss_bytes"] = worker.call("peak_rss")
    finally:
        worker.close()
    run["rounds"] = rounds
    run["ended"] = time.strftime("%H:%M UTC", time.gmtime())
    run["load_after"] = _load()
    return run


def rows_of(name: str, rounds: list[dict[str, Any]]) -> list[Row]:
    last = rounds[-1]
    case = f"{last['tiles']} tiles ({last['grid'][0]}x{last['grid'][1]} + thumbnail)"
    return [
        _row(
            f"follow-up question TTFT / first question's, {case}, {name}",
            rounds,
            ("follow_up", "first_turn"),
            FOLLOW_UP_TARGET,
            f"prefilled {last['follow_up_prefilled']} of the history's tokens",
        ),
        _row(
            f"same image, new question TTFT / cold request's, {case}, {name}",
            rounds,
            ("same_image", "cold"),
            SAME_IMAGE_TARGET,
            f"prefilled {last['same_image_prefilled']} of {last['prompt_tokens']} prompt tokens",
        ),
    ]


def _row(title: str, rounds: list[dict], keys: tuple[str, str], target: float, note: str) -> Row:
    warm, cold = keys
    ratio = median([r[warm] / r[cold] for r in rounds])  # per round: both sides side by side
    return Row(
        title,
        f"{median([r[warm] for r in rounds]) * 1000:.0f} ms",
        f"{median([r[cold] for r in rounds]) * 1000:.0f} ms",
        ratio,
        f"<= {target}x",
        ratio <= target,
        note,
    )


def section(runs: dict[str, dict[str, Any]], machine: dict[str, Any]) -> str:
    """The doc's section: one table over every bundle's run, then each run's conditions."""
    rows = [row for name, run in runs.items() for row in rows_of(name, run["rounds"])]
    lines = [
        HEADING,
        "",
        "Measured with `bench/reuse.py` on the bench checkpoint, caches on (the defaults),",
        "each bundle in its own process. Every round clears the caches and times a cold request",
        "and then a new question about the same image, then a conversation's first question",
        "about the image and its follow-up; ratios are taken per round (both sides measured next",
        "to each other) and their median quoted. TTFT is wall clock from the call to the first",
        "token, so tiling, hashing and re-rendering the history count.",
        "",
        "| measurement | reused | cold | ratio | target | met | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        met = "-" if row.met is None else ("yes" if row.met else "NO")
        cells = (row.name, row.ours, row.other, f"{row.ratio:.3f}", row.target, met, row.note)
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Machine: {machine['cpu']}, {machine['logical_cores']} logical cores "
        f"({machine.get('usable_cores') or '?'} usable), RAM {(machine['ram_bytes'] or 0) / GB:.1f}"
        f" GB, onnxruntime {machine['onnxruntime']}. Absolute times depend on the load average"
        " given per run below; the ratios compare sides measured next to each other.",
        "",
    ]
    for name, run in runs.items():
        settings = run["settings"]
        seconds = "; ".join(
            f"{r['cold']:.1f} / {r['same_image']:.1f} / {r['first_turn']:.1f} / "
            f"{r['follow_up']:.1f}"
            for r in run["rounds"]
        )
        lines.append(
            f"- {name}: {run['started']} – {run['ended']}, commit {run['commit']}, load average "
            f"{run['load_before']} at the start and {run['load_after']} at the end; "
            f"{len(run['rounds'])} rounds, {settings['threads']} threads, "
            f"{settings['question_tokens']}-token questions, {settings['new_tokens']}-token "
            f"answers; peak RSS {run['peak_rss_bytes'] / GB:.2f} GB; seconds per round (cold / "
            f"same image / first question / follow-up): {seconds}"
        )
    return "\n".join(lines) + "\n"


def _grid(text: str) -> tuple[int, int]:
    cols, _, rows = text.partition("x")
    return int(cols), int(rows)


def _commit() -> str:
    import subprocess

    return subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", action="append", default=[], help="NAME=DIR, e.g. fp32=DIR")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--grid", type=_grid, default=(2, 3), help="COLSxROWS of the image's tiles (default 2x3)"
    )
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the runs here")
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        help="measure nothing: render the section from runs saved with --json (merged in order)",
    )
    args = parser.parse_args()
    machine = machine_description()
    if args.from_json:
        runs: dict[str, Any] = {}
        for saved in args.from_json:
            runs.update(json.loads(saved.read_text())["runs"])
    else:
        if not args.bundle:
            parser.error("give --bundle NAME=DIR (or --from-json)")
        require_usable_cores(args.threads, machine)
        runs = {}
        for item in args.bundle:
            name, _, bundle = item.partition("=")
            runs[name] = measure(name, Path(bundle), args)
        if args.json:
            args.json.write_text(json.dumps({"machine": machine, "runs": runs}, indent=2) + "\n")
    print_table([row for n, run in runs.items() for row in rows_of(n, run["rounds"])], {})
    if not args.no_doc:
        SECTION.write_text(section(runs, machine))
        refresh_section(args.doc, SECTION)
        print(f"wrote {SECTION} and its section of {args.doc}")


if __name__ == "__main__":
    main()
