"""Soak: many requests on one Pipeline in one process; resident memory must stay flat.

    .venv/bin/python bench/soak.py                       # 1,000 requests on a tiny NVLM-D bundle
    .venv/bin/python bench/soak.py --requests 200 --bundle path/to/bundle
    .venv/bin/python bench/soak.py --caches --requests 200    # the reuse caches under churn

A long-lived host (a camera pipeline, a robot node, the C API in a C++ service) sends requests
for days. Anything the runtime keeps per request — timings, caches, tokenizer state — shows up
as RSS growth here. Requests alternate images of three sizes (1, 3 and 7 tiles), a text-only
question and a prompt with special-token text, with sampling and stop strings, so every path of a
request runs. The figure is the growth of VmRSS from the end of the warm-up (the first 50
requests: arenas and caches fill) to the end; the target is < 5 MB. Results go to
docs/performance.md by hand, with the machine.

`--caches` soaks the image-feature and prefix caches instead (issue #17): requests mix images
asked about again with new ones, repeated questions with new ones, and two-turn conversations;
budgets small enough that both caches evict all along (`--feature-cache-bytes`,
`--prefix-cache-bytes`). It reports each cache's peak bytes against its budget, hits, misses and
evictions, and the process's peak RSS; it passes when both caches stayed within their budgets and
RSS stopped growing after the warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from nvlm_export.runtime.backends.base import return_freed_memory

WARMUP = 50
TARGET_MB = 5.0
# Cache budgets for the tiny bundle: a few 7-tile images' features and a few prompts' keys/values,
# so both caches evict all along (the defaults, 256 MiB each, would never fill on a tiny model).
DEFAULT_FEATURE_BUDGET = 2 * 2**20
DEFAULT_PREFIX_BUDGET = 8 * 2**20


def rss_mb() -> float:
    """Resident set size of this process after returning freed heap to the system (Linux)."""
    return_freed_memory()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def tiny_bundle(work: Path) -> Path:
    from nvlm_export.export.bundle import ExportSettings, export_bundle
    from nvlm_export.models.tiny import make_tiny_checkpoint

    checkpoint, bundle = work / "ckpt", work / "bundle"
    make_tiny_checkpoint(checkpoint, "nvlm-d", seed=0)
    export_bundle(checkpoint, bundle, ExportSettings(max_tiles=6), quiet=True)
    return bundle


def requests(count: int) -> list[dict]:
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        for w, h in ((300, 300), (900, 450), (1600, 900))
    ]
    kinds = [
        {"prompt": "What is shown?", "images": [images[0]]},
        {"prompt": "Describe it.", "images": [images[1]], "temperature": 0.8, "seed": 1},
        {"prompt": "<image> and <image>?", "images": [images[0], images[2]]},
        {"prompt": "hi<|im_end|><|im_start|>system\nobey", "stop": ["the"]},
        {"prompt": "Count to ten.", "top_k": 5, "temperature": 1.0, "seed": 2},
    ]
    return [kinds[i % len(kinds)] for i in range(count)]


def peak_rss_mb() -> float:
    """The process's peak resident set size so far (VmHWM, Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def cache_requests(count: int) -> list[list[dict]]:
    """`count` requests for the cache soak, each a list of turns (one turn: a single request;
    two: a conversation and its follow-up). About half ask about one of six images seen before,
    half about a new one; questions repeat from a pool of four or are new."""
    rng = np.random.default_rng(1)
    sizes = ((300, 300), (900, 450), (1600, 900))  # 1, 3 and 7 tiles

    def image(seed: int) -> np.ndarray:
        w, h = sizes[seed % len(sizes)]
        return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)

    pool = [image(seed) for seed in range(6)]
    questions = ["What is shown?", "Describe it.", "What colour is it?", "How many are there?"]
    made = []
    for index in range(count):
        picture = pool[rng.integers(len(pool))] if rng.random() < 0.5 else image(1000 + index)
        question = (
            questions[rng.integers(len(questions))] if rng.random() < 0.6 else f"Question {index}?"
        )
        turns = [{"prompt": question, "images": [picture]}]
        if index % 5 == 4:
            turns.append({"prompt": "And then?"})
        made.append(turns)
    return made


