"""Shared fixtures. Exporting a tiny checkpoint takes seconds, so every test module that needs a
tiny bundle shares one per (layout, settings) for the whole session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

TinyBundle = Callable[..., tuple[Path, Path]]


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> TinyBundle:
    """`tiny_bundle(layout, **export_settings) -> (checkpoint_dir, bundle_dir)`, made once.

    Treat both directories as read-only: copy them before changing anything.
    """
    checkpoints: dict[str, Path] = {}
    bundles: dict[tuple[str, tuple[tuple[str, object], ...]], Path] = {}

    def get(layout: str, **settings: object) -> tuple[Path, Path]:
        from nvlm_export.export.bundle import ExportSettings, export_bundle
        from nvlm_export.models.tiny import make_tiny_checkpoint

        if layout not in checkpoints:
            checkpoints[layout] = tmp_path_factory.mktemp(f"ckpt-{layout}") / "ckpt"
            make_tiny_checkpoint(checkpoints[layout], layout, seed=0)
        key = (layout, tuple(sorted(settings.items())))
        if key not in bundles:
            bundles[key] = tmp_path_factory.mktemp(f"bundle-{layout}") / "bundle"
            export_bundle(checkpoints[layout], bundles[key], ExportSettings(**settings), quiet=True)
        return checkpoints[layout], bundles[key]

    return get
