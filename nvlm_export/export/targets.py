"""Deployment targets for TensorRT engines: what each GPU can run, declared as data.

An engine is specific to one GPU architecture (compute capability) and one TensorRT version, so
every build names its target. A preset says what the build needs to know before any work starts:

    target = resolve_target("orin")          # or "auto": read the local GPU
    check_precision(target, "fp8")           # InputError: Orin has no FP8, use int8

Precision support follows NVIDIA's hardware tables: FP8 (E4M3) tensor cores need compute
capability 8.9+ (Ada, Hopper, Blackwell, Jetson Thor); Jetson Orin (8.7) has INT8. A precision
also needs its Q/DQ opset read by the target's TensorRT: INT4's (21) is beyond JetPack's. Jetson
modules share one memory between CPU and GPU, so their default builder
workspace is kept small: the workspace comes out of the same RAM that holds the weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from nvlm_export.defaults import MIN_OPSET_BY_PRECISION
from nvlm_export.errors import BundleError, InputError, check_choice
from nvlm_export.runtime.backends.tensorrt import LocalGpu, local_gpu, total_memory_gib
from nvlm_export.runtime.manifest import PRECISIONS

GiB = 2**30


# The lowest compute capability with usable kernels for each precision. FP8 E4M3 tensor cores
# arrived with Ada (8.9) and Hopper (9.0); INT4 weight-only GEMMs in TensorRT 10 need Ampere (8.0+).
MIN_COMPUTE_CAPABILITY: dict[str, tuple[int, int]] = {
    "fp32": (0, 0),
    "fp16": (5, 3),
    "int8": (6, 1),
    "int4": (8, 0),
    "fp8": (8, 9),
}
BF16_MIN_COMPUTE_CAPABILITY = (8, 0)

# Highest default-domain opset TensorRT's ONNX parser takes, by TensorRT version (TensorRT Support
# Matrix and ONNX opset guide): 10.0-10.14 "opset 9 to opset 20" (JetPack 6's 10.3 and JetPack
# 7's 10.13 included); 10.15 "9 to 24"; 11.x "9 to 25". Versions in between get the older bound.
MAX_OPSET_BY_TENSORRT: tuple[tuple[tuple[int, int], int], ...] = (
    ((11, 0), 25),
    ((10, 15), 24),
    ((10, 0), 20),
)


def max_opset(tensorrt_version: str) -> int:
    """The highest ONNX opset the ONNX parser of `tensorrt_version` ("10.3", "11.4.0") reads."""
    major, minor, *_ = (int(p) for p in f"{tensorrt_version}.0".split(".")[:2])
    for version, opset in MAX_OPSET_BY_TENSORRT:
        if (major, minor) >= version:
            return opset
    return MAX_OPSET_BY_TENSORRT[-1][1]


def first_tensorrt_reading(opset: int) -> str | None:
    """The oldest TensorRT (major.minor) whose parser reads `opset`; None when none does."""
    readers = [version for version, highest in MAX_OPSET_BY_TENSORRT if highest >= opset]
    return ".".join(map(str, min(readers))) if readers else None


# Where to go instead when a precision is missing on a target (said in the error message).
FALLBACK_PRECISIONS: dict[str, tuple[str, ...]] = {
    "fp8": ("int8", "int4"),
    "int4": ("int8", "fp16"),
    "int8": ("fp16",),
    "fp16": ("fp32",),
}


@dataclass(frozen=True)
class Target:
    """One deployment GPU: what TensorRT builds for and what the build may use."""

    name: str
    description: str
    compute_capability: tuple[int, int]
    memory_gib: float
    # Jetson: CPU and GPU share one physical memory; the weights, KV cache and the builder's
    # workspace all come out of it.
    unified_memory: bool
    default_workspace_gib: float
    # The TensorRT a stock install of the platform ships (JetPack); None on data-center GPUs,
    # where the user picks a version.
    tensorrt: str | None = None
    jetpack: str | None = None

    @property
    def precisions(self) -> tuple[str, ...]:
        """What its GPU has kernels for and its TensorRT (where the platform fixes one) parses."""
        return tuple(p for p in PRECISIONS if self.has_kernels(p) and self.parses(p))

    def has_kernels(self, precision: str) -> bool:
        return self.compute_capability >= MIN_COMPUTE_CAPABILITY[precision]

    def parses(self, precision: str) -> bool:
        """Whether the platform's own TensorRT reads the opset `precision`'s Q/DQ needs (always
        on data-center GPUs, where the user picks a version)."""
        needed = MIN_OPSET_BY_PRECISION.get(precision, 0)
        return self.tensorrt is None or max_opset(self.tensorrt) >= needed

    @property
    def supports_bf16(self) -> bool:
        return self.compute_capability >= BF16_MIN_COMPUTE_CAPABILITY

    @property
    def sm(self) -> str:
        """Compute capability as TensorRT and nvidia-smi print it: "8.7"."""
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    @property
    def default_workspace_bytes(self) -> int:
        return int(self.default_workspace_gib * GiB)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["compute_capability"] = self.sm
        data["precisions"] = list(self.precisions)
        return data


def _preset(*args: Any, **kwargs: Any) -> tuple[str, Target]:
    target = Target(*args, **kwargs)
    return target.name, target


# Memory sizes are the largest module / card of each name; workspace defaults leave the weights
# room on shared-memory Jetsons and are generous on data-center cards (TensorRT's own default is
# the whole device memory).
TARGETS: dict[str, Target] = dict(
    [
        _preset(
            "orin",
            "Jetson AGX Orin (Ampere, 64 GB shared)",
            (8, 7),
            64,
            True,
            4,
            tensorrt="10.3",
            jetpack="6.x",
        ),
        _preset(
            "orin-nano",
            "Jetson Orin Nano / Orin NX 8 GB (Ampere, shared)",
            (8, 7),
            8,
            True,
            1,
            tensorrt="10.3",
            jetpack="6.x",
        ),
        # Thor reports sm_110 under CUDA 13 (JetPack 7); CUDA 12.8/12.9 called it sm_101.
        _preset(
            "thor",
            "Jetson AGX Thor (Blackwell, 128 GB shared)",
            (11, 0),
            128,
            True,
            8,
            tensorrt="10.13",
            jetpack="7.x",
        ),
        _preset("a100", "NVIDIA A100 (Ampere, 80 GB)", (8, 0), 80, False, 16),
        _preset("h100", "NVIDIA H100 (Hopper, 80 GB)", (9, 0), 80, False, 16),
        _preset("h200", "NVIDIA H200 (Hopper, 141 GB)", (9, 0), 141, False, 16),
        _preset("l4", "NVIDIA L4 (Ada, 24 GB)", (8, 9), 24, False, 8),
        _preset("l40s", "NVIDIA L40S (Ada, 48 GB)", (8, 9), 48, False, 8),
        _preset("rtx-ada", "NVIDIA RTX 40-series / RTX Ada (Ada, 24 GB)", (8, 9), 24, False, 8),
    ]
)
TARGET_NAMES = ("auto", *TARGETS)

# Compute capabilities that name one Jetson family, so "auto" keeps the shared-memory facts.
_JETSON_BY_CC = {(8, 7): "orin", (11, 0): "thor", (10, 1): "thor"}


def resolve_target(name: str) -> Target:
    """The preset called `name`, or for "auto" the local GPU (nvidia-smi, cuda-python, Jetson)."""
    key = name.strip().lower()
    if key == "auto":
        return detect_local_target()
    check_choice(key, TARGET_NAMES, "target")
    return TARGETS[key]


def check_precision(target: Target, precision: str) -> None:
    """Refuse, before any work, a precision the target's GPU has no kernels for."""
    check_choice(precision, PRECISIONS, "precision")
    if precision in target.precisions:
        return
    usable = [p for p in FALLBACK_PRECISIONS.get(precision, ()) if p in target.precisions]
    suggestion = " or ".join(f"--precision {p}" for p in usable) or "another target"
    if target.has_kernels(precision):
        opset = MIN_OPSET_BY_PRECISION[precision]
        why = (
            f"its Q/DQ needs ONNX opset {opset}, which TensorRT reads from "
            f"{first_tensorrt_reading(opset)} on; {target.description} has TensorRT "
            f"{target.tensorrt}{f' (JetPack {target.jetpack})' if target.jetpack else ''}, "
            f"which reads opsets up to {max_opset(str(target.tensorrt))}"
        )
    else:
        needed = ".".join(str(part) for part in MIN_COMPUTE_CAPABILITY[precision])
        why = f"{precision.upper()} needs compute capability {needed}+, {target.description} has "
        why += target.sm
    raise InputError(
        f"{target.name} cannot run {precision.upper()} engines",
        why=why,
        fix=f"Use {suggestion} (quantize the bundle to it first)",
    )


