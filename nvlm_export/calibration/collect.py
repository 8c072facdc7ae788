"""Record calibration samples by running the real runtime on real requests.

Every request (an image and a prompt) goes through `Pipeline.generate` exactly as in deployment:
tiling, prompt assembly, the vision graph, the embedding splice, (for NVLM-X/H) the cross_kv graph,
the decoder prefill and `decode_steps` greedy decode steps. Each graph runner is wrapped by a
`RecordingRunner` that writes the feeds of every call to the calibration set before running it,
so the samples have the distribution the engines will see, image-feature positions and KV cache
included.

A bundle exported with a small `max_context` cannot hold every image at the bundle's full tile
budget. Each request therefore uses the largest tile budget whose prompt and decode steps fit
(`fit_to_context`, counted with the real prompt assembly); calibration.json records the budget of
every request and one line says when images were capped.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nvlm_export.calibration.builtin import builtin_image, builtin_prompt
from nvlm_export.calibration.dataset import (
    CALIBRATION_SET,
    CalibrationInfo,
    CalibrationSet,
    CalibrationWriter,
    RequestTiling,
    bundle_fingerprint,
)
from nvlm_export.defaults import CALIBRATION_DECODE_STEPS, CALIBRATION_REQUESTS
from nvlm_export.errors import ImageError, InputError
from nvlm_export.output import staged_output
from nvlm_export.runtime.images import load_image
from nvlm_export.runtime.manifest import VISION_GRAPH, load_manifest
from nvlm_export.runtime.pipeline import Pipeline, PreparedRequest
from nvlm_export.runtime.sampling import check_seed

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Share of the given images kept out of calibration for the accuracy report (when >= 5 images).
HOLDOUT_FRACTION = 0.2
MIN_IMAGES_FOR_HOLDOUT = 5
# Offset between the calibration seed and the seed of the built-in held-out set, so the accuracy
# report never measures on images the scales were fitted to.
HELD_OUT_SEED_OFFSET = 1_000_003

Warn = Callable[[str], None]


@dataclass(frozen=True)
class CalibrationOptions:
    images: str | None = None  # a directory or a glob; None: the built-in set
    prompts: Path | None = None  # JSONL, one {"prompt": "..."} per line; None: built-in prompts
    max_samples: int = CALIBRATION_REQUESTS  # requests (image + prompt) to record
    seed: int = 0
    decode_steps: int = CALIBRATION_DECODE_STEPS
    # The graphs to record (None: all). Vision alone (what an INT4 bundle's INT8 vision graph
    # needs) only tiles and encodes each image: the decoder is neither loaded nor run.
    graphs: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.max_samples < 1:
            raise InputError(f"--max-samples {self.max_samples} is invalid", fix="Use 1 or more")
        if self.decode_steps < 0:
            raise InputError(f"--decode-steps {self.decode_steps} is invalid", fix="Use 0 or more")
        check_seed(self.seed)


@dataclass(frozen=True)
class Request:
    """One calibration (or accuracy) request: a named image, a prompt and its tile budget."""

    name: str
    image: Image.Image
    prompt: str
    max_tiles: int | None = None  # None: the bundle's; set by `fit_to_context`


class RecordingRunner:
    """A graph runner that hands every call's feeds to `record` before running them."""

    # Recorded decoder feeds are what the standard graph takes (pasts of the cache's length),
    # so the pipeline gives recorded requests caches replaced each step, not in-place buffers.
    keeps_kv_in_place = False

    def __init__(self, runner: Any, record: Callable[[Mapping[str, np.ndarray]], None]) -> None:
        self.inner = runner
        self.spec = runner.spec
        self.record = record

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.record(feeds)
        return self.inner.infer(feeds)

    __call__ = infer


def record_calls(
    pipe: Pipeline,
    record: Callable[[str, Mapping[str, np.ndarray]], None],
    graphs: Collection[str] | None = None,
) -> None:
    """Wrap the runners of `pipe` (those of `graphs`, default all) so each graph call is recorded
    as (graph name, feeds)."""
    for name, runner in list(pipe.runners.items()):
        if graphs is not None and name not in graphs:
            continue
        pipe.runners[name] = RecordingRunner(runner, lambda feeds, n=name: record(n, feeds))


def fit_to_context(pipe: Pipeline, request: Request, new_tokens: int) -> Request:
    """The request with the largest tile budget whose prompt and `new_tokens` generated tokens
    fit the bundle's context (PromptError when not even one tile per image fits)."""
    budget = pipe.max_tiles_fitting(request.prompt, [request.image], new_tokens=new_tokens)
    return replace(request, max_tiles=budget)


