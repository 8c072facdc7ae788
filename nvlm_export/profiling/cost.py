"""Analytic cost of one decode step, next to the measured one (the roofline view, as nanochat's).

A decode step multiplies one token's activations by every weight matrix of the decoder, so it
reads all decoder weights once (plus one embedding row and the KV cache so far) and does about
two FLOPs per matrix weight (one multiply, one add), plus attention over the cache:

    bytes/token = decoder weights + embedding row + KV cache (2·layers·kv_heads·head_dim·ctx)
    FLOPs/token = 2 · matrix weights + 4 · layers · heads · head_dim · ctx

On a CPU or an edge GPU decode is memory-bound, so the ceiling is bandwidth / (bytes/token).

The weights are read off the decoder graph's initializers with `onnx` when it is installed (the
export extra): exact bytes, and matrix sizes from MatMul / Gemm / MatMulNBits nodes. A runtime-only
install falls back to the graph files' sizes and assumes every weight is a matrix weight.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nvlm_export.runtime.manifest import DECODER_GRAPH, Manifest

# ONNX TensorProto data types -> bits per element (only the ones weights use).
ONNX_ELEMENT_BITS = {
    1: 32,
    2: 8,
    3: 8,
    5: 16,
    6: 32,
    7: 64,
    9: 8,
    10: 16,
    11: 64,
    16: 16,
    21: 4,
    22: 4,
}
MATMUL_OPS = ("MatMul", "Gemm", "FusedMatMul")


@dataclass(frozen=True)
class DecoderCost:
    """Per-token costs of the decoder. `exact` says whether they come from the graph's
    initializers (True) or from file sizes (False)."""

    weight_bytes: int  # every decoder weight, read once per step
    matrix_weights: int  # elements of weight matrices (2 FLOPs each per token)
    embedding_row_bytes: int
    kv_bytes_per_position: int  # keys + values of every layer for one cached position
    attention_flops_per_position: int  # q·k and p·v of every head for one cached position
    exact: bool

    def bytes_per_token(self, context: int) -> int:
        return self.weight_bytes + self.embedding_row_bytes + self.kv_bytes_per_position * context

    def flops_per_token(self, context: int) -> int:
        return 2 * self.matrix_weights + self.attention_flops_per_position * context

    def bandwidth_bound_tokens_per_second(
        self, bandwidth_bytes_per_s: float, context: int
    ) -> float:
        return bandwidth_bytes_per_s / self.bytes_per_token(context)

    def to_dict(self, context: int, bandwidth_gbs: float | None = None) -> dict[str, Any]:
        report: dict[str, Any] = {
            **asdict(self),
            "context": context,
            "bytes_per_token": self.bytes_per_token(context),
            "flops_per_token": self.flops_per_token(context),
            "bandwidth_gbs": bandwidth_gbs,
            "bandwidth_bound_tokens_per_second": None,
        }
        if bandwidth_gbs:
            report["bandwidth_bound_tokens_per_second"] = self.bandwidth_bound_tokens_per_second(
                bandwidth_gbs * 1e9, context
            )
        return report


def decoder_cost(bundle_dir: Path, manifest: Manifest) -> DecoderCost:
    """The decoder's per-token cost, from its graph (exact with `onnx`, else from file sizes)."""
    path = Path(bundle_dir) / manifest.graph(DECODER_GRAPH).file
    weights = _initializer_costs(path)
    kv, embedding = manifest.kv_cache, manifest.embedding
    kv_itemsize = np.dtype(kv.dtype).itemsize
    # Query heads are not in the manifest; hidden = heads · head_dim holds for Qwen2 and Llama.
    query_width = embedding.hidden_size
    if weights is None:
        weight_bytes = _graph_file_bytes(path)
        matrix_weights = int(weight_bytes / _bytes_per_weight(manifest))
    else:
        weight_bytes, matrix_weights = weights
    return DecoderCost(
        weight_bytes=weight_bytes,
        matrix_weights=matrix_weights,
        embedding_row_bytes=embedding.hidden_size * np.dtype(embedding.dtype).itemsize,
        kv_bytes_per_position=2 * kv.num_layers * kv.num_kv_heads * kv.head_dim * kv_itemsize,
        attention_flops_per_position=4 * kv.num_layers * query_width,
        exact=weights is not None,
    )


def _initializer_costs(path: Path) -> tuple[int, int] | None:
    """(weight bytes, matrix weight elements) from the graph, or None without `onnx`."""
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)  # structure only, no weight bytes
    graph = model.graph
    sizes = {init.name: _initializer_size(init) for init in graph.initializer}
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    matrix_weights = 0
    for node in graph.node:
        if node.op_type == "MatMulNBits":  # int4/int8 block-quantized: K and N are attributes
            attrs = {a.name: a.i for a in node.attribute}
            matrix_weights += attrs.get("K", 0) * attrs.get("N", 0)
        elif node.op_type in MATMUL_OPS:
            shape = next((shapes[n] for n in node.input[:2] if n in shapes), None)
            if shape is not None and len(shape) >= 2:
                matrix_weights += math.prod(shape)
    return sum(size for size in sizes.values()), matrix_weights


def _initializer_size(init: Any) -> int:
    """Bytes of one initializer, without loading external data."""
    for entry in init.external_data:
        if entry.key == "length":
            return int(entry.value)
    if init.raw_data:
        return len(init.raw_data)
    bits = ONNX_ELEMENT_BITS.get(init.data_type, 32)
    return math.ceil(math.prod(init.dims) * bits / 8)


def _graph_file_bytes(path: Path) -> int:
    """The graph file and its external-data side files (written beside it as `<name>.data`)."""
    files = [path, *path.parent.glob(path.name + ".data*")]
    return sum(f.stat().st_size for f in files if f.is_file())


BYTES_PER_WEIGHT = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "fp8": 1.0, "int4": 0.5}


def _bytes_per_weight(manifest: Manifest) -> float:
    """Bytes per weight for the file-size fallback, from the graph's declared precision."""
    return BYTES_PER_WEIGHT.get(manifest.graph(DECODER_GRAPH).precision, 1.0)
