"""Power and utilisation on Jetson from `tegrastats`, sampled in the background during a run.

A tegrastats line (one per interval) looks like this on an AGX Orin (JetPack 6):

    08-14-2025 10:31:21 RAM 9183/62841MB (lfb 11x4MB) SWAP 0/31420MB (cached 0MB)
    CPU [38%@2201,41%@2201,...,off] EMC_FREQ 21%@3199 GR3D_FREQ 97%@[1300,1300] ...
    GPU@58.2C tj@61.1C ... VDD_GPU_SOC 21455mW/19840mW VDD_CPU_CV 3602mW/3511mW
    VIN_SYS_5V0 7021mW/6945mW

and on a Thor (JetPack 7) the GPU rail is `VDD_GPU`, temperatures are lower-case (`gpu@49.1C`),
the input rail is `VIN`, and `GR3D_FREQ` may carry no percentage or be missing. Each power rail is
"now/average" in milliwatts (JetPack 4 printed bare numbers); a temperature of -256 C is a
powered-off sensor. Fields a line lacks are None, never guessed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

TIMESTAMP = re.compile(r"^(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s")
RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
CPU = re.compile(r"\bCPU \[([^\]]*)\]")
CPU_CORE = re.compile(r"^(\d+)%(?:@(\d+))?$")
EMC = re.compile(r"\bEMC_FREQ (\d+)%")
GR3D = re.compile(r"\bGR3D_FREQ (?:(\d+)%)?@?\[?(\d+)?")
TEMPERATURE = re.compile(r"(?<![\w%])([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")
RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?![\dA-Za-z])")
NOT_RAILS = frozenset({"RAM", "SWAP", "NC"})  # NC: a monitor channel that is not connected
SENSOR_OFF = -256.0
# The board's input rail where the module has one; otherwise total power is the sum of the rails.
INPUT_RAILS = ("VDD_IN", "VIN", "POM_5V_IN")
GPU_RAILS = ("VDD_GPU_SOC", "VDD_GPU", "VDD_SYS_GPU", "POM_5V_GPU")


@dataclass(frozen=True)
class TegrastatsSample:
    """One parsed tegrastats line. Power in mW (instantaneous), memory in MB."""

    timestamp: str | None = None
    ram_used_mb: int | None = None
    ram_total_mb: int | None = None
    swap_used_mb: int | None = None
    cpu_percent: tuple[float | None, ...] = ()  # per core; None for a core that is off
    emc_percent: float | None = None
    gpu_percent: float | None = None
    gpu_mhz: int | None = None
    temperatures_c: dict[str, float] = field(default_factory=dict)
    rails_mw: dict[str, int] = field(default_factory=dict)
    rails_average_mw: dict[str, int] = field(default_factory=dict)

    @property
    def total_power_mw(self) -> int | None:
        """The input rail's power, or the sum of all rails when the module has no input rail."""
        for name in INPUT_RAILS:
            if name in self.rails_mw:
                return self.rails_mw[name]
        return sum(self.rails_mw.values()) if self.rails_mw else None

    @property
    def gpu_power_mw(self) -> int | None:
        return next((self.rails_mw[n] for n in GPU_RAILS if n in self.rails_mw), None)

    @property
    def cpu_mean_percent(self) -> float | None:
        """Mean load over the cores that are on."""
        online = [p for p in self.cpu_percent if p is not None]
        return sum(online) / len(online) if online else None


def parse_tegrastats_line(line: str) -> TegrastatsSample:
    """Parse one tegrastats line; unknown fields are ignored, missing ones are None."""
    timestamp = TIMESTAMP.match(line)
    ram, swap, cpu = RAM.search(line), SWAP.search(line), CPU.search(line)
    emc, gr3d = EMC.search(line), GR3D.search(line)
    rails = {
        m.group(1): (int(m.group(2)), int(m.group(3)))
        for m in RAIL.finditer(line)
        if m.group(1) not in NOT_RAILS
    }
    temperatures = {
        m.group(1): float(m.group(2))
        for m in TEMPERATURE.finditer(line)
        if float(m.group(2)) > SENSOR_OFF
    }
    return TegrastatsSample(
        timestamp=timestamp.group(1) if timestamp else None,
        ram_used_mb=int(ram.group(1)) if ram else None,
        ram_total_mb=int(ram.group(2)) if ram else None,
        swap_used_mb=int(swap.group(1)) if swap else None,
        cpu_percent=_cpu_cores(cpu.group(1)) if cpu else (),
        emc_percent=float(emc.group(1)) if emc else None,
        gpu_percent=float(gr3d.group(1)) if gr3d and gr3d.group(1) else None,
        gpu_mhz=int(gr3d.group(2)) if gr3d and gr3d.group(2) else None,
        temperatures_c=temperatures,
        rails_mw={name: now for name, (now, _) in rails.items()},
        rails_average_mw={name: average for name, (_, average) in rails.items()},
    )


def _cpu_cores(text: str) -> tuple[float | None, ...]:
    cores: list[float | None] = []
    for entry in text.split(","):
        match = CPU_CORE.match(entry.strip())
        cores.append(float(match.group(1)) if match else None)  # "off"
    return tuple(cores)


def summarize(samples: list[TegrastatsSample]) -> dict[str, Any]:
    """Mean and peak of power, GPU/CPU/EMC load and RAM over a run (None where never reported)."""

    def stats(values: list[float | int | None]) -> dict[str, float] | None:
        known = [float(v) for v in values if v is not None]
        if not known:
            return None
        return {"mean": float(np.mean(known)), "peak": float(np.max(known))}

    return {
        "samples": len(samples),
        "total_power_mw": stats([s.total_power_mw for s in samples]),
        "gpu_power_mw": stats([s.gpu_power_mw for s in samples]),
        "gpu_percent": stats([s.gpu_percent for s in samples]),
        "cpu_percent": stats([s.cpu_mean_percent for s in samples]),
        "emc_percent": stats([s.emc_percent for s in samples]),
        "ram_used_mb": stats([s.ram_used_mb for s in samples]),
    }


class TegrastatsMonitor:
    """Runs `tegrastats --interval MS` while in the `with` block and parses every line it prints.

    `available()` is False off-Jetson; the monitor then collects nothing and never fails.
    """

    COMMAND = "tegrastats"

    def __init__(self, interval_ms: int = 100) -> None:
        self.interval_ms = interval_ms
        self.samples: list[TegrastatsSample] = []
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @classmethod
    def available(cls) -> bool:
        return shutil.which(cls.COMMAND) is not None

    def __enter__(self) -> TegrastatsMonitor:
        if not self.available():
            return self
        self._process = subprocess.Popen(
            [self.COMMAND, "--interval", str(self.interval_ms)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self._process.stdout is not None
        self._reader = threading.Thread(
            target=self._read, args=(self._process.stdout,), name="tegrastats", daemon=True
        )
        self._reader.start()
        return self

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            if line.strip():
                self.samples.append(parse_tegrastats_line(line))

    def __exit__(self, *_: object) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        self._process = None
