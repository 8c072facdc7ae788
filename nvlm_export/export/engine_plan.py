"""A TensorRT build plan: pure data, computed from a bundle manifest, a target and options.

The plan says everything a build will do before TensorRT is touched, so it can be printed, saved
(`engine_plan.json`, written by `nvlm-export engine --dry-run`) and tested on a machine without a
GPU:

    plan = plan_build(manifest, resolve_target("orin"), PlanOptions(precision="int8"))
    plan.to_dict()  # one engine per graph: precision, typing, optimisation profiles, limits

Optimisation profiles. TensorRT tunes kernels at each profile's `opt` shape and accepts any shape
between `min` and `max`; device memory is sized for `max`. Shapes come from the manifest's
declared inputs: a fixed dimension stays fixed, a named dynamic axis takes the range below.

| axis | min | opt | max | why |
|---|---|---|---|---|
| `tiles` | 1 | tiles of a 1920x1080 photo | max_tiles + thumbnail | one image per vision call |
| `batch` | 1 | 1 | max_batch (1) | the runtime generates one sequence |
| `seq` (prefill) | 1 | a one-image prompt | prefill chunk (max_context) | prompt in one call |
| `past` (prefill) | 0 | 0 | max_context - chunk (0) | prefill starts empty, or chunked |
| `seq` (decode) | 1 | 1 | 1 | one new token per step |
| `past` (decode) | 0 | prompt + 128 | max_context - 1 | the cache grows to the context |
| `cross` | 1 | one image's cross sequence | images x tiles x (256 + tag) | NVLM-X/H |

A graph with both `seq` and `past` axes (the decoder) gets two profiles, `decode` first and then
`prefill`; the runner picks the first profile that holds a call's shapes, so a one-token step runs
on the decode profile. `seq + past` never exceeds max_context in either profile, so the present
KV outputs are sized by max_context, not twice it.

Precision and typing (TensorRT builds for explicit quantization only; see docs/tensorrt.md):
- quantized graphs (INT8/FP8/INT4 Q/DQ in the ONNX) and fp16 ONNX graphs build as strongly typed
  networks: every tensor keeps the type the ONNX gives it (fp32 norms and softmax stay fp32);
- an fp32 ONNX built at fp16 uses TensorRT 10's FP16 builder flag (weak typing); TensorRT 11 has
  no such flag, so there the graph must be exported as fp16.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nvlm_export.errors import BundleError, InputError
from nvlm_export.export.targets import GiB, Target, check_precision, check_workspace
from nvlm_export.runtime.manifest import QUANTIZED_PRECISIONS, GraphSpec, Manifest
from nvlm_export.runtime.prompt import ImageLayout
from nvlm_export.runtime.tiling import choose_grid, tile_count

PLAN_NAME = "engine_plan.json"
ENGINE_DIR = "engines"
FLOATS = ("fp32", "fp16")
OPTIMIZATION_LEVELS = range(0, 6)  # IBuilderConfig.builder_optimization_level: 0..5, default 3
DEFAULT_OPTIMIZATION_LEVEL = 3
# The last TensorRT major with BuilderFlag.FP16 (TensorRT 11 removed every weak-typing flag).
LAST_MAJOR_WITH_FP16_FLAG = 10
DEFAULT_TENSORRT = "10.3"  # JetPack 6, the oldest TensorRT we build for

# "Typical" request behind the opt shapes: a 16:9 photo and a short question.
TYPICAL_IMAGE_SIZE = (1920, 1080)
TYPICAL_TEXT_TOKENS = 128
TYPICAL_NEW_TOKENS = 128
# Tile tags ("<tile_3>", "<tile_global_thumbnail>") in a cross key/value sequence: a few BPE
# tokens each; 16 is a safe upper bound for the NVLM tokenizer.
TAG_TOKENS_PER_TILE = 16

CROSS_AXES = ("cross",)  # the cross key/value sequence length K (cross_kv and decoder inputs)


@dataclass(frozen=True)
class PlanOptions:
    """What the user chose; None means "the bundle's or the target's default"."""

    precision: str | None = None
    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL
    workspace_gib: float | None = None
    timing_cache: Path | None = None
    tensorrt_version: str | None = None
    prefill_chunk: int | None = None
    max_batch: int = 1
    max_images: int = 1


@dataclass(frozen=True)
class AxisRange:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.opt <= self.max:
            raise InputError(f"Invalid axis range min={self.min} opt={self.opt} max={self.max}")

    def text(self) -> str:
        return str(self.min) if self.min == self.max else f"{self.min}/{self.opt}/{self.max}"


Shape = tuple[int, ...]


@dataclass(frozen=True)
class ProfilePlan:
    """One optimisation profile: a range per dynamic axis and the resulting input shapes."""

    name: str
    axes: dict[str, AxisRange]
    # input name -> (min shape, opt shape, max shape), as IOptimizationProfile.set_shape takes them
    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def covers(self, shapes: Mapping[str, Shape]) -> bool:
        """True when every given input shape lies inside this profile's min..max box."""
        for name, shape in shapes.items():
            if name not in self.shapes:
                return False
            low, _, high = self.shapes[name]
            if len(shape) != len(low):
                return False
            if any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high, strict=True)):
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "axes": {axis: asdict(r) for axis, r in self.axes.items()},
            "shapes": {
                name: {"min": list(lo), "opt": list(opt), "max": list(hi)}
                for name, (lo, opt, hi) in self.shapes.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProfilePlan:
        return cls(
            name=data["name"],
            axes={axis: AxisRange(**r) for axis, r in data["axes"].items()},
            shapes={
                name: (tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]))
                for name, s in data["shapes"].items()
            },
        )


