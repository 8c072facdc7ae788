"""Decode steps on OpenVINO with the KV cache kept inside the infer request (stateful) against the
runtime's OpenVINO runner (cache fed and returned as arrays) and ONNX Runtime's in-place cache.

    .venv/bin/python bench/openvino_decode.py BENCH/bundle_int8 --lengths 459,1995

Why: OpenVINO prefills faster than ONNX Runtime on AMX CPUs but decoded at half its speed there,
and the runner copies the whole cache in and out of every step. OpenVINO's
`apply_make_stateful_transformation` ties each past input to its present output inside the
request, so no cache crosses into Python; if that closed the gap, the decoder could run on one
backend instead of two (two copies of its weights with `prefill=openvino`). The stateful decoder
is made here only, with OpenVINO's own API: the runtime does not have one.

One process: the three systems run the same synthetic prompt (random embeddings, so no vision or
tokenizer work is timed), alternated in each round; the medians of the rounds' median steps are
printed, with the largest logit difference of the stateful decoder from the runner's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from kv_cache import add_step_arguments  # this directory: scripts run as bench/NAME.py

from nvlm_export.runtime.backends import get_backend
from nvlm_export.runtime.backends.base import GraphRunner, GraphSpec
from nvlm_export.runtime.generation import InPlaceKVCache, KVCache, KVCacheLike
from nvlm_export.runtime.manifest import Manifest, layer_tensor, load_manifest
from nvlm_export.runtime.pipeline import DEFAULT_PREFILL_CHUNK_TOKENS

CHUNK = DEFAULT_PREFILL_CHUNK_TOKENS
System = Callable[[np.ndarray, int, int], tuple[list[float], np.ndarray]]


def prompt_feeds(embeds: np.ndarray, start: int, end: int) -> dict[str, np.ndarray]:
    return {"inputs_embeds": embeds[:, start:end], "position_ids": np.arange(start, end)[None]}


def run_cached(
    runner: GraphRunner, cache: KVCacheLike, embeds: np.ndarray, length: int, steps: int
) -> tuple[list[float], np.ndarray]:
    """Prefill `length` positions in chunks, then time `steps` one-token calls."""
    for start in range(0, length, CHUNK):
        cache.step(runner.infer, prompt_feeds(embeds, start, min(length, start + CHUNK)))
    times, logits = [], None
    for position in range(length, length + steps):
        began = time.perf_counter()
        logits = cache.step(runner.infer, prompt_feeds(embeds, position, position + 1))["logits"]
        times.append(time.perf_counter() - began)
    return times, np.asarray(logits)


class StatefulOpenVino:
    """The decoder compiled with each past tied to its present inside the infer request."""

    def __init__(self, spec: GraphSpec, manifest: Manifest, threads: int) -> None:
        import openvino
        from openvino._offline_transformations import apply_make_stateful_transformation

        kv = manifest.kv_cache
        pairs = {}
        for layer in range(kv.num_layers):
            pairs[layer_tensor(kv.past_key, layer)] = layer_tensor(kv.present_key, layer)
            pairs[layer_tensor(kv.past_value, layer)] = layer_tensor(kv.present_value, layer)
        core = openvino.Core()
        model = core.read_model(str(spec.path))
        apply_make_stateful_transformation(model, pairs)
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.empty = openvino.Tensor(np.zeros((1, kv.num_kv_heads, 0, kv.head_dim), kv.dtype))

    def run(self, embeds: np.ndarray, length: int, steps: int) -> tuple[list[float], np.ndarray]:
        self.request.reset_state()
        for state in self.request.query_state():
            state.state = self.empty
        for start in range(0, length, CHUNK):
            self.request.infer(prompt_feeds(embeds, start, min(length, start + CHUNK)))
        times, logits = [], None
        for position in range(length, length + steps):
            began = time.perf_counter()
            result = self.request.infer(prompt_feeds(embeds, position, position + 1))
            logits = np.array(result[self.compiled.output("logits")])
            times.append(time.perf_counter() - began)
        return times, logits


def measure(args: argparse.Namespace) -> None:
    manifest = load_manifest(args.bundle)
    graph = manifest.graphs["decoder"]
    ort_spec = GraphSpec.from_manifest("decoder", graph, args.bundle, backend="onnxruntime")
    ov_spec = GraphSpec.from_manifest("decoder", graph, args.bundle)
    ort = get_backend("onnxruntime")(ort_spec, intra_op_threads=args.threads)
    openvino = get_backend("openvino")(ov_spec, intra_op_threads=args.threads)
    stateful = StatefulOpenVino(ov_spec, manifest, args.threads)
    hidden = next(i for i in graph.inputs if i.name == "inputs_embeds").shape[-1]
    systems: dict[str, System] = {
        "ONNX Runtime, in place": lambda e, n, k: run_cached(
            ort, _ort_cache(manifest, ort), e, n, k
        ),
        "OpenVINO runner": lambda e, n, k: run_cached(
            openvino, KVCache.from_spec(manifest.kv_cache), e, n, k
        ),
        "OpenVINO stateful": stateful.run,
    }
    print(f"| prompt | {' | '.join(systems)} | max abs logit difference, stateful vs runner |")
    print("|---" * (len(systems) + 2) + "|")
    with ort, openvino:
        for length in args.lengths:
            rng = np.random.default_rng(0)
            shape = (1, length + args.new_tokens, hidden)
            embeds = (rng.standard_normal(shape) * 0.02).astype(np.float32)
            medians: dict[str, list[float]] = {name: [] for name in systems}
            logits = {}
            for round_index in range(args.rounds + 1):  # round 0 warms every system up
                for name, system in systems.items():
                    times, logits[name] = system(embeds, length, args.new_tokens)
                    if round_index:
                        medians[name].append(statistics.median(times))
            cells = [f"{statistics.median(medians[name]) * 1e3:.1f} ms" for name in systems]
            drift = np.abs(logits["OpenVINO stateful"] - logits["OpenVINO runner"]).max()
            print(f"| {length} tokens | {' | '.join(cells)} | {drift:.1e} |", flush=True)


def _ort_cache(manifest: Manifest, runner: GraphRunner) -> KVCacheLike:
    spec = manifest.kv_cache
    return InPlaceKVCache(spec) if runner.keeps_kv_in_place else KVCache.from_spec(spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    add_step_arguments(parser)
    measure(parser.parse_args())


if __name__ == "__main__":
    main()
