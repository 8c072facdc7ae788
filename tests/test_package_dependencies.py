"""The packages depend on each other in one direction, read from the source (ast), not run.

    errors, progress, compare, assets,  the base (with the root's __version__): imported by anyone
    defaults
    runtime                             torch-free inference; imports only the base
    output                              staged, crash-safe outputs (reads the manifest type)
    models                              checkpoints, the architecture registry, PyTorch models
    calibration, profiling, capi        on top of the runtime; never models or export
    export                              models + calibration -> bundles
    handoff, demo                       the PyTorch side beside export
    commands, cli                       the CLI: may use everything

`models` (and so torch) is imported only by the PyTorch side: export, handoff, demo and the
commands that run them. Imports under `if TYPE_CHECKING:` are not counted (they never run);
families named by "module:attribute" strings (`ArchitectureSpec.model` / `.export`) are resolved
at run time by the side that needs them and are not imports either.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import nvlm_export

ROOT = Path(nvlm_export.__file__).parent
BASE = {"__init__", "errors", "progress", "compare", "assets", "defaults"}  # __init__: version
# top-level package -> the packages it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "progress": {"errors"},
    "compare": {"errors"},
    "assets": set(),
    "defaults": set(),
    "runtime": BASE,
    "output": BASE | {"runtime"},
    "models": BASE | {"runtime", "output"},
    "calibration": BASE | {"runtime", "output"},
    "profiling": BASE | {"runtime", "output"},
    "capi": BASE | {"runtime", "output"},
    "export": BASE | {"runtime", "output", "models", "calibration"},
    "handoff": BASE | {"runtime", "output", "models", "profiling"},
    "demo": BASE | {"runtime", "output", "models"},
    "commands": BASE
    | {"runtime", "output", "models", "calibration", "profiling", "capi", "export"}
    | {"handoff", "demo"},
    "cli": BASE | {"commands"},
    "__init__": set(),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
        # `from package import module` imports the submodule; `from module import name` the module
        submodules = [f"{node.module}.{alias.name}" for alias in node.names]
        return [name for name in submodules if name in MODULES] or [node.module]
    return []


def imports_of(module: str) -> set[str]:
    """The nvlm_export modules `module` imports, at any depth of its code (deferred imports in
    functions count: they run), except under `if TYPE_CHECKING:`."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        found.update(n for n in _imported(node) if n.split(".")[0] == "nvlm_export")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(MODULES[module].read_text(encoding="utf-8")))
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imports_of(module) for module in MODULES}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.mark.parametrize("package", sorted({package_of(m) for m in MODULES}))
def test_packages_import_only_downwards(package: str) -> None:
    assert package in ALLOWED, f"{package} is not placed in the dependency order above"
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if package_of(module) == package
        for target in targets
        if package_of(target) != package and package_of(target) not in ALLOWED[package]
    )
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_between_modules() -> None:
    """Deferred (function-level) imports count: a cycle hidden in a function is still a cycle."""
    cycles, state = [], dict.fromkeys(GRAPH, "new")

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH[module]):
            if state[target] == "open":
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif state[target] == "new":
                visit(target, [*path, target])
        state[module] = "done"

    for module in GRAPH:
        if state[module] == "new":
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_the_reader_sees_deferred_imports() -> None:
    """The checks above are only as good as the import reader: a deferred import is found."""
    assert "nvlm_export.models.tiny" in GRAPH["nvlm_export.commands.make_tiny"]
    assert "nvlm_export.runtime.manifest" in GRAPH["nvlm_export.export.bundle"]