@dataclass(frozen=True)
class EnginePlan:
    """How one graph becomes one engine."""

    graph: str
    onnx: str  # relative to the bundle
    engine: str  # relative to the bundle
    precision: str
    strongly_typed: bool
    fp16_flag: bool
    profiles: tuple[ProfilePlan, ...]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["profiles"] = [p.to_dict() for p in self.profiles]
        data["notes"] = list(self.notes)
        return data


@dataclass(frozen=True)
class BuildPlan:
    """Every engine of a bundle for one target, and the builder settings they share."""

    target: Target
    tensorrt_version: str
    optimization_level: int
    workspace_bytes: int
    timing_cache: str
    engines: tuple[EnginePlan, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def tensorrt_major(self) -> int:
        return tensorrt_major(self.tensorrt_version)

    def engine(self, graph: str) -> EnginePlan:
        for plan in self.engines:
            if plan.graph == graph:
                return plan
        raise BundleError(f"The build plan has no engine for graph '{graph}'")

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target.to_dict(),
            "tensorrt_version": self.tensorrt_version,
            "optimization_level": self.optimization_level,
            "workspace_bytes": self.workspace_bytes,
            "timing_cache": self.timing_cache,
            "engines": [e.to_dict() for e in self.engines],
            "notes": list(self.notes),
        }

    def save(self, bundle_dir: Path) -> Path:
        """Write engine_plan.json into the bundle (atomically, like the manifest)."""
        path = Path(bundle_dir) / PLAN_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path


# --- the plan ---------------------------------------------------------------------------------


def plan_build(
    manifest: Manifest, target: Target, options: PlanOptions = PlanOptions()
) -> BuildPlan:
    """The full build plan; every check that needs no GPU (precision, limits) fails here."""
    trt_version = options.tensorrt_version or target.tensorrt or DEFAULT_TENSORRT
    major = tensorrt_major(trt_version)
    if options.precision is not None:
        check_precision(target, options.precision)
    _check_requested_precision_reachable(manifest, options.precision)
    if options.optimization_level not in OPTIMIZATION_LEVELS:
        raise InputError(
            f"Builder optimisation level {options.optimization_level} is out of range",
            why="TensorRT accepts 0 (fastest build) to 5 (slowest build, best kernels)",
            fix=f"Pass --opt-level between 0 and 5 (default {DEFAULT_OPTIMIZATION_LEVEL})",
        )
    workspace = (
        int(options.workspace_gib * GiB)
        if options.workspace_gib is not None
        else target.default_workspace_bytes
    )
    check_workspace(target, workspace)
    axes = axis_ranges(manifest, options)
    engines = []
    for name, graph in manifest.graphs.items():
        requested = options.precision
        if requested == manifest.precision:
            requested = None  # the bundle's own precision: each graph as quantized (INT4: INT8 ViT)
        precision, strongly_typed, fp16_flag = graph_typing(name, graph, requested, major)
        check_precision(target, precision)
        engines.append(
            EnginePlan(
                graph=name,
                onnx=graph.file,
                engine=f"{ENGINE_DIR}/{name}.engine",
                precision=precision,
                strongly_typed=strongly_typed,
                fp16_flag=fp16_flag,
                profiles=graph_profiles(name, graph, axes),
                notes=_typing_note(graph.precision, precision, strongly_typed),
            )
        )
    timing_cache = options.timing_cache or default_timing_cache(target, trt_version)
    return BuildPlan(
        target=target,
        tensorrt_version=trt_version,
        optimization_level=options.optimization_level,
        workspace_bytes=workspace,
        timing_cache=str(timing_cache),
        engines=tuple(engines),
        notes=_target_notes(target, trt_version),
    )