def building_here(target: Target, name: str, installed: str | None) -> Target:
    """`target` as engines built on this machine see it: with the installed TensorRT where that is
    the one that builds (`auto`, the local GPU, or a data-center GPU, where the user picks the
    version). A named Jetson keeps its JetPack's TensorRT: planning for it elsewhere must not
    judge it by this machine's."""
    if installed is None or (name != "auto" and target.tensorrt is not None):
        return target
    return replace(target, tensorrt=installed)


def check_workspace(target: Target, workspace_bytes: int) -> None:
    """A workspace larger than the target's memory (half of it on shared-memory Jetsons) fails."""
    limit = target.memory_gib * GiB * (0.5 if target.unified_memory else 1.0)
    if workspace_bytes <= 0 or workspace_bytes > limit:
        where = "half of the shared memory" if target.unified_memory else "the GPU memory"
        raise InputError(
            f"Workspace {workspace_bytes / GiB:.2f} GiB does not fit {target.name}",
            why=f"it must be positive and at most {where} ({limit / GiB:.0f} GiB)",
            fix=f"Pass --workspace {target.default_workspace_gib:g} (the target's default)",
        )


# --- "auto": read the local GPU (detection lives with the runtime, which checks engines) ------


def detect_local_target() -> Target:
    """A Target for this machine's GPU; a clear error when none can be read."""
    try:
        gpu = local_gpu()
    except BundleError as error:  # said for running engines: here it is about choosing a target
        raise InputError(
            "Cannot detect a local GPU for --target auto",
            why=error.why,
            fix=f"Name the target instead: --target one of {', '.join(TARGETS)}",
        ) from None
    return target_for_gpu(gpu)


