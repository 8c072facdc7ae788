"""Progress for long work: one line per stage on stderr, with its duration.

    with Stages("Exporting model/ to bundle/") as stages:
        with stages.stage("vision graph"):
            ...

A stage shows a spinner while it runs (on a terminal) and leaves a line "✓ vision graph  3.2 s",
or "✗ vision graph" when it fails. Output goes to stderr so `--json` results on stdout stay clean.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape

_console = Console(stderr=True, soft_wrap=True)  # a line per message, also in CI logs


class Stages:
    """A titled sequence of timed stages. `seconds` keeps each stage's duration for summaries."""

    def __init__(self, title: str, *, quiet: bool = False, console: Console | None = None) -> None:
        self.title = title
        self.quiet = quiet
        self.console = console or _console
        self.seconds: dict[str, float] = {}

    def __enter__(self) -> Stages:
        self._print(f"[bold]{escape(self.title)}[/]")
        return self

    def __exit__(self, *_: object) -> None:
        return None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            if self.quiet or not self.console.is_terminal:
                yield
            else:
                with self.console.status(f"{escape(name)}…"):
                    yield
        except BaseException:
            self._print(f"  [red]✗[/] {escape(name)}")
            raise
        self.seconds[name] = time.perf_counter() - start
        self._print(f"  [green]✓[/] {escape(name)}  [dim]{self.seconds[name]:.1f} s[/]")

    def note(self, text: str) -> None:
        self._print(f"    [dim]{escape(text)}[/]")

    def _print(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, highlight=False)
