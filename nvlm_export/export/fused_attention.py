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
from nvlm_export.runtime.manifest import (
    DECODER_GRAPH,
    POSITION_IDS,
    VISION_GRAPH,
    GraphSpec,
    GraphVariant,
    Manifest,
    layer_tensor,
)

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
    _add_ms_opset(model)


def _add_ms_opset(model: onnx.ModelProto) -> None:
    from onnx import helper

    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, MS_OPSET))


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


# --- decoder: GroupQueryAttention ----------------------------------------------------------------


@dataclass(frozen=True)
class FusedSelfAttention:
    """One decoder layer's cached self-attention, as GroupQueryAttention takes it."""

    query: str  # projections before rotary, [B, S, heads * D]
    key: str  # [B, S, kv_heads * D]
    value: str
    past_key: str
    past_value: str
    output: str  # [B, S, heads * D], what o_proj reads
    present_key: str
    present_value: str
    num_heads: int
    scale: float
    cos: str  # the graph's rotary tables [B, 1, S, D], shared by every layer
    signed_sin: str


def _rotary_input(graph: _Graph, name: str) -> tuple[str, str, str]:
    """For `name` = x·cos + (x₂, x₁)·signed_sin (export/decoder.apply_rotary): (x, cos,
    signed_sin); LookupError otherwise."""
    add = graph.made_by(name, "Add")
    products = [graph.made_by(i, "Mul") for i in add.input] if add is not None else []
    if len(products) != 2 or products[0] is None or products[1] is None:
        raise LookupError(name)
    for plain, rotated in (products, products[::-1]):
        halves = graph.made_by(rotated.input[0], "Concat")
        slices = [graph.made_by(i, "Slice") for i in halves.input] if halves is not None else []
        x = plain.input[0]
        if len(slices) == 2 and all(s is not None and s.input[0] == x for s in slices):
            return x, plain.input[1], rotated.input[1]
    raise LookupError(name)


def _unsplit_heads(graph: _Graph, name: str) -> str:
    """For `name` = Transpose(0,2,1,3)(Reshape(x, [B, S, H, D])): x, the [B, S, H·D] tensor."""
    transpose = graph.made_by(name, "Transpose")
    reshape = graph.made_by(transpose.input[0], "Reshape") if transpose is not None else None
    if transpose is None or reshape is None or _perm(transpose) != TO_HEADS:
        raise LookupError(name)
    return reshape.input[0]


def _through(graph: _Graph, name: str, *ops: str) -> onnx.NodeProto:
    """Follow `name` through its one consumer of each type in `ops` in turn; the last node."""
    node = None
    for op in ops:
        users = [n for n in graph.consumers.get(name, []) if n.op_type == op]
        if len(users) != 1:
            raise LookupError(name)
        node, name = users[0], users[0].output[0]
    assert node is not None
    return node


def _constant_item(graph: _Graph, name: str) -> int:
    value = graph.constant(name)
    if value is None or value.size != 1:
        raise LookupError(name)
    return int(value.reshape(()))


def match_self_attention(
    graph: _Graph, past_key: str, past_value: str, present_key: str, present_value: str
) -> FusedSelfAttention:
    """One layer's cached self-attention (export/decoder.attention), found from the cache
    tensors the manifest names; LookupError when the graph around them is another pattern:

        present_k = Concat(past_k, rotary(heads(k)));  present_v = Concat(past_v, heads(v))
        scores = Reshape(rotary(heads(q)) · scale, [B, KV, G, S, D])
                 @ Transpose(Unsqueeze(present_k))
        out = Reshape(Transpose(Reshape(Softmax(Where(causal, scores)) @ Unsqueeze(present_v))))
    """
    keys, values = graph.made_by(present_key, "Concat"), graph.made_by(present_value, "Concat")
    if keys is None or values is None or (keys.input[0], values.input[0]) != (past_key, past_value):
        raise LookupError(present_key)
    key_heads, cos, signed_sin = _rotary_input(graph, keys.input[1])
    scores = _through(graph, present_key, "Unsqueeze", "Transpose", "MatMul")
    softmax = _through(graph, scores.output[0], "Where", "Softmax")
    mixed = _through(graph, softmax.output[0], "MatMul")
    if mixed.input[1] != _through(graph, present_value, "Unsqueeze").output[0]:
        raise LookupError(present_key)
    grouped = graph.made_by(scores.input[0], "Reshape")
    scaled = graph.producer.get(grouped.input[0]) if grouped is not None else None
    scale = _scale_of(graph, scaled) if scaled is not None else None
    if scaled is None or scale is None:
        raise LookupError(present_key)
    query_heads, *tables = _rotary_input(graph, scaled.input[0])
    if tables != [cos, signed_sin]:
        raise LookupError(present_key)
    heads_view = _through(graph, mixed.output[0], "Reshape")  # [B, H, S, D]
    output = _through(graph, heads_view.output[0], "Transpose", "Reshape").output[0]
    shape = graph.made_by(heads_view.input[1], "Concat")
    if shape is None or len(shape.input) != 4:
        raise LookupError(present_key)
    return FusedSelfAttention(
        query=_unsplit_heads(graph, query_heads),
        key=_unsplit_heads(graph, key_heads),
        value=_unsplit_heads(graph, values.input[1]),
        past_key=past_key,
        past_value=past_value,
        output=output,
        present_key=present_key,
        present_value=present_value,
        num_heads=_constant_item(graph, shape.input[1]),
        scale=scale,
        cos=cos,
        signed_sin=signed_sin,
    )