def tensorrt_major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise InputError(
            f"Unreadable TensorRT version '{version}'", fix="Pass a version like 10.3 or 11.0"
        ) from None


def graph_typing(
    name: str, graph: GraphSpec, requested: str | None, trt_major: int
) -> tuple[str, bool, bool]:
    """(engine precision, strongly typed?, FP16 builder flag?) for one graph.

    Precision comes from the ONNX itself (explicit quantization); the only conversion the build
    adds is fp32 -> fp16 through TensorRT 10's weak typing.
    """
    source = graph.precision
    if requested is None or requested == source:
        return source, True, False
    if requested in QUANTIZED_PRECISIONS and source in FLOATS:
        # A graph the quantizer left in float (typically the vision encoder) keeps its precision.
        return source, True, False
    if requested == "fp16" and source == "fp32":
        if trt_major > LAST_MAJOR_WITH_FP16_FLAG:
            raise InputError(
                f"Cannot build the fp32 {name} graph at fp16 with TensorRT {trt_major}",
                why="TensorRT 11 removed the FP16 builder flag; precision must come from the ONNX",
                fix="Export the bundle with --dtype fp16 (or build with --precision fp32)",
            )
        return "fp16", False, True
    raise InputError(
        f"Cannot build the {source} {name} graph at {requested}",
        why="TensorRT builds what the ONNX says (explicit quantization only)",
        fix=f"Build with --precision {source}, or re-export/quantize the bundle to {requested}",
    )


def _check_requested_precision_reachable(manifest: Manifest, requested: str | None) -> None:
    if requested not in QUANTIZED_PRECISIONS:
        return
    if not any(g.precision == requested for g in manifest.graphs.values()):
        have = sorted({g.precision for g in manifest.graphs.values()})
        raise InputError(
            f"The bundle has no {requested} graph to build",
            why=f"its graphs are {', '.join(have)}; TensorRT needs Q/DQ nodes in the ONNX "
            "(there is no calibrator)",
            fix=f"Run nvlm-export quantize --precision {requested} on the bundle first",
        )


def _typing_note(source: str, precision: str, strongly_typed: bool) -> tuple[str, ...]:
    if not strongly_typed:
        return (f"weakly typed: {source} ONNX with the FP16 builder flag (TensorRT 10 only)",)
    if precision in QUANTIZED_PRECISIONS:
        return (f"strongly typed: {precision} from the graph's Q/DQ nodes",)
    return (f"strongly typed: tensor types as in the {source} ONNX",)


def _target_notes(target: Target, trt_version: str) -> tuple[str, ...]:
    notes = [f"engines run only on compute capability {target.sm} with TensorRT {trt_version}"]
    if target.unified_memory:
        notes.append("shared CPU/GPU memory: the workspace comes out of the weights' RAM")
    return tuple(notes)


def default_timing_cache(target: Target, trt_version: str) -> Path:
    """One timing cache per GPU and TensorRT version, shared by every build on this machine."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "nvlm-export" / f"timing-{target.name}-sm{target.sm}-trt{trt_version}.cache"


# --- profiles ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AxisTable:
    """The range of every dynamic axis the bundle's graphs may name, per profile kind."""

    single: dict[str, AxisRange]  # graphs with one profile (vision, cross_kv)
    prefill: dict[str, AxisRange]
    decode: dict[str, AxisRange]


