"""Profile a loaded bundle: repeated requests per image size, every stage timed.

    report = profile_bundle("bundle/", ProfileSettings(tiles=(1, 3, 7), runs=5))
    print(report.to_dict()["cases"][0]["ttft_ms"]["median"])

Each case is one image (a given one, or a synthetic one sized to tile into N tiles) with a
question of exactly `prompt_tokens` text tokens. After `warmup` unmeasured requests, `runs`
requests are timed through `Pipeline.generate` — the path users run — with end-of-turn ignored
so every request decodes exactly `new_tokens` tokens. Stage times come from the pipeline itself:

    prepare  image decode + tiling + prompt assembly      vision   vision graph on every tile
    splice   embedding lookup + image features spliced    prefill  decoder over the prompt
    TTFT     request start -> first token chosen          decode   one decoder step per token
    e2e      request start -> last token
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from nvlm_export.errors import InputError
from nvlm_export.profiling.cost import DecoderCost, decoder_cost
from nvlm_export.profiling.inputs import (
    image_size_for_tiles,
    question_with_tokens,
    synthetic_image,
)
from nvlm_export.profiling.memory import (
    CallPeaks,
    PeakSampler,
    current_rss_bytes,
    gpu_memory_bytes,
)
from nvlm_export.profiling.stats import Distribution
from nvlm_export.profiling.tegrastats import TegrastatsMonitor, summarize
from nvlm_export.runtime.backends import DEFAULT_BACKEND
from nvlm_export.runtime.backends.onnxruntime import OnnxRuntimeRunner
from nvlm_export.runtime.images import load_image
from nvlm_export.runtime.pipeline import Pipeline
from nvlm_export.runtime.tiling import choose_grid, tile_count, tile_image

STAGES = ("prepare", "vision", "splice", "prefill")
# Tiles per vision call the profiler compares with one per call. Four tiles of InternViT-300M
# activations are ~0.6 GB (one 7-tile call peaked 1.2 GB, one tile 0.2-0.3 GB: performance.md).
DEFAULT_VISION_BATCH_TILES = 4
# Asked right after each measured request, about the same image: its TTFT shows what the feature
# and prefix caches save (docs/conversations.md).
FOLLOW_UP_QUESTION = "And what else can you see?"
MS = 1000.0


@dataclass(frozen=True)
class ProfileSettings:
    tiles: tuple[int, ...] = (1, 3, 7)  # synthetic image per tile count (when no images given)
    images: tuple[Path, ...] = ()  # profile these instead, one case each
    prompt_tokens: int = 32  # text tokens of the question (image tokens come on top)
    new_tokens: int = 32
    runs: int = 3
    warmup: int = 1
    bandwidth_gbs: float | None = None  # measured memory bandwidth, for the roofline estimate
    # Tiles per vision call timed against one tile per call on multi-tile cases (0: not timed).
    vision_batch: int = DEFAULT_VISION_BATCH_TILES
    # Prefill chunk sizes (tokens; 0: the whole prompt in one call) timed against each other on
    # the cases whose prompt is longer than the smallest; () : not timed.
    prefill_chunks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "tiles", tuple(self.tiles))
        object.__setattr__(self, "images", tuple(Path(p) for p in self.images))
        object.__setattr__(self, "prefill_chunks", tuple(dict.fromkeys(self.prefill_chunks)))
        lows = (("prompt_tokens", 1), ("new_tokens", 1), ("runs", 1), ("warmup", 0))
        for name, low in (*lows, ("vision_batch", 0)):
            value = getattr(self, name)
            if value < low:
                raise InputError(f"{name} must be >= {low}, got {value}")
        if any(chunk < 0 for chunk in self.prefill_chunks):
            raise InputError(
                f"prefill chunk sizes must be >= 0, got {list(self.prefill_chunks)}",
                fix="Give token counts, or 0 for the whole prompt in one call",
            )
        if len(self.prefill_chunks) == 1:
            raise InputError(
                f"One prefill chunk size ({self.prefill_chunks[0]}) has nothing to time against",
                why="the chunk sizes are timed against each other, alternated",
                fix="Give two or more, e.g. 256,512 (0: the whole prompt in one call)",
            )
        if not self.images and not self.tiles:
            raise InputError("Nothing to profile", fix="Give --tiles or at least one --image")


@dataclass(frozen=True)
class RunTiming:
    """One measured request, in seconds."""

    stages: dict[str, float]
    time_to_first_token: float
    decode_steps: tuple[float, ...]
    end_to_end: float
    follow_up_ttft: float = 0.0  # a second question about the same image, right after

    @property
    def decode_tokens_per_second(self) -> float:
        total = sum(self.decode_steps)
        return len(self.decode_steps) / total if total > 0 else 0.0


# One measured call of a compared choice: seconds, and the bytes its peak resident set rose
# above the resident set it started from (None where the OS cannot say).
Measurement = tuple[float, int | None]


def _highest(measurements: Sequence[Measurement]) -> int | None:
    peaks = [peak for _, peak in measurements if peak is not None]
    return max(peaks) if peaks else None


@dataclass
class VisionBatching:
    """One image's tiles encoded one per vision call and `batch` per call, alternated: seconds
    per tile and the activation peak of each. Tiles are independent, so both give the same
    features; a batch costs activation memory for `batch` tiles at once."""

    batch: int
    one_per_call: list[Measurement] = field(default_factory=list)
    batched: list[Measurement] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        one = Distribution.of([seconds for seconds, _ in self.one_per_call])
        many = Distribution.of([seconds for seconds, _ in self.batched])
        return {
            "batch": self.batch,
            "ms_per_tile_one_per_call": one.scaled(MS).to_dict(),
            "ms_per_tile_batched": many.scaled(MS).to_dict(),
            "batched_over_one_per_call": many.median / one.median if one.median else None,
            "peak_rss_rise_bytes_one_per_call": _highest(self.one_per_call),
            "peak_rss_rise_bytes_batched": _highest(self.batched),
        }


@dataclass
class PrefillChunking:
    """One prompt prefilled in chunks of each size (0: one call), alternated: the prefill stage's
    seconds and the request's memory peak above where it started. Chunking does not change the
    result; larger chunks read the weights fewer times but hold larger attention activations."""

    chunks: tuple[int, ...]
    measured: dict[int, list[Measurement]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for chunk in self.chunks:
            seconds = Distribution.of([s for s, _ in self.measured.get(chunk, [])])
            rows.append(
                {
                    "chunk_tokens": chunk,
                    "prefill_ms": seconds.scaled(MS).to_dict(),
                    "peak_rss_rise_bytes": _highest(self.measured.get(chunk, [])),
                }
            )
        return {"chunks": rows}


@dataclass
class CaseProfile:
    """Every measured run of one image + question."""

    label: str
    image_size: tuple[int, int]
    tiles: int
    prompt_tokens: int  # whole prompt: template + question + image tokens
    runs: list[RunTiming] = field(default_factory=list)
    vision_batching: VisionBatching | None = None
    prefill_chunking: PrefillChunking | None = None

    def summary(self) -> dict[str, Any]:
        def dist(values: Sequence[float]) -> dict[str, float | int]:
            return Distribution.of(values).scaled(MS).to_dict()

        steps = [s for run in self.runs for s in run.decode_steps]
        vision = [run.stages["vision"] for run in self.runs]
        return {
            "label": self.label,
            "image_size": list(self.image_size),
            "tiles": self.tiles,
            "prompt_tokens": self.prompt_tokens,
            "stages_ms": {s: dist([run.stages[s] for run in self.runs]) for s in STAGES},
            "vision_ms_per_tile": dist([v / self.tiles for v in vision]) if self.tiles else None,
            "ttft_ms": dist([run.time_to_first_token for run in self.runs]),
            "follow_up_ttft_ms": dist([run.follow_up_ttft for run in self.runs]),
            "decode_ms_per_token": dist(steps),
            "decode_tokens_per_second": Distribution.of(
                [run.decode_tokens_per_second for run in self.runs]
            ).median,
            "e2e_ms": dist([run.end_to_end for run in self.runs]),
            "vision_batching": self.vision_batching.to_dict() if self.vision_batching else None,
            "prefill_chunking": (
                self.prefill_chunking.to_dict() if self.prefill_chunking else None
            ),
            "runs": [
                {
                    "stages_ms": {s: run.stages[s] * MS for s in STAGES},
                    "ttft_ms": run.time_to_first_token * MS,
                    "follow_up_ttft_ms": run.follow_up_ttft * MS,
                    "decode_ms": [s * MS for s in run.decode_steps],
                    "e2e_ms": run.end_to_end * MS,
                }
                for run in self.runs
            ],
        }


@dataclass
class ProfileReport:
    bundle: Path
    settings: ProfileSettings
    pipeline_info: dict[str, Any]
    cases: list[CaseProfile]
    memory: dict[str, Any]
    cost: DecoderCost
    tegrastats: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        cases = [case.summary() for case in self.cases]
        context = max((c.prompt_tokens for c in self.cases), default=0) + self.settings.new_tokens
        analytic = self.cost.to_dict(context, self.settings.bandwidth_gbs)
        bound = analytic["bandwidth_bound_tokens_per_second"]
        measured = max((c["decode_tokens_per_second"] for c in cases), default=0.0)
        analytic["measured_tokens_per_second"] = measured
        analytic["fraction_of_bound"] = measured / bound if bound else None
        analytic["measured_bytes_per_second"] = measured * analytic["bytes_per_token"]
        return {
            "bundle": str(self.bundle),
            **self.pipeline_info,
            "machine": machine_description(),
            "settings": {
                "tiles": list(self.settings.tiles),
                "images": [str(p) for p in self.settings.images],
                "prompt_tokens": self.settings.prompt_tokens,
                "new_tokens": self.settings.new_tokens,
                "runs": self.settings.runs,
                "warmup": self.settings.warmup,
                "vision_batch": self.settings.vision_batch,
                "prefill_chunks": list(self.settings.prefill_chunks),
            },
            "cases": cases,
            "memory": self.memory,
            "analytic": analytic,
            "tegrastats": self.tegrastats,
        }


def profile_bundle(
    bundle: str | Path,
    settings: ProfileSettings = ProfileSettings(),
    *,
    backend: str = DEFAULT_BACKEND,
    progress: Callable[[str], None] | None = None,
    **backend_options: Any,
) -> ProfileReport:
    """Load `bundle` and profile it (see the module docstring)."""
    start_rss = current_rss_bytes()
    load_start = time.perf_counter()
    pipe = Pipeline.load(bundle, backend=backend, **backend_options)
    load_seconds = time.perf_counter() - load_start
    return profile_pipeline(
        pipe,
        settings,
        progress=progress,
        extra_info={
            "load_seconds": load_seconds,
            "rss_before_load_bytes": start_rss,
        },
    )


def profile_pipeline(
    pipe: Pipeline,
    settings: ProfileSettings,
    *,
    progress: Callable[[str], None] | None = None,
    extra_info: dict[str, Any] | None = None,
) -> ProfileReport:
    """Profile an already loaded pipeline."""
    say = progress or (lambda _: None)
    question = question_with_tokens(pipe.tokenizer, settings.prompt_tokens)
    rss_after_load = current_rss_bytes()
    peaks = CallPeaks()
    gpu = _uses_gpu(pipe)
    with tempfile.TemporaryDirectory(prefix="nvlm-profile-") as scratch:
        images = _case_images(pipe, settings, Path(scratch))
        with (
            TegrastatsMonitor() as tegra,
            PeakSampler(gpu_memory_bytes if gpu else lambda: None) as gpu_peak,
        ):
            cases = []
            for label, path in images:
                say(f"profiling {label}")
                cases.append(_profile_case(pipe, label, path, question, settings, peaks))
    memory = {
        "rss_after_load_bytes": rss_after_load,
        "peak_rss_bytes": peaks.phase_peak(),
        "peak_rss_scope": "generation" if peaks.resettable else "process lifetime",
        "bundle_weight_bytes": bundle_weight_bytes(pipe),
        "gpu_peak_bytes": gpu_peak.peak,
        "gpu_note": None if gpu else "no GPU in use (CPU execution)",
    }
    memory["peak_rss_over_weights"] = memory["peak_rss_bytes"] / memory["bundle_weight_bytes"]
    return ProfileReport(
        bundle=pipe.bundle_dir,
        settings=settings,
        pipeline_info={
            "architecture": pipe.manifest.architecture,
            "precision": pipe.manifest.precision,
            "graph_precisions": {n: g.precision for n, g in pipe.manifest.graphs.items()},
            "backend": str(pipe.backends),
            "kv_cache": "written in place" if pipe.keeps_kv_in_place else "replaced each step",
            "providers": _providers(pipe),
            "threads": _threads(pipe),
            **(extra_info or {}),
        },
        cases=cases,
        memory=memory,
        cost=decoder_cost(pipe.bundle_dir, pipe.manifest),
        tegrastats=summarize(tegra.samples) if tegra.samples else None,
    )


def _case_images(
    pipe: Pipeline, settings: ProfileSettings, scratch: Path
) -> list[tuple[str, Path]]:
    """(label, image file) per case: the given images, or synthetic JPEGs (decoding is timed)."""
    if settings.images:
        return [(path.name, path) for path in settings.images]
    cases = []
    for tiles in settings.tiles:
        path = scratch / f"tiles-{tiles}.jpg"
        synthetic_image(image_size_for_tiles(tiles, pipe.tiling), seed=tiles).save(path, quality=90)
        cases.append((f"{tiles} tile{'s' if tiles > 1 else ''}", path))
    return cases


def _profile_case(
    pipe: Pipeline,
    label: str,
    image: Path,
    question: str,
    settings: ProfileSettings,
    peaks: CallPeaks,
) -> CaseProfile:
    size = load_image(image).size
    tiles = tile_count(choose_grid(*size, pipe.tiling), pipe.tiling)
    case = CaseProfile(label, size, tiles, prompt_tokens=0)
    for index in range(settings.warmup + settings.runs):
        run, prompt_tokens = _one_request(pipe, image, question, settings.new_tokens)
        case.prompt_tokens = prompt_tokens
        if index >= settings.warmup:
            case.runs.append(run)
    if settings.vision_batch > 1 and tiles > 1:
        case.vision_batching = _vision_batching(pipe, image, settings, peaks)
    chunked = [chunk for chunk in settings.prefill_chunks if chunk]
    if len(settings.prefill_chunks) > 1 and chunked and case.prompt_tokens > min(chunked):
        case.prefill_chunking = _prefill_chunking(pipe, image, question, settings, peaks)
    return case


Choice = TypeVar("Choice", bound=Hashable)


def _alternated(
    choices: Sequence[Choice], rounds: int, measure: Callable[[Choice], Measurement]
) -> dict[Choice, list[Measurement]]:
    """Measure every choice once per round, rotating which goes first so drifting load falls
    on all alike; an extra first round warms each choice's shapes and is not kept."""
    results: dict[Choice, list[Measurement]] = {choice: [] for choice in choices}
    for round_ in range(rounds + 1):
        shift = round_ % len(choices)
        for choice in [*choices[shift:], *choices[:shift]]:
            measurement = measure(choice)
            if round_:
                results[choice].append(measurement)
    return results


