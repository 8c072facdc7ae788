"""Execute a build plan with TensorRT: one serialized engine per graph, recorded in the manifest.

The only module of the exporter that imports `tensorrt`, and only inside functions. It follows
TensorRT's documented Python API; where 10.x and 11 differ, the comment at the call says so
(TensorRT 11 migration guide, "Python Migration Patterns for TensorRT 11.x" and "Removed Python
APIs and Replacements"):

- network creation: `Builder.create_network(flags)`; STRONGLY_TYPED is a flag on 10.x and the
  only mode on 11 (where the flag may be absent);
- precision: `BuilderFlag.FP16` exists on 10.x only (11 removed every weak-typing flag and the
  INT8 calibrator); quantized graphs carry explicit Q/DQ nodes on both;
- everything else used here is the same on both: `OnnxParser.parse_from_file`,
  `IBuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)`,
  `builder_optimization_level`, `create_optimization_profile` / `set_shape`,
  `create_timing_cache` / `set_timing_cache` / `get_timing_cache().serialize()`,
  `build_serialized_network`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nvlm_export.errors import BundleError, ExportError, MissingExtraError
from nvlm_export.export.engine_plan import BuildPlan, EnginePlan
from nvlm_export.output import output_lock
from nvlm_export.runtime.backends.tensorrt import LocalGpu, local_gpu
from nvlm_export.runtime.manifest import EngineRecord, Manifest

Progress = Callable[[str], None]


def import_tensorrt() -> Any:
    """`tensorrt`, or a MissingExtraError saying engines are built on the target device."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError:
        raise MissingExtraError(
            "Building TensorRT engines needs the 'tensorrt' extra",
            why="tensorrt is not installed here; engines must be built on the target GPU "
            "(e.g. the Jetson) because they are specific to its GPU and TensorRT version",
            fix="On the target run: pip install 'nvlm-export[tensorrt]' (JetPack ships "
            "tensorrt), then nvlm-export engine BUNDLE; or use --dry-run here to see the plan",
        ) from None
    return trt


def installed_tensorrt_version() -> str | None:
    """The local TensorRT version without importing it (None when absent)."""
    from importlib import metadata

    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_libs"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:  # JetPack's apt package has no dist-info
        return str(import_tensorrt().__version__)
    except MissingExtraError:
        return None


@dataclass(frozen=True)
class BuiltEngine:
    graph: str
    path: Path
    size_bytes: int
    seconds: float


def build_engines(
    bundle_dir: Path,
    manifest: Manifest,
    plan: BuildPlan,
    *,
    overwrite: bool = False,
    progress: Progress = print,
) -> tuple[Manifest, list[BuiltEngine]]:
    """Build every engine of `plan`, then save a manifest that records them (atomically).

    The bundle's output lock (nvlm_export/output.py) is held throughout: one writer at a time."""
    trt = import_tensorrt()
    device = local_device()
    _check_plan_matches_here(plan, trt.__version__, device)
    bundle_dir = Path(bundle_dir)
    with output_lock(bundle_dir):
        return _build_and_record(trt, device, bundle_dir, manifest, plan, overwrite, progress)


def _build_and_record(
    trt: Any,
    device: LocalGpu,
    bundle_dir: Path,
    manifest: Manifest,
    plan: BuildPlan,
    overwrite: bool,
    progress: Progress,
) -> tuple[Manifest, list[BuiltEngine]]:
    built = []
    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = Path(plan.timing_cache)
    for engine in plan.engines:
        path = bundle_dir / engine.engine
        if path.exists() and not overwrite:
            raise BundleError(
                f"{path} already exists", fix="Pass --overwrite to rebuild the engines"
            )
        progress(f"building {engine.graph} ({engine.precision}, {len(engine.profiles)} profiles)")
        start = time.perf_counter()
        data = build_engine(trt, logger, bundle_dir / engine.onnx, engine, plan, cache_path)
        _write_atomically(path, data)
        built.append(BuiltEngine(engine.graph, path, len(data), time.perf_counter() - start))
        progress(f"  {path.name}: {len(data) / 2**20:.1f} MiB in {built[-1].seconds:.0f} s")
    engines = {
        b.graph: engine_record(plan.engine(b.graph), plan, b, trt.__version__, device)
        for b in built
    }
    updated = replace(manifest, engines={**manifest.engines, **engines}).save(bundle_dir)
    return updated, built


def build_engine(
    trt: Any, logger: Any, onnx_path: Path, engine: EnginePlan, plan: BuildPlan, cache: Path
) -> bytes:
    """One serialized engine. Raises ExportError with the parser's or builder's message."""
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, engine))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so external weight files beside the graph resolve.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(
            f"TensorRT cannot parse the {engine.graph} graph {onnx_path}",
            why="; ".join(errors[:3]) or "no parser message",
            fix="Run nvlm-export lint on the bundle to find unsupported parts",
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    config.builder_optimization_level = plan.optimization_level
    if engine.fp16_flag:
        # TensorRT 10.x only: weak typing lets fp32 layers run in fp16. Removed in 11.
        config.set_flag(trt.BuilderFlag.FP16)
    for profile_plan in engine.profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile_plan.shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    timing_cache = config.create_timing_cache(cache.read_bytes() if cache.is_file() else b"")
    # ignore_mismatch=False: a cache from another GPU or TensorRT version is not used.
    config.set_timing_cache(timing_cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(
            f"TensorRT failed to build the {engine.graph} engine",
            why="the builder returned no engine (its log above says why)",
            fix="Try a larger --workspace or a lower --opt-level; run nvlm-export lint",
        )
    _write_atomically(cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _network_flags(trt: Any, engine: EnginePlan) -> int:
    if not engine.strongly_typed:
        return 0
    # TensorRT 10.x: NetworkDefinitionCreationFlag.STRONGLY_TYPED; TensorRT 11: always strongly
    # typed (the flag is kept for compatibility or absent, both fine).
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def engine_record(
    engine: EnginePlan, plan: BuildPlan, built: BuiltEngine, trt_version: str, device: LocalGpu
) -> EngineRecord:
    """The manifest's `engines[graph]` entry: what the runner checks before loading."""
    return EngineRecord(
        file=engine.engine,
        tensorrt_version=trt_version,
        compute_capability=device.sm,
        device=device.name,
        target=plan.target.name,
        precision=engine.precision,
        strongly_typed=engine.strongly_typed,
        profiles=tuple(p.to_dict() for p in engine.profiles),
        size_bytes=built.size_bytes,
        build_seconds=round(built.seconds, 1),
    )


def local_device() -> LocalGpu:
    """The GPU this process builds on."""
    return local_gpu()


def _check_plan_matches_here(plan: BuildPlan, trt_version: str, device: LocalGpu) -> None:
    if plan.target.compute_capability != device.compute_capability:
        raise BundleError(
            f"The plan targets {plan.target.name} (sm {plan.target.sm}) but this GPU is "
            f"{device.name} (sm {device.sm})",
            why="TensorRT builds for the GPU it runs on",
            fix="Build on the target device, or pass --target auto",
        )
    if plan.tensorrt_major != int(trt_version.split(".")[0]):
        raise BundleError(
            f"The plan was made for TensorRT {plan.tensorrt_version}, this is {trt_version}",
            fix="Plan and build on the same machine (nvlm-export engine without --dry-run)",
        )


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
