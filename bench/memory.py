"""Peak memory of every build stage, measured, against the memory plan's prediction.

    .venv/bin/python bench/memory.py CHECKPOINT --work DIR [--lock /path/bigmem.lock]

Runs each stage as its own `nvlm-export` process under `/usr/bin/time -v` (peak RSS is the
kernel's maximum resident set size of that process), in order, each one reading what the one
before wrote: export fp32 (without and with validation), export fp16, the dry-run, calibrate,
quantize int8 / fp8 / int4. A stage whose `<stage>.time` file is already in DIR is not run again
(delete it to re-measure), so an interrupted run resumes. Prints one table: measured peak RSS and
wall time, the dry-run's prediction and its error, and the peak over the bytes of the graphs the
stage runs. `--json FILE` writes the rows. Not a CI test: it takes minutes to hours.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from nvlm_export.export.memory_plan import GiB, plan
from nvlm_export.profiling.profiler import machine_description


@dataclass(frozen=True)
class Stage:
    name: str  # also the file name of its logs in --work
    plan: str  # the memory plan's stage
    args: list[str]  # nvlm-export arguments; {ckpt} {work} filled in
    output: str  # directory it writes, in --work
    runs: tuple[str, ...] = ()  # bundles (in --work) whose graphs it runs


QUANTIZE = ["--force", "--accuracy-requests", "1"]
STAGES = (
    Stage(
        "export-fp32",
        "export fp32",
        ["export", "{ckpt}", "-o", "{work}/fp32", "--no-validate"],
        "fp32",
    ),
    Stage(
        "export-fp32-validate",
        "export fp32 + validation",
        ["export", "{ckpt}", "-o", "{work}/fp32-validated"],
        "fp32-validated",
        ("fp32-validated",),
    ),
    Stage(
        "export-fp16",
        "export fp16 + validation",
        ["export", "{ckpt}", "-o", "{work}/fp16", "--dtype", "fp16"],
        "fp16",
        ("fp16",),
    ),
    Stage(
        "dry-run", "dry-run", ["build", "{ckpt}", "-p", "int4", "-o", "{work}/x", "--dry-run"], ""
    ),
    Stage(
        "calibrate",
        "calibrate",
        ["calibrate", "{work}/fp32", "-o", "{work}/calib", "--max-samples", "{samples}"],
        "calib",
        ("fp32",),
    ),
    *(
        Stage(
            f"quantize-{p}",
            f"quantize {p} + accuracy check",
            ["quantize", "{work}/fp32", "-p", p, "-o", "{work}/" + p, *QUANTIZE]
            + ([] if p == "int4" else ["--calib", "{work}/calib"]),
            p,
            ("fp32", p),
        )
        for p in ("int8", "fp8", "int4")
    ),
)


@dataclass
class Row:
    stage: str
    peak_bytes: int
    seconds: float
    predicted_bytes: int
    graph_bytes: int
    exit_code: int

    @property
    def error(self) -> float:
        return self.predicted_bytes / self.peak_bytes - 1

    @property
    def ratio_to_graphs(self) -> float | None:
        return self.peak_bytes / self.graph_bytes if self.graph_bytes else None


def run_stage(stage: Stage, nvlm_export: str, fill: dict[str, str], work: Path, lock: str | None):
    """Run one stage under /usr/bin/time -v unless its .time file exists; returns (rss, s, rc)."""
    timing = work / f"{stage.name}.time"
    if not timing.is_file():
        if stage.output:
            shutil.rmtree(work / stage.output, ignore_errors=True)
        args = [a.format(**fill) for a in stage.args]
        command = ["/usr/bin/time", "-v", "-o", str(timing), nvlm_export, *args]
        if lock:
            command = ["flock", lock, *command]
        print(f"running {stage.name}: {' '.join(args)}", flush=True)
        with open(work / f"{stage.name}.log", "w") as log:
            subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    return parse_time(timing.read_text())


def parse_time(text: str) -> tuple[int, float, int]:
    """Peak RSS in bytes, wall seconds and exit status from GNU time's -v report."""
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) * 1024
    clock = re.search(r"Elapsed \(wall clock\) time .*: ([\d:.]+)", text).group(1)
    seconds = 0.0
    for part in clock.split(":"):
        seconds = seconds * 60 + float(part)
    status = re.search(r"Exit status: (\d+)", text)
    failed = re.search(r"Command exited with non-zero status (\d+)", text)
    code = int(failed.group(1)) if failed else int(status.group(1)) if status else 0
    return rss, seconds, code


def graph_bytes(bundle: Path) -> int:
    """What a runner holds of a bundle: its graphs, their external data and the embedding table."""
    if not bundle.is_dir():
        return 0
    suffixes = (".onnx", ".data", ".npy")
    return sum(p.stat().st_size for p in bundle.iterdir() if p.name.endswith(suffixes))


def measure(args: argparse.Namespace) -> list[Row]:
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    memory = plan(args.checkpoint)
    fill = {"ckpt": str(args.checkpoint), "work": str(work), "samples": str(args.max_samples)}
    rows = []
    for stage in STAGES:
        if args.stages and stage.name not in args.stages:
            continue
        rss, seconds, code = run_stage(stage, args.nvlm_export, fill, work, args.lock)
        graphs = sum(graph_bytes(work / b) for b in stage.runs)
        predicted = memory.stages[stage.plan].peak_bytes
        rows.append(Row(stage.name, rss, seconds, predicted, graphs, code))
    return rows


def print_table(rows: list[Row]) -> None:
    print("| stage | peak RSS | wall | predicted | error | graph bytes | peak / graphs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r.ratio_to_graphs:.2f}" if r.ratio_to_graphs else "—"
        failed = "" if r.exit_code == 0 else f" (exit {r.exit_code})"
        print(
            f"| {r.stage}{failed} | {r.peak_bytes / GiB:.2f} GiB | {r.seconds:.0f} s | "
            f"{r.predicted_bytes / GiB:.2f} GiB | {r.error:+.0%} | "
            f"{r.graph_bytes / GiB:.2f} GiB | {ratio} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--work", type=Path, required=True, help="Where bundles and logs go.")
    parser.add_argument("--stages", nargs="*", help="Only these stages (default: all).")
    parser.add_argument("--max-samples", type=int, default=4, help="Calibration requests.")
    parser.add_argument("--lock", help="Run each stage under `flock LOCK` (shared machines).")
    parser.add_argument("--nvlm-export", default=str(Path(sys.executable).parent / "nvlm-export"))
    parser.add_argument("--json", type=Path, help="Also write the rows here.")
    args = parser.parse_args()
    machine = machine_description()
    rows = measure(args)
    print(f"\n{args.checkpoint} on {machine}\n")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
