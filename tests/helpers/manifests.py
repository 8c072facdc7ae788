"""Manifests as the exporter writes them, and bundles of interface-only ONNX graphs, for tests of
what reads a bundle without running it (engine plans, TensorRT lint)."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

from nvlm_export.models.families.nvlm_d import PROMPT_FORMAT as NVLM_D
from nvlm_export.models.families.nvlm_h import PROMPT_FORMAT as NVLM_H
from nvlm_export.models.families.nvlm_x import PROMPT_FORMAT as NVLM_X
from nvlm_export.runtime.manifest import (
    EmbeddingSpec,
    GraphSpec,
    KVCacheSpec,
    Manifest,
    SourceSpec,
    TensorSpec,
    TokenizerSpec,
)
from nvlm_export.runtime.tiling import TilingConfig

LAYERS, KV_HEADS, HEAD_DIM, HIDDEN, VOCAB = 2, 2, 16, 64, 512
CROSS_BLOCKS = 1
MAX_CONTEXT, MAX_TILES = 4096, 6
PROMPT_FORMATS = {"nvlm-d": NVLM_D, "nvlm-x": NVLM_X, "nvlm-h": NVLM_H}


def _kv(prefix: str, layer: int, length: str) -> tuple[TensorSpec, TensorSpec]:
    shape = ("batch", KV_HEADS, length, HEAD_DIM)
    return (
        TensorSpec(f"{prefix}.{layer}.key", "float16", shape),
        TensorSpec(f"{prefix}.{layer}.value", "float16", shape),
    )


def make_manifest(architecture: str = "nvlm-d", precision: str = "fp16") -> Manifest:
    """A manifest as the exporter writes it, for the three NVLM architectures."""
    has_cross = architecture in ("nvlm-x", "nvlm-h")
    vision_out = [TensorSpec("image_features", "float16", ("tiles", 256, HIDDEN))]
    if has_cross:
        vision_out.append(TensorSpec("cross_features", "float16", ("tiles", 256, HIDDEN)))
    vision = GraphSpec(
        "vision.onnx",
        (TensorSpec("pixel_values", "float32", ("tiles", 3, 448, 448)),),
        tuple(vision_out),
        precision="fp16" if precision in ("int8", "fp8", "int4") else precision,
    )
    cross_kv = [t for j in range(CROSS_BLOCKS) for t in _kv("cross_kv", j, "cross")]
    inputs = [
        TensorSpec("inputs_embeds", "float16", ("batch", "seq", HIDDEN)),
        TensorSpec("position_ids", "int64", ("batch", "seq")),
        *(t for i in range(LAYERS) for t in _kv("past_key_values", i, "past")),
    ]
    if has_cross:
        inputs += [*cross_kv, TensorSpec("cross_attention_mask", "bool", (1, "seq", "cross"))]
    decoder = GraphSpec(
        "decoder.onnx",
        tuple(inputs),
        (
            TensorSpec("logits", "float32", ("batch", VOCAB)),
            *(t for i in range(LAYERS) for t in _kv("present", i, "past_plus_seq")),
        ),
        precision=precision,
        quantization={"method": "test"} if precision in ("int8", "fp8", "int4") else None,
    )
    graphs = {"vision": vision, "decoder": decoder}
    if has_cross:
        graphs["cross_kv"] = GraphSpec(
            "cross_kv.onnx",
            (TensorSpec("cross_embeds", "float16", (1, "cross", HIDDEN)),),
            tuple(cross_kv),
            precision="fp16" if precision != "fp32" else "fp32",
        )
    return Manifest(
        architecture=architecture,
        source=SourceSpec(checkpoint="/ckpt", layout=architecture),
        graphs=graphs,
        embedding=EmbeddingSpec("embeddings.npy", VOCAB, HIDDEN, "float16"),
        kv_cache=KVCacheSpec(LAYERS, KV_HEADS, HEAD_DIM, MAX_CONTEXT, "float16"),
        tokenizer=TokenizerSpec("tokenizer.json", (3,), 5),
        tiling=TilingConfig(max_tiles=MAX_TILES),
        prompt=PROMPT_FORMATS[architecture],
        precision=precision,
    )


ONNX_TYPES = {"float32": 1, "float16": 10, "int64": 7, "bool": 9}


def interface_model(graph: GraphSpec, *, opset: int = 18) -> onnx.ModelProto:
    """An ONNX model with exactly the graph's declared interface (Identity wiring inside)."""

    def value(t: TensorSpec) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(t.name, ONNX_TYPES[t.dtype], list(t.shape))

    first = graph.inputs[0].name
    nodes = [helper.make_node("Identity", [first], [t.name]) for t in graph.outputs]
    body = helper.make_graph(
        nodes, "g", [value(t) for t in graph.inputs], [value(t) for t in graph.outputs]
    )
    return helper.make_model(body, opset_imports=[helper.make_opsetid("", opset)])


def write_bundle(directory: Path, manifest: Manifest) -> Path:
    """Save the manifest with interface-only ONNX graphs and placeholder side files."""
    for graph in manifest.graphs.values():
        onnx.save(interface_model(graph), str(directory / graph.file))
    for name in ("embeddings.npy", "tokenizer.json"):
        (directory / name).write_bytes(b"x")
    manifest.save(directory)
    return directory
