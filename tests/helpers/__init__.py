"""Helpers shared by the test modules (not tests themselves; test modules never import each
other). `tests/` is on pytest's `pythonpath`, so tests import them as `helpers.<module>`."""


def quiet(message: str) -> None:
    """A `warn=` callback for library calls whose warnings a test does not look at."""