def axis_ranges(manifest: Manifest, options: PlanOptions = PlanOptions()) -> AxisTable:
    tiling, layout = manifest.tiling, manifest.prompt.layout
    per_tile = manifest.prompt.tokens_per_tile
    max_context = manifest.kv_cache.max_context
    chunk = _prefill_chunk(options.prefill_chunk, max_context)

    most_tiles = tile_count((tiling.max_tiles, 1), tiling)  # max_tiles regular + thumbnail
    typical_tiles = tile_count(choose_grid(*TYPICAL_IMAGE_SIZE, tiling), tiling)
    typical_prompt = TYPICAL_TEXT_TOKENS + _decoder_image_tokens(layout, typical_tiles, per_tile)
    cross_per_tile = per_tile + (TAG_TOKENS_PER_TILE if layout.cross_tags else 0)
    most_cross = max(1, options.max_images * _cross_tiles(layout, most_tiles) * cross_per_tile)
    typical_cross = max(1, min(_cross_tiles(layout, typical_tiles) * cross_per_tile, most_cross))

    if options.max_batch < 1:
        raise InputError(f"max_batch {options.max_batch} must be >= 1")
    shared = {
        "batch": AxisRange(1, 1, options.max_batch),
        "cross": AxisRange(1, typical_cross, most_cross),
    }
    return AxisTable(
        single={**shared, "tiles": AxisRange(1, min(typical_tiles, most_tiles), most_tiles)},
        prefill={
            **shared,
            "seq": AxisRange(1, _clamp(typical_prompt, 1, chunk), chunk),
            "past": AxisRange(0, 0, max_context - chunk),
        },
        decode={
            **shared,
            "seq": AxisRange(1, 1, 1),
            "past": AxisRange(
                0, _clamp(typical_prompt + TYPICAL_NEW_TOKENS, 0, max_context - 1), max_context - 1
            ),
        },
    )


def graph_profiles(name: str, graph: GraphSpec, axes: AxisTable) -> tuple[ProfilePlan, ...]:
    """Decode + prefill profiles for a graph with `seq` and `past` axes, else one profile."""
    used = {d for t in graph.inputs for d in t.shape if isinstance(d, str)}
    if {"seq", "past"} <= used:
        kinds = (("decode", axes.decode), ("prefill", axes.prefill))
    else:
        label = "tiles" if "tiles" in used else (next(iter(sorted(used)), "static"))
        kinds = ((label, axes.single),)
    return tuple(_profile(kind, table, name, graph) for kind, table in kinds)


def _profile(kind: str, table: Mapping[str, AxisRange], name: str, graph: GraphSpec) -> ProfilePlan:
    used: dict[str, AxisRange] = {}
    shapes: dict[str, tuple[Shape, Shape, Shape]] = {}
    for tensor in graph.inputs:
        lo, opt, hi = [], [], []
        for dim in tensor.shape:
            if isinstance(dim, int):
                r = AxisRange(dim, dim, dim)
            elif dim in table:
                r = used.setdefault(dim, table[dim])
            else:
                raise BundleError(
                    f"Input '{tensor.name}' of the {name} graph has dynamic axis '{dim}'",
                    why=f"the engine planner knows the axes {', '.join(sorted(table))}",
                    fix="Re-export the bundle with this version of nvlm-export",
                )
            lo.append(r.min)
            opt.append(r.opt)
            hi.append(r.max)
        shapes[tensor.name] = (tuple(lo), tuple(opt), tuple(hi))
    return ProfilePlan(kind, used, shapes)


def _decoder_image_tokens(layout: ImageLayout, tiles: int, per_tile: int) -> int:
    if not layout.text_pads:
        return 0
    return per_tile * (tiles if layout.text_tiles == "all" else 1)


def _cross_tiles(layout: ImageLayout, tiles: int) -> int:
    if layout.cross_tiles == "none":
        return 0
    if layout.cross_tiles == "regular":
        return max(tiles - 1, 1)
    return tiles


def _prefill_chunk(chunk: int | None, max_context: int) -> int:
    if chunk is None:
        return max_context
    if not 1 <= chunk <= max_context:
        raise InputError(
            f"Prefill chunk {chunk} is out of range",
            fix=f"Pass a value between 1 and the bundle's max_context ({max_context})",
        )
    return chunk


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(value, high))
