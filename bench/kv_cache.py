"""Decode steps with the KV cache written in place against caches replaced each step.

    .venv/bin/python bench/kv_cache.py BENCH/bundle_int4 BENCH/bundle_int8 --lengths 459,1995

One process per bundle, one set of ONNX Runtime runners: a pipeline whose decoder writes its
keys/values into whole-context buffers (`InPlaceKVCache`, the default where the bundle's decoder
variant declares `kv_in_place`) and one sharing its runners that feeds and replaces the cache
every step (`KVCache`, what TensorRT and OpenVINO get). Each round times a greedy answer on a text
prompt of each length with both, alternating; the medians of the rounds' median steps are
printed as the table of docs/decoder-graph.md, "The KV cache written in place".
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from nvlm_export.profiling.inputs import question_with_tokens
from nvlm_export.runtime.pipeline import Pipeline


class ReplacingCaches(Pipeline):
    """The same runners with caches replaced each step (the graph's presents are kept)."""

    keeps_kv_in_place = False  # type: ignore[assignment]


def median_step(pipe: Pipeline, question: str, new_tokens: int) -> tuple[float, int]:
    """The median decode step of one greedy answer, and the prompt's length in tokens."""
    stream = pipe.generate(question, max_new_tokens=new_tokens, ignore_eos=True, raw=True)
    steps = stream.run().timings.decode_seconds
    return statistics.median(steps), stream.prepared.prompt.num_tokens


def measure(bundle: Path, args: argparse.Namespace) -> list[str]:
    options = dict(intra_op_threads=args.threads, feature_cache_bytes=0, prefix_cache_bytes=0)
    in_place = Pipeline.load(bundle, **options)
    if not in_place.keeps_kv_in_place:
        raise SystemExit(f"{bundle}: its decoder does not write the cache in place here")
    replacing = ReplacingCaches.load(bundle, shared_runners=in_place.runners, **options)
    rows = []
    for length in args.lengths:
        question = question_with_tokens(in_place.tokenizer, length)
        times: dict[str, list[float]] = {"replaced": [], "in place": []}
        for round_index in range(args.rounds + 1):  # round 0 warms both up
            for name, pipe in (("replaced", replacing), ("in place", in_place)):
                step, tokens = median_step(pipe, question, args.new_tokens)
                if round_index:
                    times[name].append(step)
        before, after = (statistics.median(times[k]) for k in ("replaced", "in place"))
        rows.append(
            f"| {bundle.name} | {tokens} tokens | {before * 1e3:.2f} ms | {after * 1e3:.2f} ms "
            f"| {before / after:.2f}× |"
        )
        print(rows[-1], flush=True)
    return rows


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a decode-step comparison (this script's and bench/openvino_decode.py's)."""
    parser.add_argument(
        "--lengths",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[459, 1995],
        help="prompt lengths in tokens (default 459,1995)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    add_step_arguments(parser)
    args = parser.parse_args()
    print("| bundle | prompt | caches replaced each step | in place | speed-up |")
    print("|---|---|---|---|---|")
    for bundle in args.bundles:
        measure(bundle, args)


if __name__ == "__main__":
    main()
