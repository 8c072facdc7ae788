"""ONNX Runtime graph variants: fused attention that computes what the standard graph computes,
declared in the manifest for ONNX Runtime only, with the standard graph kept for TensorRT."""

from __future__ import annotations

import json
import shutil
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from helpers import slow
from helpers.tiny import TinyBundle

from nvlm_export.errors import BundleError, InputError
from nvlm_export.export.fused_attention import fuse_decoder_attention, fuse_vision_attention
from nvlm_export.export.qdq import quantize_static_graph
from nvlm_export.runtime.backends import GraphRunner, GraphSpec, get_backend
from nvlm_export.runtime.generation import InPlaceKVCache, KVCache, prefill
from nvlm_export.runtime.manifest import (
    DECODER_GRAPH,
    MANIFEST_NAME,
    VISION_GRAPH,
    KVCacheSpec,
    Manifest,
    load_manifest,
)
from nvlm_export.runtime.manifest import GraphSpec as ManifestGraph
from nvlm_export.runtime.pipeline import Pipeline

# nvlm-d: the 6B-style ViT (RMSNorm, q/k norms before the heads split); internvl: the 300M style.
LAYOUTS = ("nvlm-d", "internvl")
QDQ = ("QuantizeLinear", "DequantizeLinear")


def _ops(path: Path) -> Counter[str]:
    model = onnx.load(str(path), load_external_data=False)
    return Counter(f"{n.domain or 'ai.onnx'}.{n.op_type}" for n in model.graph.node)


def _tiles(count: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, size, size), dtype=np.float32)


def _run(path: Path, spec: GraphSpec, tiles: np.ndarray) -> np.ndarray:
    return next(iter(_run_graph(path, spec, {"pixel_values": tiles}).values()))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_vision_attention_block_is_one_fused_op_in_the_onnxruntime_variant(
    tiny_bundle: TinyBundle, layout: str
) -> None:
    _, bundle = tiny_bundle(layout)
    graph = load_manifest(bundle).graph(VISION_GRAPH)
    variant = graph.variants["onnxruntime"]
    fused, standard = _ops(bundle / variant.file), _ops(bundle / graph.file)
    assert variant.fused_ops == ("com.microsoft.MultiHeadAttention",)
    assert fused["com.microsoft.MultiHeadAttention"] == standard["ai.onnx.Softmax"] > 0
    assert fused["ai.onnx.Softmax"] == 0
    # The standard graph stays in standard ops for TensorRT and lint.
    assert all(op.startswith("ai.onnx.") for op in standard)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_variant_computes_the_standard_graphs_image_features(
    tiny_bundle: TinyBundle, layout: str
) -> None:
    _, bundle = tiny_bundle(layout)
    graph = load_manifest(bundle).graph(VISION_GRAPH)
    spec = GraphSpec.from_manifest(VISION_GRAPH, graph, bundle)
    size = graph.inputs[0].shape[-1]
    tiles = _tiles(3, size)
    standard = _run(bundle / graph.file, spec, tiles)
    fused = _run(bundle / graph.variants["onnxruntime"].file, spec, tiles)
    assert np.abs(fused - standard).max() <= 1e-5 * np.abs(standard).max()


def test_onnxruntime_runs_the_variant_and_other_backends_the_standard_graph(
    tiny_bundle: TinyBundle,
) -> None:
    _, bundle = tiny_bundle("nvlm-d")
    graph = load_manifest(bundle).graph(VISION_GRAPH)
    variant = graph.variants["onnxruntime"].file
    assert GraphSpec.from_manifest("v", graph, bundle, backend="onnxruntime").path.name == variant
    assert GraphSpec.from_manifest("v", graph, bundle, backend="tensorrt").path.name == graph.file
    assert Pipeline.load(bundle).runners[VISION_GRAPH].spec.path.name == variant
    standard = Pipeline.load(bundle, graph_variants=False)
    assert standard.runners[VISION_GRAPH].spec.path.name == graph.file


