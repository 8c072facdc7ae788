"""ONNX Runtime graph variants: the standard graph's attention rewritten into fused contrib ops.

The exported graphs hold standard ONNX ops only, so TensorRT and every ONNX Runtime build run
them. ONNX Runtime's CPU provider runs attention written out in standard ops as separate kernels
(q·kᵀ, scale, softmax, ·v, and the transposes between them), materialising the score matrix of
every head: for the ViT's 1025 tokens that is 16 heads × 1025² floats per layer and tile. Its
`com.microsoft` attention kernels do the same work in one call, tiled so scores stay in cache
(`MultiHeadAttention` runs MLAS's flash attention on CPU). ORT's session optimiser does not
produce them (those fusions live in the offline `onnxruntime.transformers` optimiser, which
matches the patterns of its own model families and fuses the q/k/v projections into `Attention`,
undoing our per-projection Q/DQ), so this module rewrites the pattern our exporter emits.

The rewrite reads and writes only the graph structure: weights stay in the standard graph's
external data file, which the variant references by the same relative path (no second copy on
disk). Attention's activation × activation products are never quantized (export/qdq.py), so a
variant derived from a Q/DQ graph keeps exactly the standard graph's quantization.

Vision attention, as `InternVitAttention` exports it (the q/k norms of the 6B style, if any,
come before the reshape and stay as they are):

    x_q ─Reshape[N,T,H,D]─Transpose(0,2,1,3)──┐
    x_k ─Reshape[N,T,H,D]─Transpose(0,2,3,1)──MatMul─Mul(scale)─Softmax─MatMul─Transpose(0,2,1,3)
    x_v ─Reshape[N,T,H,D]─Transpose(0,2,1,3)─────────────────────────────┘    ─Reshape[N,T,H·D]
  becomes
    MultiHeadAttention(x_q, x_k, x_v; num_heads=H, scale) ─▶ [N, T, H·D]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nvlm_export.errors import ExportError
from nvlm_export.runtime.manifest import VISION_GRAPH, GraphVariant, Manifest

if TYPE_CHECKING:
    import onnx

MS_DOMAIN = "com.microsoft"
MS_OPSET = 1
TO_HEADS = (0, 2, 1, 3)  # [N, T, H, D] <-> [N, H, T, D]
TO_HEADS_TRANSPOSED = (0, 2, 3, 1)  # [N, T, H, D] -> [N, H, D, T]


@dataclass(frozen=True)
class FusedAttention:
    """One matched attention block: where its inputs come from and what replaces it."""

    query: str
    key: str
    value: str
    output: str
    num_heads: int
    scale: float
    removed: tuple[str, ...]  # names of the nodes the fused op replaces


class _Graph:
    """Index of a graph: producers, consumers and small constant values by tensor name."""

    def __init__(self, model: onnx.ModelProto) -> None:
        from onnx import numpy_helper

        graph = model.graph
        self.nodes = list(graph.node)
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}
        self._constants: dict[str, np.ndarray] = {}
        for tensor in graph.initializer:
            if not tensor.external_data and np.prod(tensor.dims) <= 16:
                self._constants[tensor.name] = numpy_helper.to_array(tensor)
        for node in self.nodes:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self._constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def constant(self, name: str) -> np.ndarray | None:
        return self._constants.get(name)

    def made_by(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def only_consumer(self, name: str, op_type: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        if len(users) != 1 or users[0].op_type != op_type or name in self.outputs:
            return None
        return users[0]


def _perm(node: onnx.NodeProto) -> tuple[int, ...]:
    return next((tuple(a.ints) for a in node.attribute if a.name == "perm"), ())


def _split_heads(graph: _Graph, name: str, perm: tuple[int, ...]) -> tuple[str, int, list[str]]:
    """For `name` = Transpose(perm)(Reshape(x, [N, T, H, D])): (x, H, the two nodes), else raise
    LookupError."""
    transpose = graph.made_by(name, "Transpose")
    if transpose is None or _perm(transpose) != perm:
        raise LookupError(name)
    reshape = graph.made_by(transpose.input[0], "Reshape")
    shape = graph.constant(reshape.input[1]) if reshape is not None else None
    if reshape is None or shape is None or shape.shape != (4,) or shape[2] <= 0:
        raise LookupError(name)
    return reshape.input[0], int(shape[2]), [reshape.name, transpose.name]


def _scale_of(graph: _Graph, node: onnx.NodeProto) -> float | None:
    """The scalar a Mul multiplies by (or a Div divides by) its other input with, else None."""
    if node.op_type not in ("Mul", "Div"):
        return None
    value = graph.constant(node.input[1])
    if value is None or value.size != 1:
        return None
    scalar = float(value.reshape(()))
    return scalar if node.op_type == "Mul" else 1.0 / scalar


def match_vision_attention(graph: _Graph, softmax: onnx.NodeProto) -> FusedAttention:
    """The self-attention block around `softmax` (see the module docstring); LookupError if the
    graph around it is not that pattern."""
    scaled = graph.producer.get(softmax.input[0])
    scale = _scale_of(graph, scaled) if scaled is not None else None
    scores = graph.made_by(scaled.input[0], "MatMul") if scaled is not None else None
    if scale is None or scores is None or not _single_use(graph, scores, scaled, softmax):
        raise LookupError(softmax.name)
    query, heads, q_nodes = _split_heads(graph, scores.input[0], TO_HEADS)
    key, key_heads, k_nodes = _split_heads(graph, scores.input[1], TO_HEADS_TRANSPOSED)
    mixed = graph.only_consumer(softmax.output[0], "MatMul")
    if mixed is None or mixed.input[0] != softmax.output[0]:
        raise LookupError(softmax.name)
    value, value_heads, v_nodes = _split_heads(graph, mixed.input[1], TO_HEADS)
    merge = graph.only_consumer(mixed.output[0], "Transpose")
    if merge is None or _perm(merge) != TO_HEADS or heads != key_heads or heads != value_heads:
        raise LookupError(softmax.name)
    flatten = graph.only_consumer(merge.output[0], "Reshape")
    shape = graph.constant(flatten.input[1]) if flatten is not None else None
    if flatten is None or shape is None or shape.shape != (3,):
        raise LookupError(softmax.name)
    core = [scores.name, scaled.name, softmax.name, mixed.name, merge.name, flatten.name]
    return FusedAttention(
        query, key, value, flatten.output[0], heads, scale, (*core, *q_nodes, *k_nodes, *v_nodes)
    )


def _single_use(graph: _Graph, *chain: onnx.NodeProto) -> bool:
    """Each node's output feeds only the next node of the chain."""
    return all(
        graph.only_consumer(node.output[0], after.op_type) is after
        for node, after in pairwise(chain)
    )


