"""Outputs are crash- and race-safe (#16 findings 2, 3, 7) and readable by others (#21 item 6).

Every command that writes an output directory goes through `nvlm_export.output`: one locked
staging directory per output name, the marker (manifest) written last, one rename into place.
The concurrency and SIGKILL cases run real `nvlm-export` processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nvlm_export.errors import BundleError, InputError
from nvlm_export.export import bundle as bundle_module
from nvlm_export.export.bundle import ExportSettings, export_bundle
from nvlm_export.output import OutputKind, output_lock, staged_output
from nvlm_export.runtime.manifest import MANIFEST_NAME
from nvlm_export.runtime.pipeline import Pipeline

EXE = str(Path(sys.executable).with_name("nvlm-export"))
NOTE = OutputKind("note", "note.txt")  # a one-file output kind for the fast unit tests


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def hidden_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.fixture(scope="module")
def checkpoint(tiny_bundle) -> Path:
    return tiny_bundle("nvlm-d")[0]


@pytest.fixture(scope="module")
def exported(tiny_bundle) -> Path:
    return tiny_bundle("nvlm-d")[1]


# --- one writer per output ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_export_of_the_same_output_fails_at_once(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with output_lock(out):  # another writer (this test process) is at work on `out`
        result = cli("export", str(checkpoint), "-o", str(out))
    line = one_error_line(result)  # one line on stderr: not even the first stage started
    assert f"Another nvlm-export process (pid {os.getpid()}) is writing '{out}'" in line
    assert "Wait for it to finish" in line
    assert not out.exists()
    assert hidden_leftovers(tmp_path) == []  # the lock is released and its file removed


@pytest.mark.parametrize("command", ["calibrate", "quantize", "make-tiny", "build"])
def test_every_writer_takes_the_output_lock(
    command: str, checkpoint: Path, exported: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from nvlm_export.cli import app

    out = tmp_path / "out"
    locked, args = {
        "calibrate": (out, ["calibrate", str(exported), "-o", str(out)]),
        "quantize": (out, ["quantize", str(exported), "--precision", "int4", "-o", str(out)]),
        "make-tiny": (out, ["make-tiny", "--layout", "internvl", "-o", str(out)]),
        "build": (tmp_path / ".out.build", ["build", str(checkpoint), "-pint4", "-o", str(out)]),
    }[command]
    with output_lock(locked):
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "is writing" in result.output
    assert not out.exists()


@pytest.mark.slow
def test_two_concurrent_exports_one_writes_the_other_fails_with_one_line(
    checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bundle"
    args = [EXE, "export", str(checkpoint), "-o", str(out)]
    runs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    time.sleep(0.2)
    runs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [subprocess.CompletedProcess(r.args, r.wait(300), *r.communicate()) for r in runs]
    written = [r for r in results if "Bundle written" in r.stdout]
    refused = [r for r in results if r.returncode != 0]
    assert len(written) == 1 and len(refused) == 1, [r.stderr for r in results]
    line = one_error_line(refused[0])
    assert "is writing" in line or "already exists" in line
    assert Pipeline.load(out).generate("Hi", max_new_tokens=2).run().token_ids
    assert hidden_leftovers(tmp_path) == []


# --- killed runs --------------------------------------------------------------------------------


def wait_for(condition, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.slow
def test_a_killed_export_leaves_no_bundle_and_the_next_run_cleans_up(
    checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bundle"
    run = subprocess.Popen(
        [EXE, "export", str(checkpoint), "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # The tokenizer is copied last, right before validation starts: kill during validation, the
    # point after which an export used to have written its manifest.
    wait_for(lambda: any(tmp_path.glob(".bundle.partial*/tokenizer/tokenizer.json")))
    time.sleep(0.5)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    leftovers = [p for p in tmp_path.glob(".bundle.partial*") if p.is_dir()]
    assert leftovers and not out.exists()
    for leftover in leftovers:
        assert not (leftover / MANIFEST_NAME).exists()
        with pytest.raises(BundleError, match="is not a bundle"):
            Pipeline.load(leftover)

    result = cli("export", str(checkpoint), "-o", str(out), "--no-validate")
    assert result.returncode == 0, result.stderr
    assert "left by an interrupted run" in result.stderr
    assert hidden_leftovers(tmp_path) == []
    assert Pipeline.load(out).manifest.architecture == "nvlm-d"


def test_a_stale_staging_directory_and_lock_are_removed_at_the_next_start(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (tmp_path / ".out.partial").mkdir()
    (tmp_path / ".out.partial" / "half.onnx.data").write_bytes(b"\0" * 1024)
    (tmp_path / ".out.lock").write_text("12345\n")  # its holder died: the lock itself is free
    with staged_output(out, NOTE, overwrite=False) as staged:
        assert list(staged.path.iterdir()) == []
        (staged.path / "note.txt").write_text("new")
        staged.publish()
    assert (out / "note.txt").read_text() == "new"
    assert hidden_leftovers(tmp_path) == []


def test_killed_between_the_two_renames_the_previous_output_comes_back(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (tmp_path / ".out.old").mkdir()  # `out` was moved aside, the new one never moved in
    (tmp_path / ".out.old" / "note.txt").write_text("previous")
    # The next writer puts it back first, so without --overwrite it is refused like any output.
    writer = staged_output(out, NOTE, overwrite=False)
    with pytest.raises(InputError, match="already exists"), writer:
        pass
    assert (out / "note.txt").read_text() == "previous"
    assert hidden_leftovers(tmp_path) == []


def test_a_failed_writer_keeps_the_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "note.txt").write_text("previous")
    with pytest.raises(RuntimeError), staged_output(out, NOTE, overwrite=True) as staged:
        (staged.path / "note.txt").write_text("half")
        raise RuntimeError("the work failed")
    assert (out / "note.txt").read_text() == "previous"
    assert hidden_leftovers(tmp_path) == []


@pytest.mark.slow
def test_the_manifest_is_written_after_validation(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = {}
    validate = bundle_module.validate_bundle

    def watching(staging: Path, *args, **kwargs):
        seen["manifest"] = (staging / MANIFEST_NAME).exists()
        with pytest.raises(BundleError):
            Pipeline.load(staging)  # a kill now would leave nothing that loads
        return validate(staging, *args, **kwargs)

    monkeypatch.setattr(bundle_module, "validate_bundle", watching)
    report = export_bundle(checkpoint, tmp_path / "bundle", quiet=True)
    assert seen == {"manifest": False}
    assert report.validation is not None and report.validation.passed
    assert (tmp_path / "bundle" / MANIFEST_NAME).is_file()


# --- unsafe output paths, refused before any work -----------------------------------------------


@pytest.mark.slow
def test_output_that_is_or_holds_the_current_directory_is_refused(
    checkpoint: Path, exported: Path, tmp_path: Path
) -> None:
    inside = shutil.copytree(exported, tmp_path / "bundle")
    before = sorted(p.name for p in inside.iterdir())
    for target in (".", ".."):
        line = one_error_line(
            cli("export", str(checkpoint), "-o", target, "--overwrite", cwd=inside)
        )
        assert "is the current directory or contains it" in line
    assert sorted(p.name for p in inside.iterdir()) == before
    assert Pipeline.load(inside).manifest.architecture == "nvlm-d"


@pytest.mark.slow
def test_output_that_overlaps_the_input_is_refused(checkpoint: Path, exported: Path) -> None:
    line = one_error_line(cli("export", str(checkpoint), "-o", str(checkpoint / "bundle")))
    assert f"overlaps the input '{checkpoint}'" in line
    line = one_error_line(
        cli("quantize", str(exported), "--precision", "int4", "-o", str(exported), "--overwrite")
    )
    assert "overlaps the input" in line
    assert not (checkpoint / "bundle").exists()


# --- permissions (#21 item 6) -------------------------------------------------------------------


def modes(root: Path) -> dict[str, int]:
    """Permission bits of `root` (as ".") and of everything under it."""
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]
    }


@pytest.mark.slow
def test_bundles_follow_the_umask_even_for_files_libraries_create_private(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nvlm_export.export import qdq
    from nvlm_export.export.quantize import QuantizeSettings, quantize_bundle

    # onnx's external-data writer creates `<graph>.onnx.data` as 0600; force it for a tiny graph.
    monkeypatch.setattr(qdq, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "int4"
    with umask(0o022):
        quantize_bundle(exported, out, QuantizeSettings("int4", force=True), None, quiet=True)
    found = modes(out)
    assert "decoder.onnx.data" in found
    assert found == {name: 0o755 if (out / name).is_dir() else 0o644 for name in found}


@pytest.mark.slow
def test_checkpoints_and_exports_follow_a_stricter_umask_too(
    checkpoint: Path, tmp_path: Path
) -> None:
    with umask(0o027):
        made = cli("make-tiny", "--layout", "internvl", "-o", str(tmp_path / "ckpt"))
        export_bundle(checkpoint, tmp_path / "bundle", ExportSettings(validate=False), quiet=True)
    assert made.returncode == 0, made.stderr
    for root in (tmp_path / "ckpt", tmp_path / "bundle"):
        found = modes(root)
        assert any(name.endswith((".safetensors", ".onnx")) for name in found)
        expected = {n: 0o750 if (root / n).is_dir() else 0o640 for n in found}
        assert found == expected, root
