"""ONNX Runtime graph variants: fused attention that computes what the standard graph computes,
declared in the manifest for ONNX Runtime only, with the standard graph kept for TensorRT."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import TinyBundle

from nvlm_export.errors import BundleError
from nvlm_export.export.fused_attention import fuse_vision_attention
from nvlm_export.export.qdq import quantize_static_graph
from nvlm_export.runtime.backends import GraphSpec, get_backend
from nvlm_export.runtime.manifest import MANIFEST_NAME, VISION_GRAPH, load_manifest
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
    runner = get_backend("onnxruntime")(GraphSpec(spec.name, path, spec.inputs, spec.outputs))
    with runner:
        return next(iter(runner.infer({"pixel_values": tiles}).values()))


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