def find_vision_attention(model: onnx.ModelProto) -> list[FusedAttention]:
    graph = _Graph(model)
    found = []
    for node in graph.nodes:
        if node.op_type == "Softmax":
            try:
                found.append(match_vision_attention(graph, node))
            except LookupError:
                continue
    return found


def _multi_head_attention(block: FusedAttention, index: int) -> onnx.NodeProto:
    from onnx import helper

    return helper.make_node(
        "MultiHeadAttention",
        [block.query, block.key, block.value],
        [block.output],
        name=f"fused_attention_{index}",
        domain=MS_DOMAIN,
        num_heads=block.num_heads,
        scale=block.scale,
    )


def _replace(model: onnx.ModelProto, blocks: list[FusedAttention]) -> None:
    """Swap each block's nodes for its fused node, keeping topological order and dropping nodes
    left without consumers (the reshapes and transposes only the block read)."""
    removed = {name for block in blocks for name in block.removed}
    first_removed = {block.removed[0]: index for index, block in enumerate(blocks)}
    kept = []
    for node in model.graph.node:
        if node.name in first_removed:
            index = first_removed[node.name]
            kept.append(_multi_head_attention(blocks[index], index))
        elif node.name not in removed:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(_topological(kept))
    _drop_unused(model)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(_ms_opset())


def _ms_opset() -> onnx.OperatorSetIdProto:
    from onnx import helper

    return helper.make_opsetid(MS_DOMAIN, MS_OPSET)


def _topological(nodes: list[onnx.NodeProto]) -> Iterator[onnx.NodeProto]:
    """`nodes` in an order where every node comes after the producers of its inputs."""
    produced = {out: node for node in nodes for out in node.output}
    done: set[int] = set()
    for root in nodes:
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if id(node) in done:
                continue
            if expanded:
                done.add(id(node))
                yield node
                continue
            stack.append((node, True))
            for name in node.input:
                producer = produced.get(name)
                if producer is not None and id(producer) not in done:
                    stack.append((producer, False))


def _drop_unused(model: onnx.ModelProto) -> None:
    """Remove nodes whose outputs nothing reads, and initializers no node reads."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    unused = [t for t in graph.initializer if t.name not in needed]
    for tensor in unused:
        graph.initializer.remove(tensor)


def fuse_vision_attention(source: Path, output: Path) -> int:
    """Write `output`: the vision graph at `source` with every attention block fused into
    `MultiHeadAttention`. Weights stay in `source`'s external data (same directory). Returns the
    number of fused blocks; ExportError when none matched."""
    import onnx

    model = onnx.load(str(source), load_external_data=False)
    blocks = find_vision_attention(model)
    if not blocks:
        raise ExportError(
            f"No attention block in {source.name} has the exported pattern",
            why="the ONNX Runtime variant fuses Reshape/Transpose/MatMul/Softmax attention",
            fix="Re-export the bundle with this version of nvlm-export",
        )
    _replace(model, blocks)
    onnx.save(model, str(output))
    return len(blocks)


# --- the bundle's variants -----------------------------------------------------------------------

ONNXRUNTIME = "onnxruntime"  # the backend name the runtime registers (runtime/backends)
VARIANT_SUFFIX = ".ort.onnx"
# Graph name -> the rewrite that makes its ONNX Runtime variant (source, output) -> fused blocks.
REWRITES: dict[str, Callable[[Path, Path], int]] = {VISION_GRAPH: fuse_vision_attention}
# The CPU kernels of the fused ops are registered for float32 only: graphs exported in fp16 keep
# their standard graph on every backend.
FLOAT_PRECISIONS = ("fp32", "int8", "fp8", "int4")


def add_onnxruntime_variants(bundle: Path, manifest: Manifest) -> Manifest:
    """Write the ONNX Runtime variant of every graph with a rewrite into `bundle` and declare it
    in the returned manifest (earlier variants are dropped: they belong to the graphs they were
    derived from). Graphs whose attention does not match stay without one."""
    graphs = {}
    float_activations = manifest.source.settings.get("dtype", "fp32") == "fp32"
    for name, graph in manifest.graphs.items():
        graph = replace(graph, variants={})
        rewrite = REWRITES.get(name)
        if rewrite is not None and float_activations:
            file = graph.file.removesuffix(".onnx") + VARIANT_SUFFIX
            try:
                rewrite(bundle / graph.file, bundle / file)
            except ExportError:
                pass  # no fusable attention: ONNX Runtime runs the standard graph
            else:
                ops = (f"{MS_DOMAIN}.MultiHeadAttention",)
                graph = replace(graph, variants={ONNXRUNTIME: GraphVariant(file, ops)})
        graphs[name] = graph
    return replace(manifest, graphs=graphs)
