"""The README's main command works as written: build an INT8 bundle of the built-in demo model,
then ask it the README's question about the shipped example image and get the true answer."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from nvlm_export.demo import example_questions

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def quick_start_commands() -> list[list[str]]:
    """The `nvlm-export` commands of the README's first quick-start step, as argument lists."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.S)
    assert block, "README.md has no quick-start code block"
    step_one = block.group(1).split("\n\n")[0]
    return [
        shlex.split(line)
        for line in step_one.splitlines()
        if line.startswith(".venv/bin/nvlm-export ")
    ]


@pytest.mark.slow
def test_readme_builds_an_int8_demo_bundle_that_answers_the_example_question(
    tmp_path: Path,
) -> None:
    build, run = quick_start_commands()
    assert build[1:4] == ["build", "--precision", "int8"]
    output = tmp_path / build[build.index("-o") + 1]
    build[build.index("-o") + 1] = str(output)
    run[2] = str(output)

    for command in (build, run):
        command[0] = str(BIN / "nvlm-export")
    built = subprocess.run(build, cwd=ROOT, capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr  # 0: within the accuracy budget
    graphs = json.loads((output / "manifest.json").read_text())["graphs"]
    assert {g["precision"] for g in graphs.values()} == {"int8"}

    answered = subprocess.run(run, cwd=ROOT, capture_output=True, text=True)
    assert answered.returncode == 0, answered.stderr
    question = run[run.index("--prompt") + 1]
    truth = dict(example_questions())[question]
    assert answered.stdout.strip() == truth


def test_readme_fast_lane_leaves_out_the_slow_tests() -> None:
    readme = (ROOT / "README.md").read_text()
    lane = re.search(r'`\.venv/bin/pytest (-m "not slow")` is the fast lane', readme)
    assert lane, "README.md names no fast lane"
    options = [*shlex.split(lane.group(1)), "--collect-only", "-q", "-p", "no:cacheprovider"]
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", *options, __file__],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert collected.returncode == 0, collected.stdout + collected.stderr
    assert test_readme_fast_lane_leaves_out_the_slow_tests.__name__ in collected.stdout
    slow = test_readme_builds_an_int8_demo_bundle_that_answers_the_example_question.__name__
    assert slow not in collected.stdout and "1 deselected" in collected.stdout