def test_a_variant_derived_from_an_int8_graph_keeps_its_quantization(
    tiny_bundle: TinyBundle, tmp_path: Path
) -> None:
    _, bundle = tiny_bundle("internvl")
    graph = load_manifest(bundle).graph(VISION_GRAPH)
    size = graph.inputs[0].shape[-1]
    int8 = tmp_path / "vision.onnx"
    samples = [{"pixel_values": _tiles(1, size, seed)} for seed in range(2)]
    quantize_static_graph(bundle / graph.file, int8, samples, precision="int8", exclude=[])
    fused = tmp_path / "vision.ort.onnx"
    assert fuse_vision_attention(int8, fused) > 0

    def qdq(path: Path) -> list[tuple[str, tuple[str, ...]]]:
        model = onnx.load(str(path), load_external_data=False)
        return sorted((n.op_type, tuple(n.input)) for n in model.graph.node if n.op_type in QDQ)

    assert qdq(fused) == qdq(int8)
    spec = GraphSpec.from_manifest(VISION_GRAPH, graph, bundle)
    tiles = _tiles(2, size, seed=5)
    standard, variant = _run(int8, spec, tiles), _run(fused, spec, tiles)
    cosine = np.sum(standard * variant) / np.linalg.norm(standard) / np.linalg.norm(variant)
    assert cosine > 0.9999


def test_a_variant_file_outside_the_bundle_is_refused(
    tiny_bundle: TinyBundle, tmp_path: Path
) -> None:
    _, source = tiny_bundle("internvl")
    bundle = tmp_path / "bundle"
    shutil.copytree(source, bundle)
    path = bundle / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["graphs"]["vision"]["variants"]["onnxruntime"]["file"] = "../vision.ort.onnx"
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"graphs\.vision\.variants\.onnxruntime\.file"):
        load_manifest(bundle)


