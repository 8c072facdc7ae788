"""The tree is ruff clean (lint and format, Markdown examples included), so CI catches drift."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_is_clean(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_test_modules_share_code_through_helpers_not_each_other() -> None:
    """A test module imported by another runs its tests twice and couples unrelated files: shared
    code lives in tests/helpers (and fixtures in conftest.py)."""
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [
                f"{path.relative_to(ROOT)} imports {name}"
                for name in names
                if name.split(".")[0].startswith("test_") or name.split(".")[0] == "conftest"
            ]
    assert offenders == []