def run_request(
    pipe: Pipeline, request: Request, new_tokens: int, *, encode_only: bool = False
) -> RequestTiling:
    """One greedy request through the real pipeline, tiled to fit; returns how it was tiled.
    `encode_only`: tile and encode the image, nothing after the vision graph."""
    request = fit_to_context(pipe, request, new_tokens)
    if encode_only:
        prepared = pipe.prepare(request.prompt, [request.image], max_tiles=request.max_tiles)
        pipe.encode_images(prepared.tilings)
        return tiling_record(request, prepared)
    stream = pipe.generate(
        request.prompt, [request.image], max_new_tokens=new_tokens, max_tiles=request.max_tiles
    )
    stream.run()
    return tiling_record(request, stream.prepared)


def tiling_record(request: Request, prepared: PreparedRequest) -> RequestTiling:
    assert request.max_tiles is not None, "fit the request to the context first"
    tiles = sum(tiling.num_tiles for tiling in prepared.tilings)
    return RequestTiling(request.name, request.max_tiles, tiles, prepared.prompt.num_tokens)


def capped_message(
    tilings: Sequence[RequestTiling], max_context: int, bundle_max_tiles: int
) -> str | None:
    """One line saying how many requests had their images capped to fit the context, if any."""
    budgets = sorted({t.max_tiles for t in tilings if t.max_tiles < bundle_max_tiles})
    if not budgets:
        return None
    capped = sum(t.max_tiles < bundle_max_tiles for t in tilings)
    cap = str(budgets[0]) if len(budgets) == 1 else f"{budgets[0]}-{budgets[-1]}"
    return (
        f"bundle context {max_context} tokens: images capped at {cap} tiles (the bundle allows "
        f"{bundle_max_tiles}) in {capped} of {len(tilings)} requests, so prompt and decode steps "
        "fit"
    )


def collect_calibration(
    bundle: Path,
    out: Path,
    options: CalibrationOptions = CalibrationOptions(),
    *,
    overwrite: bool = False,
    warn: Warn = print,
    progress: bool = True,
) -> CalibrationSet:
    """Record a calibration set for `bundle` at `out` (nvlm_export/output.py: locked, atomic)."""
    with staged_output(out, CALIBRATION_SET, overwrite=overwrite, sources=[bundle]) as staged:
        manifest = load_manifest(bundle)
        prompts = read_prompts(options.prompts) if options.prompts else None
        calibration, held_out = _split_images(options, warn)
        info = CalibrationInfo(
            bundle=str(Path(bundle).resolve()),
            bundle_fingerprint=bundle_fingerprint(bundle),
            seed=options.seed,
            decode_steps=options.decode_steps,
            max_samples=options.max_samples,
            source=options.images or "builtin",
            held_out=[str(p) for p in held_out],
            max_context=manifest.kv_cache.max_context,
            bundle_max_tiles=manifest.tiling.max_tiles,
        )
        graphs = _graphs_to_record(options, manifest.graphs)
        encode_only = set(graphs) == {VISION_GRAPH}
        # Caches off: every graph must see every request whole (reuse would skip shared prefixes
        # and repeated images, and the recorded ranges would miss them).
        pipe = Pipeline.load(
            bundle,
            graphs=[VISION_GRAPH] if encode_only else None,
            feature_cache_bytes=0,
            prefix_cache_bytes=0,
        )
        writer = CalibrationWriter(staged.path, info)
        record_calls(pipe, writer.add, graphs)
        requests = _requests(calibration, prompts, options, info, warn)
        for request in _with_progress(requests, options.max_samples, progress):
            steps = options.decode_steps + 1
            info.tiling.append(run_request(pipe, request, steps, encode_only=encode_only))
            info.images.append(request.name)
            info.requests += 1
        _check_not_empty(info, options)
        message = capped_message(info.tiling, info.max_context, info.bundle_max_tiles)
        if message:
            warn(message)
        writer.finish()
        staged.publish()
    return CalibrationSet.open(out)


def _graphs_to_record(options: CalibrationOptions, bundle_graphs: Collection[str]) -> list[str]:
    if options.graphs is None:
        return list(bundle_graphs)
    unknown = [g for g in options.graphs if g not in bundle_graphs]
    if unknown or not options.graphs:
        raise InputError(
            f"--graphs {','.join(options.graphs)!r} is not a list of this bundle's graphs",
            why=f"unknown: {', '.join(unknown)}" if unknown else "no graph was named",
            fix=f"Choose among: {', '.join(bundle_graphs)}",
        )
    return list(dict.fromkeys(options.graphs))


# --- sources ----------------------------------------------------------------------------------


