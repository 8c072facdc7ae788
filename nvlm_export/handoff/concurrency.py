"""The profiler's "N concurrent requests" case, for bundles served through vLLM.

For each tile count, N requests with a synthetic image of that many tiles (as `nvlm-export
profile` makes them) go to vLLM together; reported per case are the aggregate tokens/s (all new
tokens over the generation wall clock), the aggregate decode tokens/s (tokens after each
request's first, from the first first-token to the end) and every request's time to first token
(from the batch's start, so queueing behind other prefills counts). Our side (tiling, vision,
splicing) runs before the batch and is reported apart; every batch starts with empty reuse caches,
so the N identical images of a batch are encoded once (the feature cache), as a server would.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvlm_export.handoff.vllm_engine import ConcurrentResult, Request, VLLMPipeline
from nvlm_export.profiling.inputs import image_size_for_tiles, question_with_tokens, synthetic_image


@dataclass(frozen=True)
class ConcurrencySettings:
    tiles: tuple[int, ...] = (1,)
    concurrency: int = 8
    prompt_tokens: int = 32
    new_tokens: int = 32
    runs: int = 3
    warmup: int = 1


def profile_concurrency(
    engine: VLLMPipeline,
    settings: ConcurrencySettings,
    *,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """One case per tile count (see the module docstring); medians over `runs` batches."""
    say = progress or (lambda _: None)
    question = question_with_tokens(engine.pipeline.tokenizer, settings.prompt_tokens)
    cases = []
    with tempfile.TemporaryDirectory(prefix="nvlm-concurrency-") as scratch:
        for tiles in settings.tiles:
            say(f"profiling {settings.concurrency} concurrent requests, {tiles} tile(s) each")
            image = Path(scratch) / f"tiles-{tiles}.jpg"
            size = image_size_for_tiles(tiles, engine.pipeline.tiling)
            synthetic_image(size, seed=tiles).save(image, quality=90)
            requests = [Request(question, (image,))] * settings.concurrency
            batches = [
                _cold_batch(engine, requests, settings.new_tokens)
                for _ in range(settings.warmup + settings.runs)
            ][settings.warmup :]
            cases.append(_case(tiles, settings.concurrency, batches))
    return {
        "engine": "vllm",
        "tensor_parallel_size": engine.tensor_parallel_size,
        "settings": settings.__dict__,
        "cases": cases,
    }


def _cold_batch(
    engine: VLLMPipeline, requests: Sequence[Request], new_tokens: int
) -> ConcurrentResult:
    engine.pipeline.clear_caches()
    return engine.generate_concurrent(requests, max_new_tokens=new_tokens, ignore_eos=True)


def _case(tiles: int, concurrency: int, batches: Sequence[ConcurrentResult]) -> dict[str, Any]:
    last = batches[-1]
    return {
        "tiles": tiles,
        "concurrent_requests": concurrency,
        "aggregate_tokens_per_second": statistics.median(
            b.aggregate_tokens_per_second for b in batches
        ),
        "aggregate_decode_tokens_per_second": statistics.median(
            b.aggregate_decode_tokens_per_second for b in batches
        ),
        "generate_seconds": statistics.median(b.generate_seconds for b in batches),
        "prepare_seconds": statistics.median(b.prepare_seconds for b in batches),
        "time_to_first_token_seconds": [t.first_token for t in last.timings],
        "new_tokens": [t.new_tokens for t in last.timings],
    }
