"""Docstrings as `--help` text."""

from __future__ import annotations

import inspect


def reflowed(doc: str | None) -> str:
    """A docstring as `--help` text that wraps to any terminal width.

    Docstrings are wrapped at 100 columns for the source; Typer (rich mode) keeps their line
    breaks, so an 80-column terminal showed every line broken twice. Here the lines of each prose
    paragraph are joined (a "- " line still starts a new list item); indented paragraphs, the
    examples, keep their lines.
    """
    summary, *rest = (_reflow_paragraph(p) for p in inspect.cleandoc(doc or "").split("\n\n"))
    if not rest:
        return summary
    # Typer (rich mode) runs `inspect.cleandoc` over the text after the summary, which strips the
    # indentation that all its lines but the first share: the examples after a lone "Examples:"
    # line lost theirs. One more newline makes that text start with an empty first line, so the
    # heading counts and nothing is stripped (cleandoc then drops the empty line itself).
    return summary + "\n\n\n" + "\n\n".join(rest)


def _reflow_paragraph(paragraph: str) -> str:
    if paragraph.startswith((" ", "\b")):
        return paragraph  # an example or a block Typer must not touch
    items: list[str] = []  # one per list item; a plain paragraph is one item
    for line in paragraph.splitlines():
        if line.startswith(("- ", "* ")) or not items:
            items.append(line.strip())
        else:
            items[-1] += " " + line.strip()
    return "\n".join(items)
