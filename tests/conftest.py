"""Shared fixtures: the tiny checkpoints and bundles every test module draws from, made once per
run (helpers/tiny.py). Helpers that are not fixtures live in the `helpers` package."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.tiny import TinyArtifacts, TinyBundle, shared_root


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory) -> TinyArtifacts:
    return TinyArtifacts(shared_root(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_artifacts: TinyArtifacts) -> Callable[[str], Path]:
    """`tiny_checkpoint(layout) -> checkpoint_dir` (seed 0), made once; read-only."""
    return tiny_artifacts.checkpoint


@pytest.fixture(scope="session")
def tiny_bundle(tiny_artifacts: TinyArtifacts) -> TinyBundle:
    """`tiny_bundle(layout, **export_settings) -> (checkpoint_dir, bundle_dir)`, made once.

    Bundles have a 1..6 tile budget unless `max_tiles` says otherwise, and are validated unless
    `validate=False`. Treat both directories as read-only: copy them before changing anything.
    """

    def get(layout: str, **settings: object) -> tuple[Path, Path]:
        return tiny_artifacts.checkpoint(layout), tiny_artifacts.bundle(layout, **settings)

    return get
