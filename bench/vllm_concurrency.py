"""Concurrent requests through the vLLM hand-off vs our single-stream runtime (docs/scale-out.md).

    python bench/vllm_concurrency.py --bundle BUNDLE --vllm-python VENV/bin/python

BUNDLE is an fp32 bundle handed off to vLLM in fp32 (`nvlm-export handoff CKPT BUNDLE --engine
vllm --dtype float32`), so both sides run the same precision. One process per system, as in
bench/run.py (thread pools that spin would slow a neighbour in the same process), alternating
rounds: ours, vLLM, ours, vLLM, ... Per round, ours serves `--runs` single 1-tile requests; vLLM
serves `--concurrency` 1-tile requests at once (different images, so no prompt is a cached
prefix of another) `--runs` times. The target: vLLM's aggregate decode tokens/s >= 3x ours.
Prints one JSON document; `--worker` is the per-process entry point.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULT = "RESULT "
QUESTION_TOKENS = 32


def _images(bundle: Path, count: int, scratch: Path) -> list[Path]:
    from nvlm_export.profiling.inputs import image_size_for_tiles, synthetic_image
    from nvlm_export.runtime.manifest import load_manifest

    tiling = load_manifest(bundle).tiling
    size = image_size_for_tiles(1, tiling)
    paths = []
    for seed in range(count):
        path = scratch / f"image-{seed}.jpg"
        synthetic_image(size, seed=seed).save(path, quality=90)
        paths.append(path)
    return paths


def _ours(args: argparse.Namespace, images: list[Path]) -> dict:
    from nvlm_export.profiling.inputs import question_with_tokens
    from nvlm_export.runtime.pipeline import Pipeline

    pipe = Pipeline.load(args.bundle, intra_op_threads=args.threads)
    question = question_with_tokens(pipe.tokenizer, QUESTION_TOKENS)
    runs = []
    for index in range(args.runs + 1):  # the first is a warm-up
        result = pipe.generate(
            question, [images[index % len(images)]], max_new_tokens=args.new_tokens, ignore_eos=True
        ).run()
        if index:
            runs.append(
                {
                    "decode_tokens_per_second": result.timings.decode_tokens_per_second,
                    "time_to_first_token": result.timings.time_to_first_token,
                }
            )
    return {"runs": runs}


def _vllm(args: argparse.Namespace, images: list[Path]) -> dict:
    from nvlm_export.handoff.vllm_engine import Request, VLLMPipeline
    from nvlm_export.profiling.inputs import question_with_tokens

    start = time.perf_counter()
    options = {"enforce_eager": True} if args.eager else {}
    engine = VLLMPipeline.load(
        args.bundle, cpu_kv_cache_gib=args.kv_cache_gib, engine_options=options
    )
    load_seconds = time.perf_counter() - start
    question = question_with_tokens(engine.pipeline.tokenizer, QUESTION_TOKENS)
    requests = [Request(question, (image,)) for image in images[: args.concurrency]]
    batches = []
    for index in range(args.runs + 1):  # the first is a warm-up
        engine.pipeline.clear_caches()  # every batch encodes its images
        batch = engine.generate_concurrent(
            requests, max_new_tokens=args.new_tokens, ignore_eos=True
        )
        if index:
            batches.append(
                {
                    "aggregate_decode_tokens_per_second": batch.aggregate_decode_tokens_per_second,
                    "aggregate_tokens_per_second": batch.aggregate_tokens_per_second,
                    "time_to_first_token": [t.first_token for t in batch.timings],
                    "prepare_seconds": batch.prepare_seconds,
                    "generate_seconds": batch.generate_seconds,
                }
            )
    single = engine.generate(
        question, [images[0]], max_new_tokens=args.new_tokens, ignore_eos=True
    ).run()
    return {
        "load_seconds": load_seconds,
        "batches": batches,
        "single_decode_tokens_per_second": single.timings.decode_tokens_per_second,
    }


def _worker(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        images = _images(args.bundle, max(args.concurrency, args.runs + 1), Path(scratch))
        result = _ours(args, images) if args.worker == "ours" else _vllm(args, images)
    print(RESULT + json.dumps(result), flush=True)


def _run_worker(python: str, kind: str, args: argparse.Namespace) -> dict:
    command = [python, __file__, "--worker", kind, "--bundle", str(args.bundle)]
    for name in ("runs", "new_tokens", "concurrency", "threads", "kv_cache_gib"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    command += ["--eager"] if args.eager else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode or not lines:
        raise SystemExit(f"{kind} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix(RESULT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--vllm-python", default=sys.executable)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--eager", action="store_true", help="vLLM without torch.compile")
    parser.add_argument("--worker", choices=("ours", "vllm"))
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    ours, vllm = [], []
    for _ in range(args.rounds):
        ours.append(_run_worker(sys.executable, "ours", args))
        vllm.append(_run_worker(args.vllm_python, "vllm", args))
    ours_tps = statistics.median(r["decode_tokens_per_second"] for o in ours for r in o["runs"])
    vllm_tps = statistics.median(
        b["aggregate_decode_tokens_per_second"] for v in vllm for b in v["batches"]
    )
    ttft = [b["time_to_first_token"] for v in vllm for b in v["batches"]]
    summary = {
        "ours_single_stream_decode_tokens_per_second": ours_tps,
        "vllm_concurrent_aggregate_decode_tokens_per_second": vllm_tps,
        "ratio": vllm_tps / ours_tps,
        "target_ratio": 3.0,
        "vllm_ttft_per_request_seconds_last_batch": ttft[-1],
        "settings": {k: str(v) for k, v in vars(args).items()},
        "ours": ours,
        "vllm": vllm,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
