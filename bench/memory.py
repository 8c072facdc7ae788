"""Peak memory of every build stage, measured, against the memory plan's prediction.

    .venv/bin/python bench/memory.py CHECKPOINT --work DIR [--lock /path/bigmem.lock]

Runs each stage as its own `nvlm-export` process under `/usr/bin/time -v` (peak RSS is the
kernel's maximum resident set size of that process), in order, each one reading what the one
before wrote: export fp32 and fp16 (each without and with validation), the dry-run, calibrate,
quantize int8 / fp8 / int4 (each with and without the accuracy check). A stage whose
`<stage>.time` file is complete in DIR is not run again (delete it to re-measure), so an
interrupted run resumes. Beside it, `<stage>.meta.json` records the commit of the nvlm-export that
ran, when, and the load average before and after (the machine may be shared).

Prints one table: peak RSS, wall time, CPU time (user + sys, which a loaded machine inflates far
less than wall time), the dry-run's prediction and its error, the peak over the bytes of the graphs
the stage runs, and #21's target for the stage. `--json FILE` writes the rows; `--report-only`
runs nothing and tabulates what a --work directory already holds. Not a CI test: it takes minutes
to hours.

`--nvlm-export PATH` measures another checkout (a worktree at a fixed commit, with its own venv)
while the predictions come from this one; rerunning over a finished --work only reprints.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
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
NO_CHECK = ["--force", "--no-accuracy-check"]
# #21's bound for the stages that do not run the model (on the 3b checkpoint): flat in depth.
STREAMING_TARGET = 4 * 1024**3


def _quantize(precision: str, check: bool) -> Stage:
    """quantize PRECISION from the fp32 bundle, with or without the accuracy check.

    INT8/FP8 run the fp32 graphs to fit activation ranges either way; the check also runs the
    quantized bundle. INT4 with the check is what `build -p int4` makes (the vision graph in INT8
    from the calibration set: the plan's "quantize int4 + accuracy check"); without it, the
    weight-only path, it runs nothing.
    """
    name = f"quantize-{precision}" + ("" if check else "-nocheck")
    output = precision if check else f"{precision}-nocheck"
    weight_only = precision == "int4" and not check
    calib = [] if weight_only else ["--calib", "{work}/calib"]
    runs = ("fp32", output) if check else () if precision == "int4" else ("fp32",)
    return Stage(
        name,
        f"quantize {precision}" + (" + accuracy check" if check else ""),
        ["quantize", "{work}/fp32", "-p", precision, "-o", "{work}/" + output]
        + (QUANTIZE if check else NO_CHECK)
        + calib,
        output,
        runs,
    )


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
        "export-fp16-novalidate",
        "export fp16",
        ["export", "{ckpt}", "-o", "{work}/fp16-novalidate", "--dtype", "fp16", "--no-validate"],
        "fp16-novalidate",
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
    *(_quantize(p, check) for p in ("int8", "fp8", "int4") for check in (True, False)),
)


@dataclass
class Row:
    stage: str
    peak_bytes: int
    seconds: float
    cpu_seconds: float
    predicted_bytes: int
    graph_bytes: int
    exit_code: int
    commit: str
    started: str
    load: str  # 1-minute load average before and after the stage

    @property
    def target_bytes(self) -> int | None:
        """#21: a stage that runs the model holds at most 1.25 x its graphs + 1 GiB; one that
        does not stays under 4 GiB (stated for the 3b checkpoint; the bench must meet it too)."""
        if self.graph_bytes:
            return int(1.25 * self.graph_bytes + GiB)
        return STREAMING_TARGET

    @property
    def error(self) -> float:
        return self.predicted_bytes / self.peak_bytes - 1

    @property
    def ratio_to_graphs(self) -> float | None:
        return self.peak_bytes / self.graph_bytes if self.graph_bytes else None


def run_stage(stage: Stage, nvlm_export: str, fill: dict[str, str], work: Path, lock: str | None):
    """Run one stage under /usr/bin/time -v unless its .time file exists; returns its report."""
    timing = work / f"{stage.name}.time"
    if not finished(timing):
        meta = {"commit": checkout_commit(nvlm_export), "started": _now(), "load": [_load()]}
        if stage.output:
            shutil.rmtree(work / stage.output, ignore_errors=True)
        args = [a.format(**fill) for a in stage.args]
        command = ["/usr/bin/time", "-v", "-o", str(timing), nvlm_export, *args]
        if lock:
            command = ["flock", lock, *command]
        print(f"running {stage.name}: {' '.join(args)}", flush=True)
        with open(work / f"{stage.name}.log", "w") as log:
            subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
        meta["load"].append(_load())
        (work / f"{stage.name}.meta.json").write_text(json.dumps(meta) + "\n")
    return parse_time(timing.read_text())


def finished(timing: Path) -> bool:
    """GNU time creates its -o file when the stage starts and fills it when the stage ends."""
    return timing.is_file() and "Maximum resident set size" in timing.read_text()


def read_meta(work: Path, stage: Stage) -> dict:
    """The stage's commit, start and load; runs older than the .meta.json files have none."""
    path = work / f"{stage.name}.meta.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def checkout_commit(nvlm_export: str) -> str:
    """The commit of the checkout whose venv holds `nvlm_export` (+ if it has local changes)."""
    checkout = Path(nvlm_export).resolve().parent.parent.parent
    git = ["git", "-C", str(checkout)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "-uno"], capture_output=True, text=True)
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "") or "?"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def parse_time(text: str) -> tuple[int, float, float, int]:
    """Peak RSS in bytes, wall and CPU (user + sys) seconds and exit status from GNU time -v."""
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) * 1024
    clock = re.search(r"Elapsed \(wall clock\) time .*: ([\d:.]+)", text).group(1)
    seconds = 0.0
    for part in clock.split(":"):
        seconds = seconds * 60 + float(part)
    cpu = sum(
        float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", text).group(1))
        for kind in ("User", "System")
    )
    return rss, seconds, cpu, exit_code(text)


