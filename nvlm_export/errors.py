"""One error hierarchy for the whole project, mapped to exit codes at the CLI boundary.

Every error carries three parts so the CLI can print one line a user can act on:
what went wrong, why, and what to do about it.
"""

from __future__ import annotations

from collections.abc import Collection


class NvlmError(Exception):
    """Base class: an error the user can fix, printed as one line by the CLI."""

    exit_code = 1

    def __init__(self, what: str, *, why: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.why = why
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        parts = [self.what.rstrip(".")]
        if self.why:
            parts.append(self.why.rstrip("."))
        line = ": ".join(parts) + "."
        if self.fix:
            line += " " + self.fix.rstrip(".") + "."
        # Values from files and arguments may carry line breaks or terminal escapes: escaped,
        # the message stays the one line it promises.
        return "".join(
            ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in line
        )


class InputError(NvlmError):
    """Bad user input: a missing file, a malformed argument, an unusable image."""

    exit_code = 2


class ImageError(InputError):
    """An image that cannot be read or is unsafe to decode."""


class PromptError(InputError):
    """A prompt that does not fit the images or the model's context."""


class CheckpointError(InputError):
    """A checkpoint directory that is missing files or disagrees with its config."""


class BundleError(InputError):
    """A bundle that is missing, corrupt, or written by a newer, incompatible exporter."""


class MissingExtraError(NvlmError):
    """A command needs an optional dependency group that is not installed."""

    exit_code = 3


class ExportError(NvlmError):
    """Tracing or writing a graph failed."""

    exit_code = 4


class ValidationError(NvlmError):
    """A numerical comparison (export validation, verify, accuracy budget) failed."""

    exit_code = 5


def check_choice(
    value: object,
    choices: Collection[str],
    what: str,
    error: type[NvlmError] = InputError,
    *,
    fix: str | None = None,
) -> None:
    """Refuse a value that is not one of `choices`: "Unknown {what} '{value}'", listing them.
    With `fix` (a value the user did not choose, e.g. read from a bundle) they are the why."""
    if value in choices:
        return
    known = ", ".join(choices)
    named = f"Unknown {what} {value!r:.60}"  # repr: a crafted value stays on one short line
    if fix is None:
        raise error(named, fix=f"Choose one of: {known}")
    raise error(named, why=f"this nvlm-export knows {known}", fix=fix)


def require_extra(extra: str, *modules: str) -> None:
    """Fail with an install hint when an optional dependency group is missing.

    The core install carries only the runtime; export-side commands call this first so a user on a
    runtime-only machine gets a command to run instead of an ImportError traceback.
    """
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(
            f"This command needs the '{extra}' extra",
            why=f"{', '.join(missing)} is not installed",
            fix=f"Install it with: pip install 'nvlm-export[{extra}]'",
        )


def require_export_extra() -> None:
    require_extra("export", "torch", "transformers", "onnx", "safetensors")