def target_for_gpu(gpu: LocalGpu) -> Target:
    """The preset matching a detected GPU, with the detected memory; a generic target otherwise."""
    jetson = _JETSON_BY_CC.get(gpu.compute_capability)
    if jetson is not None:
        # Jetson's nvidia-smi has no memory.total (shared memory): ask the OS instead.
        memory = gpu.memory_gib or total_memory_gib() or TARGETS[jetson].memory_gib
        if jetson == "orin" and memory <= 16:
            jetson = "orin-nano"
        preset = TARGETS[jetson]
        return replace(
            preset,
            description=f"{gpu.name} (detected)",
            compute_capability=gpu.compute_capability,
            memory_gib=memory,
            default_workspace_gib=min(preset.default_workspace_gib, max(memory / 8, 0.5)),
        )
    for preset in TARGETS.values():
        words = preset.name.replace("rtx-ada", "rtx").split("-")
        if preset.compute_capability == gpu.compute_capability and all(
            word in gpu.name.lower() for word in words
        ):
            return replace(preset, description=f"{gpu.name} (detected)", memory_gib=gpu.memory_gib)
    return Target(
        name="auto",
        description=f"{gpu.name} (detected)",
        compute_capability=gpu.compute_capability,
        memory_gib=gpu.memory_gib,
        unified_memory=False,
        default_workspace_gib=max(min(gpu.memory_gib / 4, 16), 0.5),
    )