def exit_code(text: str) -> int:
    """The stage's exit code; 128 + N when signal N killed it (e.g. the kernel's OOM killer),
    which GNU time reports with a "Command terminated by signal" line and "Exit status: 0"."""
    killed = re.search(r"Command terminated by signal (\d+)", text)
    if killed:
        return 128 + int(killed.group(1))
    failed = re.search(r"Command exited with non-zero status (\d+)", text)
    if failed:
        return int(failed.group(1))
    status = re.search(r"Exit status: (\d+)", text)
    return int(status.group(1)) if status else 0


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
        if args.report_only and not finished(work / f"{stage.name}.time"):
            continue
        rss, seconds, cpu, code = run_stage(stage, args.nvlm_export, fill, work, args.lock)
        graphs = sum(graph_bytes(work / b) for b in stage.runs)
        predicted = memory.stages[stage.plan].peak_bytes
        meta = read_meta(work, stage)
        load = "–".join(f"{x:.1f}" for x in meta.get("load", []))
        rows.append(
            Row(
                stage.name,
                rss,
                seconds,
                cpu,
                predicted,
                graphs,
                code,
                meta.get("commit", "?"),
                meta.get("started", "?"),
                load or "?",
            )
        )
    return rows


def print_table(rows: list[Row]) -> None:
    print(
        "| stage | peak RSS | wall | CPU | predicted | error | graph bytes | peak / graphs "
        "| target | met | commit | started | load |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|")
    for r in rows:
        ratio = f"{r.ratio_to_graphs:.2f}" if r.ratio_to_graphs else "—"
        failed = "" if r.exit_code == 0 else f" (exit {r.exit_code})"
        met = "yes" if r.exit_code == 0 and r.peak_bytes <= r.target_bytes else "**no**"
        print(
            f"| {r.stage}{failed} | {r.peak_bytes / GiB:.2f} GiB | {_clock(r.seconds)} | "
            f"{_clock(r.cpu_seconds)} | {r.predicted_bytes / GiB:.2f} GiB | {r.error:+.0%} | "
            f"{r.graph_bytes / GiB:.2f} GiB | {ratio} | {r.target_bytes / GiB:.2f} GiB | {met} "
            f"| {r.commit} | {r.started} | {r.load} |"
        )


def _clock(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 60}:{whole % 60:02d}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--work", type=Path, required=True, help="Where bundles and logs go.")
    parser.add_argument("--stages", nargs="*", help="Only these stages (default: all).")
    parser.add_argument("--max-samples", type=int, default=4, help="Calibration requests.")
    parser.add_argument("--lock", help="Run each stage under `flock LOCK` (shared machines).")
    parser.add_argument("--nvlm-export", default=str(Path(sys.executable).parent / "nvlm-export"))
    parser.add_argument("--json", type=Path, help="Also write the rows here.")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="Run nothing: tabulate the stages already measured in --work (e.g. someone else's).",
    )
    args = parser.parse_args()
    machine = machine_description()
    rows = measure(args)
    print(f"\n{args.checkpoint} on {machine}\n")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