def _vision_batching(
    pipe: Pipeline, image: Path, settings: ProfileSettings, peaks: CallPeaks
) -> VisionBatching:
    """Encode the image's tiles one per call and in batches, alternated."""
    tiling = tile_image(load_image(image), pipe.tiling)
    batch = min(settings.vision_batch, tiling.num_tiles)

    def encode(per_call: int) -> Measurement:
        pipe.vision_tiles_per_call = per_call
        seconds, peak = peaks.measure(lambda: pipe.encode_images([tiling]))
        return seconds / tiling.num_tiles, peak

    saved = pipe.vision_tiles_per_call
    try:
        measured = _alternated((1, batch), settings.runs, encode)
    finally:
        pipe.vision_tiles_per_call = saved
    return VisionBatching(batch, measured[1], measured[batch])


def _prefill_chunking(
    pipe: Pipeline, image: Path, question: str, settings: ProfileSettings, peaks: CallPeaks
) -> PrefillChunking:
    """The case's request, answering one token, with each prefill chunk size, alternated. The
    image's features come from the feature cache and no prefix is reused, so the prefill stage
    differs only in its chunking."""

    def request(chunk: int) -> Measurement:
        pipe.prefill_chunk_tokens = chunk or None
        pipe.prefix_cache.clear()
        stages: dict[str, float] = {}

        def answer() -> None:  # generate() runs vision and prefill before it returns
            stream = pipe.generate(question, [image], max_new_tokens=1, ignore_eos=True)
            stream.run()
            stages.update(stream.stage_seconds)

        _, peak = peaks.measure(answer)
        return stages["prefill"], peak

    saved = pipe.prefill_chunk_tokens
    try:
        measured = _alternated(settings.prefill_chunks, settings.runs, request)
    finally:
        pipe.prefill_chunk_tokens = saved
    return PrefillChunking(settings.prefill_chunks, measured)