def find_images(spec: str) -> list[Path]:
    """The image files named by a directory or a glob, sorted (the seed then shuffles them)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    elif any(ch in spec for ch in "*?["):
        files = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
    elif path.is_file():
        files = [path]
    else:
        raise InputError(
            f"--images '{spec}' does not exist",
            fix="Pass a directory of images or a glob such as 'photos/*.jpg'",
        )
    return sorted(files)


def split_held_out(files: Sequence[Path], seed: int) -> tuple[list[Path], list[Path]]:
    """Shuffle with the seed; keep 20% (of 5 or more images) out of calibration."""
    order = np.random.default_rng(seed).permutation(len(files))
    shuffled = [files[i] for i in order]
    if len(files) < MIN_IMAGES_FOR_HOLDOUT:
        return shuffled, []
    held = max(1, int(len(files) * HOLDOUT_FRACTION))
    return shuffled[held:], shuffled[:held]


def read_prompts(path: Path) -> list[str]:
    """Prompts from a JSONL file: one {"prompt": "..."} object per line (blank lines skipped)."""
    import json

    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise InputError(f"Cannot read prompts file {path}", why=str(error)) from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(
                f'{path}:{number} is not a JSON object with a "prompt" string',
                fix='Write one {"prompt": "..."} per line',
            ) from None
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{path}:{number} has an empty prompt")
        prompts.append(prompt)
    if not prompts:
        raise InputError(f"{path} has no prompts", fix='Write one {"prompt": "..."} per line')
    return prompts


def builtin_requests(count: int, seed: int) -> Iterator[Request]:
    for index in range(count):
        yield Request(
            f"builtin:{seed}:{index}", builtin_image(index, seed), builtin_prompt(index, seed)
        )


def held_out_requests(info: CalibrationInfo, count: int, warn: Warn = print) -> list[Request]:
    """Requests for the accuracy report that calibration never saw: the held-out images of the
    set, or else the built-in set under another seed."""
    requests: list[Request] = []
    for index, name in enumerate(info.held_out):
        image = _load_or_skip(Path(name), warn, skipped=None)
        if image is not None:
            requests.append(Request(name, image, builtin_prompt(index, info.seed + 1)))
    if requests:
        return requests[:count]
    return list(builtin_requests(count, info.seed + HELD_OUT_SEED_OFFSET))


# --- internals --------------------------------------------------------------------------------


def _split_images(options: CalibrationOptions, warn: Warn) -> tuple[list[Path] | None, list[Path]]:
    if options.images is None:
        warn(
            "calibrating on the built-in synthetic images; images from your deployment domain "
            "(--images DIR) calibrate better"
        )
        return None, []
    files = find_images(options.images)
    if not files:
        raise InputError(
            f"--images '{options.images}' matches no image files",
            why=f"looked for {', '.join(IMAGE_SUFFIXES)}",
            fix="Pass a directory with images or a glob that matches some",
        )
    return split_held_out(files, options.seed)


def _requests(
    files: list[Path] | None,
    prompts: list[str] | None,
    options: CalibrationOptions,
    info: CalibrationInfo,
    warn: Warn,
) -> Iterator[Request]:
    """Up to max_samples readable requests; unreadable images are skipped, warned and counted."""

    def prompt(index: int) -> str:
        return prompts[index % len(prompts)] if prompts else builtin_prompt(index, options.seed)

    if files is None:
        for request in builtin_requests(options.max_samples, options.seed):
            yield Request(request.name, request.image, prompt(len(info.images)))
        return
    for path in files:
        if info.requests >= options.max_samples:
            return
        image = _load_or_skip(path, warn, skipped=info.skipped)
        if image is not None:
            yield Request(str(path), image, prompt(info.requests))


def _load_or_skip(
    path: Path, warn: Warn, skipped: list[dict[str, str]] | None
) -> Image.Image | None:
    try:
        return load_image(path)
    except ImageError as error:
        warn(f"skipping unreadable image {path}: {error.what}")
        if skipped is not None:
            skipped.append({"image": str(path), "reason": error.one_line()})
        return None


def _check_not_empty(info: CalibrationInfo, options: CalibrationOptions) -> None:
    if info.requests == 0:
        raise InputError(
            f"No usable calibration images in '{options.images}'",
            why=f"all {len(info.skipped)} images were unreadable",
            fix="Pass images that open with Pillow (JPEG, PNG, ...)",
        )


def _with_progress(requests: Iterator[Request], total: int, show: bool) -> Iterator[Request]:
    if not show:
        yield from requests
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("calibrating", total=total)
        for request in requests:
            yield request
            bar.advance(task)
