"""The runtime must install and import on a Jetson without PyTorch or transformers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = ("torch", "transformers", "onnx", "safetensors", "torchvision")

# Imports every module under nvlm_export.runtime with the blocked packages made unimportable,
# so a stray `import torch` anywhere in the runtime (even in a rarely used module) fails here.
SCRIPT = textwrap.dedent(
    f"""
    import importlib, importlib.abc, pkgutil, sys

    BLOCKED = {BLOCKED!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked for this test: {{name}}")
            return None

    sys.meta_path.insert(0, Block())
    import nvlm_export.runtime as runtime

    names = [m.name for m in pkgutil.walk_packages(runtime.__path__, "nvlm_export.runtime.")]
    for name in names:
        importlib.import_module(name)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print(len(names))
    """
)


def test_runtime_imports_without_torch_or_transformers() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) >= 1, "the runtime package should have modules to check"


def test_blocker_really_blocks() -> None:
    """Guard against a test that cannot fail: importing torch under the blocker must fail."""
    script = SCRIPT.replace("import nvlm_export.runtime as runtime", "import torch")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode != 0
    assert "blocked for this test: torch" in result.stderr