def _cache_feeds(kv: KVCacheSpec, outputs: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    feeds = {}
    for layer in range(kv.num_layers):
        for past, present in ((kv.past_key, kv.present_key), (kv.past_value, kv.present_value)):
            empty = np.zeros((1, kv.num_kv_heads, 0, kv.head_dim), np.float32)
            name = present.format(layer=layer)
            feeds[past.format(layer=layer)] = empty if outputs is None else outputs[name]
    return feeds


def _typed(
    spec: GraphSpec, feeds: dict[str, np.ndarray], seq: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """`feeds` in the graph's dtypes, plus random values for the inputs they lack (NVLM-H's
    cross keys/values and cross-attention mask)."""
    typed = {}
    for tensor in spec.inputs:
        shape = [seq if d == "seq" else d if isinstance(d, int) else 1 for d in tensor.shape]
        value = feeds.get(tensor.name)
        if value is None:
            value = rng.standard_normal(shape)
            value = value > -1 if tensor.dtype == "bool" else value
        typed[tensor.name] = value.astype(tensor.dtype)
    return typed


# A 5-token prefill, a 3-token chunk on top of it, then one-token steps.
STEPS = (5, 3, 1, 1)


def _standard_and_variant(bundle: Path, graph: ManifestGraph) -> tuple[GraphRunner, GraphRunner]:
    """ONNX Runtime runners of the decoder's standard graph and of its variant."""
    runner = get_backend("onnxruntime")
    return (
        runner(GraphSpec.from_manifest("d", graph, bundle)),
        runner(GraphSpec.from_manifest("d", graph, bundle, backend="onnxruntime")),
    )


def _step_feeds(
    manifest: Manifest,
    spec: GraphSpec,
    outputs: dict[str, np.ndarray] | None,
    past: int,
    seq: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """A call of `seq` random embeddings after `past` positions, on the presents `outputs` of
    the call before (None: an empty cache)."""
    feeds = {
        "inputs_embeds": rng.standard_normal((1, seq, manifest.embedding.hidden_size)),
        "position_ids": np.arange(past, past + seq)[None],
        **_cache_feeds(manifest.kv_cache, outputs),
    }
    return _typed(spec, feeds, seq, rng)


# The cross-attention layouts export their own tiny bundle (~10 s each): CI runs them, the fast
# lane keeps the decoder-only ones.
@pytest.mark.parametrize("layout", [*LAYOUTS, slow("nvlm-x")])
def test_every_cached_self_attention_layer_is_one_group_query_attention_in_the_variant(
    tiny_bundle: TinyBundle, layout: str
) -> None:
    _, bundle = tiny_bundle(layout)
    manifest = load_manifest(bundle)
    graph = manifest.graph(DECODER_GRAPH)
    variant = graph.variants["onnxruntime"]
    fused, standard = _ops(bundle / variant.file), _ops(bundle / graph.file)
    assert variant.fused_ops == ("com.microsoft.GroupQueryAttention",)
    assert fused["com.microsoft.GroupQueryAttention"] == manifest.kv_cache.num_layers
    # NVLM-X's gated cross-attention layers keep their own (non-causal, uncached) attention.
    cross_layers = standard["ai.onnx.Softmax"] - manifest.kv_cache.num_layers
    assert fused["ai.onnx.Softmax"] == cross_layers
    assert all(op.startswith("ai.onnx.") for op in standard)


@pytest.mark.parametrize("layout", [*LAYOUTS, slow("nvlm-h")])
def test_the_decoder_variant_computes_the_standard_graph_in_prefill_chunks_and_decode(
    tiny_bundle: TinyBundle, layout: str
) -> None:
    """Rotary, the causal mask over the cache and the presents, call after call (`STEPS`)."""
    _, bundle = tiny_bundle(layout)
    manifest = load_manifest(bundle)
    graph = manifest.graph(DECODER_GRAPH)
    standard, fused = _standard_and_variant(bundle, graph)
    assert fused.spec.path != standard.spec.path
    rng = np.random.default_rng(0)
    outputs, past = None, 0
    for seq in STEPS:
        feeds = _step_feeds(manifest, standard.spec, outputs, past, seq, rng)
        expected, got = standard.infer(feeds), fused.infer(feeds)
        for name, value in expected.items():
            assert np.abs(got[name] - value).max() <= 1e-5 * np.abs(value).max(), name
        assert got["logits"].argmax() == expected["logits"].argmax()
        outputs, past = expected, past + seq


def test_a_decoder_variant_derived_from_an_int8_graph_keeps_its_quantization(
    tiny_bundle: TinyBundle, tmp_path: Path
) -> None:
    _, bundle = tiny_bundle("internvl")
    manifest = load_manifest(bundle)
    graph = manifest.graph(DECODER_GRAPH)
    spec = GraphSpec.from_manifest(DECODER_GRAPH, graph, bundle)
    rng = np.random.default_rng(1)
    hidden = manifest.embedding.hidden_size

    def prompt(seq: int) -> dict[str, np.ndarray]:
        feeds = {
            "inputs_embeds": rng.standard_normal((1, seq, hidden)),
            "position_ids": np.arange(seq)[None],
            **_cache_feeds(manifest.kv_cache, None),
        }
        return _typed(spec, feeds, seq, rng)

    int8, fused = tmp_path / "decoder.onnx", tmp_path / "decoder.ort.onnx"
    quantize_static_graph(bundle / graph.file, int8, [prompt(6)], precision="int8", exclude=[])
    assert fuse_decoder_attention(int8, fused, manifest) == manifest.kv_cache.num_layers

    def qdq(path: Path) -> list[tuple[str, tuple[str, ...]]]:
        model = onnx.load(str(path), load_external_data=False)
        return sorted((n.op_type, tuple(n.input)) for n in model.graph.node if n.op_type in QDQ)

    assert qdq(fused) == qdq(int8)
    feeds = prompt(9)
    expected = _run_graph(int8, spec, feeds)["logits"]
    got = _run_graph(fused, spec, feeds)["logits"]
    cosine = np.sum(expected * got) / np.linalg.norm(expected) / np.linalg.norm(got)
    assert cosine > 0.9999
    assert got.argmax() == expected.argmax()


def _run_graph(path: Path, spec: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    runner = get_backend("onnxruntime")(GraphSpec(spec.name, path, spec.inputs, spec.outputs))
    with runner:
        return runner.infer(feeds)


@pytest.mark.parametrize("layout", [*LAYOUTS, slow("nvlm-h")])
def test_the_decoder_variant_writes_its_keys_and_values_into_the_past_buffers_in_place(
    tiny_bundle: TinyBundle, layout: str
) -> None:
    """Past and present bound to one buffer of the whole context: each call writes only its own
    positions (the rest stays NaN, so nothing past the cache is ever read) and returns the
    standard graph's logits, with the buffers holding the standard graph's presents."""
    _, bundle = tiny_bundle(layout)
    manifest = load_manifest(bundle)
    graph, kv = manifest.graph(DECODER_GRAPH), manifest.kv_cache
    assert graph.variants["onnxruntime"].kv_in_place
    standard, fused = _standard_and_variant(bundle, graph)
    assert fused.activate().keeps_kv_in_place and not standard.activate().keeps_kv_in_place
    shape = (1, kv.num_kv_heads, kv.max_context, kv.head_dim)
    pasts = [n.format(layer=i) for i in range(kv.num_layers) for n in (kv.past_key, kv.past_value)]
    presents = [
        n.format(layer=i) for i in range(kv.num_layers) for n in (kv.present_key, kv.present_value)
    ]
    buffers = {name: np.full(shape, np.nan, np.float32) for name in pasts}
    rng = np.random.default_rng(0)
    outputs, past = None, 0
    for seq in STEPS:
        feeds = _step_feeds(manifest, standard.spec, outputs, past, seq, rng)
        expected = standard.infer(feeds)
        into = dict(zip(presents, buffers.values(), strict=True))
        got = fused.infer({**feeds, **buffers}, outputs_into=into)
        logits = expected["logits"]
        assert np.abs(got["logits"] - logits).max() <= 1e-5 * np.abs(logits).max()
        past += seq
        for present, buffer in into.items():
            assert got[present] is buffer
            assert np.abs(buffer[:, :, :past] - expected[present]).max() <= 1e-5, present
            assert np.isnan(buffer[:, :, past:]).all(), present
        outputs = expected


def test_only_a_backend_that_writes_in_place_takes_outputs_into(tiny_bundle: TinyBundle) -> None:
    _, bundle = tiny_bundle("internvl")
    graph = load_manifest(bundle).graph(VISION_GRAPH)
    spec = GraphSpec.from_manifest(VISION_GRAPH, graph, bundle)
    size = graph.inputs[0].shape[-1]
    feeds = {"pixel_values": _tiles(1, size)}
    runner = get_backend("onnxruntime")(spec)
    features = np.empty((1, *graph.outputs[0].shape[1:]), np.float32)
    written = runner.infer(feeds, outputs_into={"image_features": features})["image_features"]
    assert written is features and np.array_equal(features, runner.infer(feeds)["image_features"])
    with pytest.raises(InputError, match="writeable C-contiguous numpy array of float32"):
        runner.infer(feeds, outputs_into={"image_features": features.astype(np.float16)})
    with pytest.raises(InputError, match="writeable C-contiguous"):
        runner.infer(feeds, outputs_into={"image_features": np.asfortranarray(features)})

    class ReturnsNewArrays(GraphRunner):  # what TensorRT and OpenVINO runners are today
        backend_name = "returns-new-arrays"

        def _activate_impl(self) -> None:
            pass

        def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"image_features": features.copy()}

    with pytest.raises(InputError, match="cannot write graph outputs into given arrays"):
        ReturnsNewArrays(spec).infer(feeds, outputs_into={"image_features": features})


def test_a_bundle_claiming_kv_in_place_for_a_graph_that_concatenates_fails_in_one_line(
    tiny_bundle: TinyBundle, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A copied bundle whose manifest says `kv_in_place` for a graph that returns
    `concat(past, new)` (here the standard graph): ONNX Runtime refuses to write the longer
    presents into the cache buffers, and the request fails with one line, never past them."""
    _, source = tiny_bundle("internvl")
    bundle = tmp_path / "bundle"
    shutil.copytree(source, bundle)
    manifest = load_manifest(bundle)
    graph = manifest.graph(DECODER_GRAPH)
    lying = replace(graph.variants["onnxruntime"], file=graph.file)
    graphs = {**manifest.graphs, DECODER_GRAPH: replace(graph, variants={"onnxruntime": lying})}
    replace(manifest, graphs=graphs).save(bundle)
    pipe = Pipeline.load(bundle)
    assert pipe.keeps_kv_in_place
    with pytest.raises(InputError) as refused:
        pipe.generate("Hello", max_new_tokens=2).run()
    line = str(refused.value)
    assert "failed to run the decoder graph" in line and "\n" not in line
    assert "onnxruntime" not in capfd.readouterr().err  # no log line of its own beside ours


def test_prompt_calls_that_return_their_presents_fill_an_in_place_cache_by_copies(
    tiny_bundle: TinyBundle,
) -> None:
    """Prompt calls apart on a backend that returns concat(past, new) (OpenVINO; here the
    standard graph) and one-token steps writing in place share one cache: the logits are those
    of the same calls on caches replaced each step, and bad presents are refused."""
    _, bundle = tiny_bundle("internvl")
    manifest = load_manifest(bundle)
    standard, fused = _standard_and_variant(bundle, manifest.graph(DECODER_GRAPH))
    rng = np.random.default_rng(3)
    prompt = rng.standard_normal((1, 7, manifest.embedding.hidden_size)).astype(np.float32)
    token = rng.standard_normal((1, 1, manifest.embedding.hidden_size)).astype(np.float32)

    def run(cache: KVCache | InPlaceKVCache, prompt_calls: Any) -> list[np.ndarray]:
        logits = [prefill(prompt_calls, prompt, cache, chunk_tokens=3)]
        for _ in range(2):
            feeds = {"inputs_embeds": token, "position_ids": np.array([[cache.length]])}
            logits.append(cache.step(fused.infer, feeds)["logits"][0])
        return logits

    in_place = InPlaceKVCache(manifest.kv_cache)
    got = run(in_place, in_place.fed_by_copies(standard.infer))
    expected = run(KVCache.from_spec(manifest.kv_cache), standard.infer)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    assert in_place.length == 9

    def too_short(feeds: dict[str, np.ndarray], **options: Any) -> dict[str, np.ndarray]:
        outputs = standard.infer(feeds)
        return {
            name: value[:, :, :-1] if name != "logits" else value for name, value in outputs.items()
        }

    with pytest.raises(BundleError, match="of length 9"):
        prefill(in_place.fed_by_copies(too_short), prompt[:, :1], in_place)


def test_threads_sharing_a_runner_each_write_their_own_in_place_cache(
    tiny_bundle: TinyBundle,
) -> None:
    """A runner serves several requests at once (the C API, shared runners): each thread binds
    its own cache's buffers, so concurrent requests compute what they compute one at a time."""
    _, bundle = tiny_bundle("internvl")
    manifest = load_manifest(bundle)
    _, fused = _standard_and_variant(bundle, manifest.graph(DECODER_GRAPH))
    hidden = manifest.embedding.hidden_size

    def request(seed: int, start: threading.Barrier | None = None) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        cache = InPlaceKVCache(manifest.kv_cache)
        if start is not None:
            start.wait()  # every thread's steps interleave from the first one
        logits = [prefill(fused.infer, rng.standard_normal((1, 6, hidden), np.float32), cache)]
        for _ in range(40):
            feeds = {
                "inputs_embeds": rng.standard_normal((1, 1, hidden), np.float32),
                "position_ids": np.array([[cache.length]]),
            }
            logits.append(cache.step(fused.infer, feeds)["logits"][0])
        return logits

    alone = {seed: request(seed) for seed in range(4)}
    together: dict[int, list[np.ndarray]] = {}
    start = threading.Barrier(4)
    threads = [
        threading.Thread(target=lambda s=seed: together.__setitem__(s, request(s, start)))
        for seed in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed, logits in alone.items():
        assert all(np.array_equal(a, b) for a, b in zip(logits, together[seed], strict=True))