def _inv_freq(model: onnx.ModelProto, graph: _Graph, cos: str) -> np.ndarray:
    """The rotary frequencies behind the cos table [B, 1, S, D] = Unsqueeze(Concat(c, c)) with
    c = Cos(positions · inv_freq)."""
    from onnx import numpy_helper

    halves = graph.made_by(graph.made_by(cos, "Unsqueeze").input[0], "Concat")  # type: ignore[union-attr]
    angles = graph.made_by(graph.made_by(halves.input[0], "Cos").input[0], "Mul")  # type: ignore[union-attr]
    initializers = {t.name: t for t in model.graph.initializer}
    found = [initializers[i] for i in angles.input if i in initializers]  # type: ignore[union-attr]
    if len(found) != 1 or found[0].external_data:
        raise LookupError(cos)
    return numpy_helper.to_array(found[0]).astype(np.float32).reshape(-1)


def _rotary_caches(inv_freq: np.ndarray, max_context: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [max_context, D/2] of position · inv_freq in float32, as the graph computes
    them per call."""
    angles = np.arange(max_context, dtype=np.float32)[:, None] * inv_freq[None, :]
    return np.cos(angles), np.sin(angles)


def _sequence_lengths(positions: str) -> list[onnx.NodeProto]:
    """Nodes computing GQA's `seqlens_k` [B] (int32, total - 1) and `total_sequence_length`
    (int32 scalar) from the positions [B, S] of the step's tokens: the last one is the index of
    the last cache entry. Not from the past's shape, so the past may be a buffer longer than the
    cache, which GQA then writes into in place (`GraphVariant.kv_in_place`)."""
    from onnx import TensorProto, helper

    def constant(name: str, values: list[int], dims: list[int], dtype: int) -> onnx.NodeProto:
        tensor = helper.make_tensor(name, dtype, dims, values)
        return helper.make_node("Constant", [], [name], value=tensor)

    return [
        constant("gqa_minus_one", [-1], [1], TensorProto.INT64),
        constant("gqa_to_end", [2**63 - 1], [1], TensorProto.INT64),
        constant("gqa_seq_axis", [1], [1], TensorProto.INT64),
        constant("gqa_one", [1], [], TensorProto.INT32),
        helper.make_node(
            "Slice",
            [positions, "gqa_minus_one", "gqa_to_end", "gqa_seq_axis"],
            ["gqa_last_position"],
        ),  # [B, 1]
        helper.make_node("Cast", ["gqa_last_position"], ["gqa_last_32"], to=TensorProto.INT32),
        helper.make_node("Squeeze", ["gqa_last_32", "gqa_seq_axis"], [SEQLENS_K]),  # [B]
        helper.make_node("ReduceMax", [SEQLENS_K], ["gqa_longest"], keepdims=0),
        helper.make_node("Add", ["gqa_longest", "gqa_one"], [TOTAL_LENGTH]),  # scalar
    ]


SEQLENS_K = "gqa_seqlens_k"
TOTAL_LENGTH = "gqa_total_sequence_length"
COS_CACHE = "gqa_cos_cache"
SIN_CACHE = "gqa_sin_cache"


def _group_query_attention(
    block: FusedSelfAttention, kv_heads: int, positions: str, index: int
) -> onnx.NodeProto:
    from onnx import helper

    inputs = [block.query, block.key, block.value, block.past_key, block.past_value]
    inputs += [SEQLENS_K, TOTAL_LENGTH, COS_CACHE, SIN_CACHE, positions]
    return helper.make_node(
        "GroupQueryAttention",
        inputs,
        [block.output, block.present_key, block.present_value],
        name=f"fused_self_attention_{index}",
        domain=MS_DOMAIN,
        num_heads=block.num_heads,
        kv_num_heads=kv_heads,
        scale=block.scale,
        do_rotary=1,
        rotary_interleaved=0,
    )


def fuse_decoder_attention(source: Path, output: Path, manifest: Manifest) -> int:
    """Write `output`: the decoder graph at `source` with every cached self-attention block
    (rotary of q and k included) fused into `GroupQueryAttention`, reading the graph's own
    `position_ids`. Returns the number of fused layers; ExportError when none matched."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source), load_external_data=False)
    graph = _Graph(model)
    cache = manifest.kv_cache
    blocks = []
    for layer in range(cache.num_layers):
        names = (cache.past_key, cache.past_value, cache.present_key, cache.present_value)
        try:
            blocks.append(match_self_attention(graph, *(layer_tensor(n, layer) for n in names)))
        except LookupError:
            continue  # a layer of another kind (none in today's decoders): stays as it is
    try:
        inv_freq = _inv_freq(model, graph, blocks[0].cos) if blocks else None
    except (LookupError, AttributeError):
        inv_freq = None
    if inv_freq is None:
        raise ExportError(
            f"No self-attention block in {source.name} has the exported pattern",
            why="the ONNX Runtime variant fuses the exporter's rotary + attention pattern",
            fix="Re-export the bundle with this version of nvlm-export",
        )
    cos, sin = _rotary_caches(inv_freq, cache.max_context)
    model.graph.initializer.extend(
        [numpy_helper.from_array(cos, COS_CACHE), numpy_helper.from_array(sin, SIN_CACHE)]
    )
    replaced = {out for b in blocks for out in (b.output, b.present_key, b.present_value)}
    kept = [n for n in model.graph.node if not any(o in replaced for o in n.output)]
    fused = [
        _group_query_attention(block, cache.num_kv_heads, POSITION_IDS, index)
        for index, block in enumerate(blocks)
    ]
    lengths = _sequence_lengths(POSITION_IDS)
    del model.graph.node[:]
    model.graph.node.extend(_topological([*lengths, *kept, *fused]))
    _drop_unused(model)
    _add_ms_opset(model)
    onnx.save(model, str(output))
    return len(blocks)


# --- the bundle's variants -----------------------------------------------------------------------

ONNXRUNTIME = "onnxruntime"  # the backend name the runtime registers (runtime/backends)
VARIANT_SUFFIX = ".ort.onnx"


@dataclass(frozen=True)
class Rewrite:
    """How one graph's ONNX Runtime variant is made: (source, output, manifest) -> fused blocks."""

    write: Callable[[Path, Path, Manifest], int]
    fused_ops: tuple[str, ...]
    kv_in_place: bool = False  # the variant may write its keys/values into the past buffers


REWRITES: dict[str, Rewrite] = {
    VISION_GRAPH: Rewrite(
        lambda source, output, _: fuse_vision_attention(source, output),
        (f"{MS_DOMAIN}.MultiHeadAttention",),
    ),
    DECODER_GRAPH: Rewrite(
        fuse_decoder_attention, (f"{MS_DOMAIN}.GroupQueryAttention",), kv_in_place=True
    ),
}


def variant_file(graph_file: str) -> str:
    """Where a graph's ONNX Runtime variant is written, beside the graph."""
    return graph_file.removesuffix(".onnx") + VARIANT_SUFFIX


def add_onnxruntime_variants(bundle: Path, manifest: Manifest) -> Manifest:
    """Write the ONNX Runtime variant of every graph with a rewrite into `bundle` and declare it
    in the returned manifest (earlier variants are dropped: they belong to the graphs they were
    derived from). Graphs whose attention does not match stay without one."""
    graphs = {name: with_onnxruntime_variant(bundle, manifest, name) for name in manifest.graphs}
    return replace(manifest, graphs=graphs)


def with_onnxruntime_variant(bundle: Path, manifest: Manifest, name: str) -> GraphSpec:
    """Graph `name` of `manifest` with its ONNX Runtime variant derived from the graph file as it
    is now in `bundle` (a graph written again needs its variant written again)."""
    graph = replace(manifest.graphs[name], variants={})
    rewrite = REWRITES.get(name)
    if rewrite is None or manifest.source.settings.get("dtype", "fp32") != "fp32":
        return graph
    file = variant_file(graph.file)
    try:
        rewrite.write(bundle / graph.file, bundle / file, manifest)
    except ExportError:
        return graph  # no fusable attention: ONNX Runtime runs the standard graph
    variant = GraphVariant(file, rewrite.fused_ops, kv_in_place=rewrite.kv_in_place)
    return replace(graph, variants={ONNXRUNTIME: variant})
