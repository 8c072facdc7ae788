"""One `nvidia-smi` query (CSV rows, no header, no units), or None where it cannot answer.

The TensorRT backend asks it which GPU this is; the profiler asks how much GPU memory a process
holds. nvidia-smi is missing on CPU machines and answers partially on Jetsons, so every failure
is None and the callers fall back (the device tree, no GPU figure).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence


def query(kind: str, fields: Sequence[str], timeout: float) -> str | None:
    """`nvidia-smi --query-{kind}={fields}` output, e.g. kind "gpu" or "compute-apps"."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    command = [exe, f"--query-{kind}={','.join(fields)}", "--format=csv,noheader,nounits"]
    try:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