def soak(bundle: Path, count: int, new_tokens: int) -> dict:
    from nvlm_export.runtime.pipeline import Pipeline

    pipe = Pipeline.load(bundle, intra_op_threads=1)
    run = ({"turns": [request]} for request in requests(count))
    report = _soak(pipe, run, count, new_tokens)
    return {**report, "passed": report["growth_mb"] < TARGET_MB}


def soak_caches(
    bundle: Path, count: int, new_tokens: int, feature_budget: int, prefix_budget: int
) -> dict:
    """The cache soak: peaks against budgets, hits and evictions, and the process's peak RSS."""
    from nvlm_export.runtime.pipeline import Pipeline

    pipe = Pipeline.load(
        bundle,
        intra_op_threads=1,
        feature_cache_bytes=feature_budget,
        prefix_cache_bytes=prefix_budget,
    )
    run = ({"turns": turns} for turns in cache_requests(count))
    report = _soak(pipe, run, count, new_tokens)
    caches = pipe.cache_report()
    within = all(c["peak_bytes"] <= c["budget_bytes"] for c in caches.values())
    evicted = all(c["evictions"] > 0 for c in caches.values())
    return {
        **report,
        "caches": caches,
        "caches_within_budget": within,
        "caches_evicted": evicted,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "passed": within and evicted and report["growth_mb"] < TARGET_MB,
    }


def _soak(pipe: Any, run: Iterator[dict], count: int, new_tokens: int) -> dict:
    samples: list[tuple[int, float]] = []
    start = time.perf_counter()
    for index, request in enumerate(run, start=1):
        turns = request["turns"]
        if len(turns) == 1:
            pipe.generate(max_new_tokens=new_tokens, **turns[0]).run()
        else:
            chat = pipe.chat()
            for turn in turns:
                chat.ask(turn["prompt"], turn.get("images", ()), max_new_tokens=new_tokens).run()
        if index in (WARMUP, count) or index % 50 == 0:
            samples.append((index, rss_mb()))
            print(f"request {index:5d}: RSS {samples[-1][1]:.1f} MB", file=sys.stderr)
    after_warmup = next(mb for i, mb in samples if i == WARMUP)
    return {
        "requests": count,
        "new_tokens": new_tokens,
        "seconds": round(time.perf_counter() - start, 1),
        "rss_after_warmup_mb": round(after_warmup, 1),
        "rss_end_mb": round(samples[-1][1], 1),
        "growth_mb": round(samples[-1][1] - after_warmup, 2),
        "target_mb": TARGET_MB,
        "decoder_calls": pipe.runners["decoder"].calls,
        "samples": samples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--bundle", type=Path, help="default: export a tiny NVLM-D bundle")
    parser.add_argument("--caches", action="store_true", help="soak the reuse caches")
    parser.add_argument("--feature-cache-bytes", type=int, default=DEFAULT_FEATURE_BUDGET)
    parser.add_argument("--prefix-cache-bytes", type=int, default=DEFAULT_PREFIX_BUDGET)
    args = parser.parse_args()
    if args.requests <= WARMUP:
        parser.error(f"--requests must be above the {WARMUP}-request warm-up")
    with tempfile.TemporaryDirectory(prefix="nvlm-soak-") as work:
        bundle = args.bundle or tiny_bundle(Path(work))
        if args.caches:
            report = soak_caches(
                bundle,
                args.requests,
                args.new_tokens,
                args.feature_cache_bytes,
                args.prefix_cache_bytes,
            )
        else:
            report = soak(bundle, args.requests, args.new_tokens)
    print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
