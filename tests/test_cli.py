"""The CLI as a whole: version, help, and what a runtime-only install says about export commands."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from nvlm_export import __version__
from nvlm_export.cli import app
from nvlm_export.commands.helptext import reflowed

runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"nvlm-export {__version__}"


def test_help_lists_every_command_group() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("tile", "run", "export", "verify", "make-tiny", "engine", "lint", "capi"):
        assert command in result.stdout


# Runs the CLI with the export-side packages made unimportable, as on a runtime-only install.
RUNTIME_ONLY = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "onnx", "safetensors"):
                raise ImportError(name)
            return None

    sys.meta_path.insert(0, Block())
    import importlib.util
    real_find_spec = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] in (
        "torch", "transformers", "onnx", "safetensors") else real_find_spec(name, *a)
    sys.argv = ["nvlm-export", *sys.argv[1:]]
    from nvlm_export.cli import main
    main()
    """
)


@pytest.mark.parametrize(
    "args",
    [
        ["export", "ckpt", "-o", "out"],
        ["make-tiny", "--layout", "nvlm-d", "-o", "out"],
        ["verify", "ckpt", "bundle"],
    ],
)
def test_export_commands_name_the_missing_extra(args: list[str], tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", RUNTIME_ONLY, *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert "pip install 'nvlm-export[export]'" in result.stderr


def test_runtime_commands_work_without_the_export_extra(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", RUNTIME_ONLY, "tile", "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert '"num_tiles"' in result.stdout or '"tiles"' in result.stdout


def test_help_prose_wraps_to_the_terminal_and_examples_keep_their_lines() -> None:
    """Docstrings are wrapped at 100 columns in the source; at 80 columns `--help` must not break
    every sentence twice (once at 100, again at 80)."""
    doc = """Summary line.

    First sentence wraps here
    and goes on here.

    - one item
      continued
    - two

    Example:

      nvlm-export run b/ --image x.png
      nvlm-export run b/ --image y.png
    """
    assert reflowed(doc).split("\n\n") == [
        "Summary line.",
        "\nFirst sentence wraps here and goes on here.",  # the newline: see the next test
        "- one item continued\n- two",
        "Example:",
        "  nvlm-export run b/ --image x.png\n  nvlm-export run b/ --image y.png",
    ]
    result = runner.invoke(app, ["quantize", "--help"], terminal_width=80, env={"COLUMNS": "80"})
    lines = [line.strip() for line in result.output.splitlines()]
    # The docstring's line break after "(vision-feature" (at 100 columns) is gone.
    assert not any(line.endswith("(vision-feature") for line in lines)
    assert "nvlm-export quantize bundle/ --precision int8 --calib calib/ -o bundle-int8/" in lines


def _commands(
    group: click.Command, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], click.Command]]:
    found = [(path, group)] if path else []
    for name, command in getattr(group, "commands", {}).items():
        found += _commands(command, (*path, name))
    return found


@pytest.mark.parametrize(
    ("path", "command"),
    _commands(typer.main.get_command(app)),
    ids=lambda value: " ".join(value) if isinstance(value, tuple) else "help",
)
def test_help_examples_keep_their_indentation(
    path: tuple[str, ...], command: click.Command
) -> None:
    """Typer dedents the text after the summary line as one block: with nothing but a heading
    line before them, the examples lost their indentation (`run`, `profile`, `capi build`)."""
    examples = [line for line in (command.help or "").splitlines() if line.startswith("  ")]
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    shown = result.output.splitlines()
    for example in examples:
        assert any(line.startswith(" " + example.rstrip()) for line in shown), example


def test_build_options_reach_the_build_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from nvlm_export.export import build as build_module

    seen = {}

    def record(model_dir: Path, output: Path, settings: object, warn: object) -> None:
        seen["settings"] = settings
        raise typer.Exit()

    monkeypatch.setattr(build_module, "build", record)
    out = str(tmp_path / "out")
    args = ["build", str(tmp_path), "-p", "int4", "-o", out, "--images", "x/*", "-t", "orin"]
    args += ["--max-samples", "3", "--seed", "5", "--exclude", "lm_head", "--exclude", "*.mlp.*"]
    args += ["--keep-lm-head", "--accuracy-requests", "2", "--force", "--overwrite"]
    args += ["--no-validate", "--no-accuracy-check"]
    assert runner.invoke(app, args).exit_code == 0
    settings = seen["settings"]
    calibration, quantize = settings.calibration, settings.quantize
    assert (settings.precision, calibration.images, settings.target) == ("int4", "x/*", "orin")
    assert (calibration.max_samples, calibration.seed, quantize.accuracy_requests) == (3, 5, 2)
    assert quantize.exclude == ("lm_head", "*.mlp.*") and quantize.lm_head == "float"
    assert settings.force and quantize.force and settings.overwrite
    assert not settings.validate and not quantize.check_accuracy
    assert settings.backend == "onnxruntime" and calibration.decode_steps == 4  # defaults


