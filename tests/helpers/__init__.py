"""Helpers shared by the test modules (not tests themselves; test modules never import each
other). `tests/` is on pytest's `pythonpath`, so tests import them as `helpers.<module>`."""

from __future__ import annotations

import pytest


def quiet(message: str) -> None:
    """A `warn=` callback for library calls whose warnings a test does not look at."""


def slow(value: object) -> object:
    """A parameter whose case runs only in the whole suite, not the fast lane (-m "not slow")."""
    return pytest.param(value, marks=pytest.mark.slow)
