"""Crash- and race-safe output directories. Every command that writes one goes through here.

For an output path `out/` the writer uses three hidden siblings, all named after `out`:

    .out.lock       exclusive `flock` held for the whole run; holds the writer's pid
    .out.partial/   the staging directory; everything is written here
    .out.old/       the previous output, only during the two renames that replace it

`staged_output` takes the lock (a second writer of the same output fails at once), refuses unsafe
paths before any work, removes what a killed writer left (nothing else can own it while we hold
the lock), and hands out the staging directory. The caller writes its marker file (a bundle's
manifest.json, a calibration set's calibration.json, a checkpoint's config.json) last, after
validation, and calls `publish()`, which gives the files the usual umask permissions (safetensors
and onnx create some as 0600) and renames the staging directory into place. A directory without
its marker is never published, so an interrupted run never leaves anything that loads.

`flock` rather than a pid file: the kernel releases it when the holder dies (even by SIGKILL), so a
free lock proves a leftover is stale. It needs a local file system (Linux ext4/xfs/tmpfs; NFS
emulates it with byte-range locks).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from nvlm_export.errors import ExportError, InputError
from nvlm_export.runtime.manifest import MANIFEST_NAME, Manifest


@dataclass(frozen=True)
class OutputKind:
    """What a command writes, and the file whose presence makes a directory one of them."""

    noun: str
    marker: str

    def holds(self, directory: Path) -> bool:
        return (directory / self.marker).is_file()


BUNDLE = OutputKind("bundle", MANIFEST_NAME)
CHECKPOINT = OutputKind("checkpoint", "config.json")


def sibling(out: Path, role: str) -> Path:
    """The hidden file or directory `.NAME.role` beside `out`."""
    return out.parent / f".{out.name}.{role}"


# --- the lock -----------------------------------------------------------------------------------


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the exclusive lock of output `out`, or fail at once if another process holds it.

    Used alone by commands that update an output in place (`engine` adds engines to a bundle).
    The lock file is removed on release, while still held, and a lock taken on a file that was
    removed meanwhile is retried, so whoever holds the file at the path is the one owner.
    """
    path = sibling(Path(out), "lock")
    fd = _acquire(path, Path(out))
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _acquire(path: Path, out: Path) -> int:
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as error:
            raise InputError(
                f"Cannot write output '{out}'",
                why=f"{error.strerror}: {error.filename}",
                fix="Choose a directory you can write to",
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise InputError(
                f"Another nvlm-export process{f' (pid {holder})' if holder else ''} is writing "
                f"'{out}'",
                why=f"it holds {path}; two writers of one output would lose one's work",
                fix="Wait for it to finish, or choose another output path",
            ) from None
        if _is_current(fd, path):
            return fd
        os.close(fd)  # the previous holder removed this file as we locked it: lock the new one


def _is_current(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


# --- staging and publishing ---------------------------------------------------------------------


@dataclass(frozen=True)
class StagedOutput:
    out: Path
    kind: OutputKind
    path: Path  # the staging directory to write into

    def publish(self) -> None:
        """Move the finished staging directory to `out` (the previous output goes only after)."""
        if not self.kind.holds(self.path):
            raise ExportError(
                f"Internal error: the {self.kind.noun} for '{self.out}' has no {self.kind.marker}",
                why="an output is only published after its marker file is written",
                fix="Report this with the command line",
            )
        apply_umask_permissions(self.path)
        old = sibling(self.out, "old")
        if self.out.exists() or self.out.is_symlink():
            self.out.rename(old)
        self.path.rename(self.out)
        _remove(old)


@contextmanager
def staged_output(
    out: Path, kind: OutputKind, *, overwrite: bool, sources: Sequence[Path] = ()
) -> Iterator[StagedOutput]:
    """Lock `out`, check it, and yield a fresh staging directory; see the module docstring.

    `sources` are the command's inputs: `out` may not equal, contain or lie inside one of them.
    Nothing is left at the staging path afterwards, whether the body published or failed.
    """
    out = Path(out)
    refuse_unsafe_location(out, sources)
    with output_lock(out):
        _remove_leftovers(out)
        check_output(out, kind, overwrite)
        staged = StagedOutput(out, kind, sibling(out, "partial"))
        staged.path.mkdir()
        try:
            yield staged
        finally:
            shutil.rmtree(staged.path, ignore_errors=True)


def publish_bundle(staged: StagedOutput, manifest: Manifest) -> Manifest:
    """The last step of every bundle writer: the manifest (with the size and SHA-256 of every
    file written before it), then the rename into place. Returns the manifest as written."""
    recorded = manifest.save(staged.path)
    staged.publish()
    return recorded


def _remove_leftovers(out: Path) -> None:
    """Clean up after a writer that was killed (we hold the lock, so none is running)."""
    old, partial = sibling(out, "old"), sibling(out, "partial")
    if old.exists() or old.is_symlink():
        if out.exists():
            _remove(old)  # killed after the new output was in place
        else:
            old.rename(out)  # killed between the two renames: the previous output comes back
    if partial.exists():
        print(f"note: removing {partial}, left by an interrupted run", file=sys.stderr)
        _remove(partial)


def _remove(path: Path) -> None:
    """Remove a directory tree, or just the link when `out` was a symlink (not its target)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


# --- checks before any work ---------------------------------------------------------------------


def refuse_unsafe_location(out: Path, sources: Sequence[Path] = ()) -> None:
    """`out` is replaced as a whole at the end: it may not hold the working directory, and may
    not overlap an input (equal to it, inside it, or containing it)."""
    target = Path(out).resolve()
    here = Path.cwd().resolve()
    if target == here or target in here.parents:
        raise InputError(
            f"Output '{out}' is the current directory or contains it",
            why="the output directory is replaced as a whole when the work is done",
            fix="Choose an output path outside the current directory, or run from elsewhere",
        )
    for source in sources:
        resolved = Path(source).resolve()
        if target == resolved or resolved in target.parents or target in resolved.parents:
            raise InputError(
                f"Output '{out}' overlaps the input '{source}'",
                why="it would be written inside the input, or replace it",
                fix="Choose an output path outside the input",
            )


def check_output(out: Path, kind: OutputKind, overwrite: bool) -> None:
    """Refuse to write over anything but an empty directory or (with --overwrite) a `kind`."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(
            f"Output '{out}' is a file", fix=f"Choose a directory path for the {kind.noun}"
        )
    if not any(out.iterdir()):
        return
    if not kind.holds(out):
        raise InputError(
            f"Output directory '{out}' exists and is not a {kind.noun}",
            why="refusing to replace a directory nvlm-export did not write",
            fix="Choose another output path or empty it",
        )
    if not overwrite:
        raise InputError(
            f"{kind.noun.capitalize()} '{out}' already exists",
            fix="Pass --overwrite to replace it, or choose another path",
        )


def make_directory(path: Path, what: str) -> Path:
    """Create the directory `path` (and its parents) that `what` is written into, before the work
    that fills it: a file in the way or a place that cannot be written is one InputError now, not
    an internal error after the work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"Output '{path}' is a file", fix=f"Choose a directory path for {what}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(
            f"Cannot create the output directory '{path}'",
            why=error.strerror or str(error),
            fix=f"Choose a writable directory for {what}",
        ) from None
    return path


# --- permissions --------------------------------------------------------------------------------


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask_permissions(root: Path) -> None:
    """Give `root` (a file, or a directory and everything under it) the permissions a plain
    `open`/`mkdir` would.

    safetensors and onnx's external-data writer create files as 0600 and mkdtemp makes 0700
    directories, so a deploy user could not read a bundle or checkpoint another user wrote.
    Executable files keep their execute bits (within the umask).
    """
    mask = current_umask()
    root = Path(root)
    if not root.is_dir():
        root.chmod(0o666 & ~mask)
        return
    root.chmod(0o777 & ~mask)
    for directory, subdirs, files in os.walk(root):
        for path in (Path(directory, name) for name in subdirs + files):
            if path.is_symlink():
                continue  # a link's target is not ours to change
            executable = path.is_dir() or path.stat().st_mode & 0o100
            path.chmod((0o777 if executable else 0o666) & ~mask)
