"""nvidia-smi as the TensorRT backend and the profiler read it, with a stand-in on PATH."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nvlm_export.profiling.memory import gpu_memory_bytes
from nvlm_export.runtime import nvidia_smi
from nvlm_export.runtime.backends.tensorrt import detect_local_gpu


def _fake_nvidia_smi(directory: Path, script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = directory / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(directory))


def test_query_passes_the_fields_and_returns_the_rows(tmp_path, monkeypatch) -> None:
    _fake_nvidia_smi(tmp_path, 'echo "$1 $2"\n', monkeypatch)
    out = nvidia_smi.query("gpu", ("name", "compute_cap"), timeout=5)
    assert out == "--query-gpu=name,compute_cap --format=csv,noheader,nounits\n"


def test_missing_or_failing_nvidia_smi_means_unknown(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi at all
    assert nvidia_smi.query("gpu", ("name",), timeout=5) is None
    _fake_nvidia_smi(tmp_path, "echo 'NVIDIA-SMI has failed' >&2; exit 9\n", monkeypatch)
    assert nvidia_smi.query("gpu", ("name",), timeout=5) is None
    assert gpu_memory_bytes() is None


def test_profiler_reads_this_process_gpu_memory(tmp_path, monkeypatch) -> None:
    _fake_nvidia_smi(tmp_path, f"echo '1, 300'; echo '{os.getpid()}, 512'\n", monkeypatch)
    assert gpu_memory_bytes() == 512 * 1024 * 1024


def test_backend_names_the_gpu_nvidia_smi_reports(tmp_path, monkeypatch) -> None:
    _fake_nvidia_smi(tmp_path, "echo 'NVIDIA L4, 8.9, 23034'\n", monkeypatch)
    gpu = detect_local_gpu(model_file=tmp_path / "no-device-tree")
    assert gpu is not None
    assert gpu.name == "NVIDIA L4"