@pytest.mark.parametrize(
    ("make", "said"), [(None, "does not exist"), ("file", "is not a directory")]
)
def test_export_of_something_that_is_not_a_checkpoint_says_so(
    tmp_path, make: str | None, said: str
) -> None:
    """A typo'd path used to be told to save its tokenizer with transformers."""
    target = tmp_path / "model"
    if make == "file":
        target.write_text("{}")
    result = runner.invoke(app, ["export", str(target), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert f"Checkpoint '{target}' {said}" in result.output and "tokenizer" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["profile", "bundle"], ["capi", "build"]])
def test_an_output_directory_that_cannot_be_made_is_refused_before_the_work(
    tmp_path, command: list[str]
) -> None:
    """`profile -o` used to profile for minutes, then stop with an internal FileExistsError."""
    in_the_way = tmp_path / "report"
    in_the_way.write_text("a file")
    result = runner.invoke(app, [*command, "-o", str(in_the_way)])
    assert result.exit_code == 2, result.output
    assert f"Output '{in_the_way}' is a file" in result.output and "internal" not in result.output


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["verify", "ckpt", "bundle", "--steps", "0"], "--steps"),  # checked nothing, passed
        (["run", "bundle", "-p", "hi", "--threads", "-1"], "--threads"),
        (["run", "bundle", "-p", "hi", "--seed", "-1"], "--seed"),  # an internal error, late
        (["export", "ckpt", "-o", "out", "--max-tiles", "0"], "--max-tiles"),  # recorded 0
        (["export", "ckpt", "-o", "out", "--opset", "25"], "--opset"),  # after the vision graph
        (["profile", "bundle", "--bandwidth-gbs", "-5"], "--bandwidth-gbs"),  # -42 % of bound
    ],
)
def test_impossible_option_values_are_refused_before_any_work(
    tmp_path, args: list[str], option: str
) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output


def test_an_impossible_accuracy_budget_is_refused_before_the_check_runs() -> None:
    from nvlm_export.errors import InputError
    from nvlm_export.export.accuracy import Thresholds

    with pytest.raises(InputError, match="min_cosine 2 is impossible"):
        Thresholds(min_cosine=2, min_top1=0.5, max_kl=0.1)
    with pytest.raises(InputError, match="max_kl -1 is impossible"):
        Thresholds(min_cosine=0.9, min_top1=0.5, max_kl=-1)


def test_progress_lines_stay_one_line_each_outside_a_terminal(capsys) -> None:
    """In a CI log (no terminal) rich wrapped at 80 columns, splitting a line a grep looks for."""
    from nvlm_export.progress import Stages

    long_note = "vision.image_features cosine 1.000000 ok; " * 4
    with Stages("Quantizing bundle/ → out/") as stages:
        stages.note(long_note)
    assert long_note.strip() in capsys.readouterr().err


def test_build_dry_run_checks_the_target_and_takes_precision_as_the_docs_write_it(
    tiny_checkpoint, tmp_path
) -> None:
    """`-p INT4` (as the docs write precisions) is int4, and --dry-run refuses what the build
    would: INT4 on an Orin, whose TensorRT cannot read INT4's opset."""
    checkpoint = tiny_checkpoint("nvlm-d")
    out = str(tmp_path / "out")
    args = ["build", str(checkpoint), "-o", out, "--target", "orin", "--dry-run"]
    refused = runner.invoke(app, [*args, "-p", "INT4"])
    assert refused.exit_code == 2 and "orin cannot run INT4 engines" in refused.output
    assert runner.invoke(app, [*args, "-p", "INT8"]).exit_code == 0