def _one_request(
    pipe: Pipeline, image: Path, question: str, new_tokens: int
) -> tuple[RunTiming, int]:
    pipe.clear_caches()  # every measured request is cold
    start = time.perf_counter()
    stream = pipe.generate(question, [image], max_new_tokens=new_tokens, ignore_eos=True)
    result = stream.run()
    end_to_end = time.perf_counter() - start
    follow_up = pipe.generate(FOLLOW_UP_QUESTION, [image], max_new_tokens=1).run()
    run = RunTiming(
        stages={name: stream.stage_seconds[name] for name in STAGES},
        time_to_first_token=result.timings.time_to_first_token,
        decode_steps=tuple(result.timings.decode_seconds),
        end_to_end=end_to_end,
        follow_up_ttft=follow_up.timings.time_to_first_token,
    )
    return run, stream.prepared.prompt.num_tokens


def bundle_weight_bytes(pipe: Pipeline) -> int:
    """Bytes of every graph (with external data) and of the embedding table."""
    files: list[Path] = []
    for graph in pipe.manifest.graphs.values():
        path = pipe.bundle_dir / graph.file
        files += [path, *path.parent.glob(path.name + ".data*")]
    files.append(pipe.bundle_dir / pipe.manifest.embedding.file)
    return sum(f.stat().st_size for f in files if f.is_file())


def _providers(pipe: Pipeline) -> list[str]:
    providers: list[str] = []
    for runner in pipe.runners.values():
        for name in getattr(runner, "providers", []):
            if name not in providers:
                providers.append(name)
    return providers


def _uses_gpu(pipe: Pipeline) -> bool:
    """True when any graph runs on something other than ONNX Runtime's CPU provider."""
    return any(
        runner.backend_name != OnnxRuntimeRunner.backend_name
        or any(p != "CPUExecutionProvider" for p in getattr(runner, "providers", []))
        for runner in pipe.runners.values()
    )


def _threads(pipe: Pipeline) -> int | None:
    return next((getattr(r, "intra_op_threads", None) for r in pipe.runners.values()), None)


def machine_description() -> dict[str, Any]:
    """CPU model, core count, RAM and library versions: enough to reproduce a measurement."""
    import onnxruntime

    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_bytes": _ram_bytes(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
