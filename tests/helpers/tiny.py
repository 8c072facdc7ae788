"""Tiny checkpoints and their exported bundles, made once per test run and shared.

Exporting a tiny checkpoint takes seconds, and most test modules need one per layout: every
(layout, export settings) pair is exported once per run, also across pytest-xdist workers (which
share the run's base temp directory and wait on a file lock per artifact).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# Every tiny bundle gets a 1..6 tile budget unless a test asks otherwise, whatever the layout's
# own max_dynamic_patch (12 for internvl), so the same images tile the same way in every layout.
MAX_TILES = 6
SEED = 0

# The `tiny_bundle` fixture: (layout, **export_settings) -> (checkpoint_dir, bundle_dir).
TinyBundle = Callable[..., tuple[Path, Path]]


class TinyArtifacts:
    """`checkpoint(layout)` and `bundle(layout, **export_settings)`: read-only, made on first use.

    Copy a directory before changing anything in it: other tests get the same one.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def checkpoint(self, layout: str) -> Path:
        from nvlm_export.models.tiny import make_tiny_checkpoint

        path = self.root / layout / "ckpt"
        with _locked(self.root / f"{layout}.lock"):
            if not (path / "config.json").is_file():
                make_tiny_checkpoint(path, layout, seed=SEED)
        return path

    def bundle(self, layout: str, *, validate: bool = True, **settings: object) -> Path:
        """The bundle of `checkpoint(layout)` exported with `settings` (ExportSettings fields).

        A validated bundle also serves `validate=False`; the reverse exports again.
        """
        from nvlm_export.export.bundle import ExportSettings, export_bundle

        settings = {"max_tiles": MAX_TILES, **settings}
        checkpoint = self.checkpoint(layout)
        folder = self.root / layout / _slug(settings)
        with _locked(folder.parent / f"{folder.name}.lock"):
            for name in ("bundle",) if validate else ("bundle", "bundle-unvalidated"):
                if (folder / name / "manifest.json").is_file():
                    return folder / name
            bundle = folder / ("bundle" if validate else "bundle-unvalidated")
            export = ExportSettings(validate=validate, **settings)  # type: ignore[arg-type]
            export_bundle(checkpoint, bundle, export, quiet=True)
        return bundle


def shared_root(basetemp: Path) -> Path:
    """The directory every worker of this run sees: xdist workers get basetemp/popen-gwN."""
    root = basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp
    return root / "tiny-artifacts"


def _slug(settings: dict[str, object]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(settings.items()))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
