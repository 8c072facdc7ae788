"""Q/DQ placement on one ONNX graph, streamed: one weight in memory at a time.

Three schemes, all in the form TensorRT builds for explicit quantization (docs/quantization.md):

- INT8: symmetric (zero point 0) per-channel weights along the output channel, per-tensor
  activations with MinMax (amax) ranges, only the inputs of MatMul (with a constant weight), Gemm
  and Conv; biases, residual adds, norms and softmax stay in float. Each quantized node gets its
  own Q -> DQ pair on its activation, which only it reads.
- FP8: the same placement and ranges in FLOAT8E4M3FN with amax scales (`scale = amax / 448`), as
  TensorRT and ModelOpt scale it.
- INT4: weight-only, block-wise symmetric along the input channel (blocked DequantizeLinear,
  opset 21), activations stay in float.

The Q/DQ nodes are inserted here, not by `onnxruntime.quantization.quantize_static`, which loads
the whole model (and its calibration copy) in memory; the arithmetic is that tool's (`int8_weight`,
`symmetric_scale`), and INT4 weights are packed by its block-wise kernel. Activation ranges come
from `activation_ranges` (a running amax per tensor); weights are read and written one at a time
through `tensor_files`. Why this and not ModelOpt: docs/quantization.md.

The nodes to quantize are always named explicitly (`quantizable_nodes` minus exclusions):
attention's activation x activation MatMuls stay float. Exclusions are selected by module path
(the exporter's `pkg.torch.onnx.name_scopes` metadata, e.g. `layers.3.mlp.down_proj`) or node
name; the LM head is found by what it computes (`output_projection`: the GEMM behind `logits`).
"""

from __future__ import annotations

import ast
import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nvlm_export.defaults import MIN_OPSET_BY_PRECISION
from nvlm_export.errors import ExportError
from nvlm_export.export.activation_ranges import activation_amax
from nvlm_export.export.onnx_utils import EXTERNAL_DATA_THRESHOLD_BYTES
from nvlm_export.export.tensor_files import SourceGraph, TensorSink

if TYPE_CHECKING:
    import onnx

QUANTIZABLE_OPS = ("MatMul", "Gemm", "Conv")
# Ops between a projection and a graph output that keep it "the projection's output" (a bias,
# a reshape to [batch, seq, vocab], the last position's slice, an fp16/fp32 cast).
PASS_THROUGH_OPS = {"Add", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Slice", "Gather", "Identity"}
INT8_MAX = 127.0  # symmetric INT8: [-127, 127]
FP8_E4M3_MAX = 448.0
INT4_BLOCK_SIZES = (128, 64, 32, 16)  # largest first: 128 is TensorRT's usual INT4 block
FP8_MIN_OPSET = MIN_OPSET_BY_PRECISION["fp8"]  # Q/DQ with float8 types
INT4_MIN_OPSET = MIN_OPSET_BY_PRECISION["int4"]  # blocked DequantizeLinear, INT4 tensors
INT4_MIN_IR_VERSION = 10
# fp32 bytes of one weight read at a time for INT4 (a block of rows of the stored tensor).
INT4_READ_BYTES = 64 << 20
NAME_SCOPES = "pkg.torch.onnx.name_scopes"
# Quantized graphs whose source is above this size get their weights in an external data file,
# written one tensor at a time; the exporter's rule (an inline graph is serialised whole).
EXTERNAL_DATA_BYTES = EXTERNAL_DATA_THRESHOLD_BYTES


@dataclass(frozen=True)
class QuantizableNode:
    name: str
    op_type: str
    module: str  # e.g. "layers.0.self_attn.q_proj"; "" when the exporter recorded none

    def matches(self, pattern: str) -> bool:
        module = self.module
        return (
            fnmatch.fnmatchcase(self.name, pattern)
            or fnmatch.fnmatchcase(module, pattern)
            or module.endswith("." + pattern)
        )

    def to_dict(self) -> dict[str, str]:
        return {"node": self.name, "op": self.op_type, "module": self.module}


def quantizable_nodes(model: onnx.ModelProto) -> list[QuantizableNode]:
    """MatMul with a constant weight, Gemm and Conv: the nodes a scheme may quantize."""
    constants = {t.name for t in model.graph.initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    nodes = []
    for node in model.graph.node:
        if node.op_type not in QUANTIZABLE_OPS:
            continue
        if node.op_type == "MatMul" and node.input[1] not in constants:
            continue  # attention's activation x activation products stay in float
        nodes.append(QuantizableNode(node.name, node.op_type, _module_path(node)))
    return nodes


def select_excluded(
    nodes: Sequence[QuantizableNode], patterns: Iterable[str]
) -> list[QuantizableNode]:
    patterns = tuple(patterns)
    return [n for n in nodes if any(n.matches(p) for p in patterns)]


def output_projection(model: onnx.ModelProto, output: str) -> QuantizableNode | None:
    """The GEMM that computes graph output `output` (the decoder's lm_head for `logits`).

    Found from the graph itself, not from a name: walk back from the output through ops that
    only reshape, cast, slice or add a bias, to the first MatMul/Gemm. None if there is none.
    """
    quantizable = {n.name: n for n in quantizable_nodes(model)}
    producer = {o: n for n in model.graph.node for o in n.output}
    constants = {t.name for t in model.graph.initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    tensor = output
    while (node := producer.get(tensor)) is not None:
        if node.name in quantizable:
            return quantizable[node.name]
        if node.op_type not in PASS_THROUGH_OPS:
            return None
        data = [i for i in node.input if i and i not in constants and i in producer]
        if len(data) != 1:
            return None
        tensor = data[0]
    return None


def _module_path(node: Any) -> str:
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ""
            # The last scope is the op's own name ("linear_3"); the one before is its module.
            return str(scopes[-2]) if len(scopes) >= 2 else ""
    return ""


# --- INT8 / FP8: static calibration ------------------------------------------------------------


@dataclass(frozen=True)
class _StaticPlan:
    """Where static Q/DQ goes: per quantized node, its activation inputs and its weights."""

    nodes: dict[str, list[tuple[int, str]]]  # node name -> [(input index, activation tensor)]
    weights: dict[tuple[str, int], list[str]]  # (initializer, channel axis) -> reading nodes

    @property
    def activations(self) -> list[str]:
        return list(dict.fromkeys(t for inputs in self.nodes.values() for _, t in inputs))


def _static_plan(graph: SourceGraph, targets: Sequence[str]) -> _StaticPlan:
    """Inputs 0 and 1 of each target GEMM/conv: a constant one is a weight, quantized per output
    channel; any other is an activation, quantized per tensor. Biases stay float."""
    wanted = set(targets)
    nodes: dict[str, list[tuple[int, str]]] = {}
    weights: dict[tuple[str, int], list[str]] = {}
    for node in graph.model.graph.node:
        if node.name not in wanted:
            continue
        nodes[node.name] = []
        for index in (0, 1):
            name = node.input[index]
            if name in graph.initializers and index == 1:
                weights.setdefault((name, _weight_axis(node)), []).append(node.name)
            else:
                nodes[node.name].append((index, name))
    return _StaticPlan(nodes, weights)


def _weight_axis(node: Any) -> int:
    """The output-channel axis of a GEMM/conv weight: MatMul [K, N] 1, Conv [O, I, ...] 0, Gemm
    0 with transB ([N, K]) and 1 without."""
    if node.op_type == "MatMul":
        return 1
    if node.op_type == "Gemm":
        return 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
    return 0


def quantize_static_graph(
    source: Path,
    output: Path,
    samples: Iterable[Mapping[str, np.ndarray]],
    *,
    precision: str,
    exclude: Sequence[str],
    amax: Mapping[str, np.float32] | None = None,
) -> dict[str, np.float32]:
    """INT8 or FP8 Q/DQ on the MatMul/Gemm/Conv inputs of `source`, written to `output`; returns
    the activation amax it used. `amax` from an earlier call on the same graph and samples is
    used instead of running them again when it covers every activation to quantize.

    Streamed: activation ranges are a running amax per tensor (`activation_ranges`), and each
    weight is read, quantized and written on its own (`tensor_files`).
    """
    graph = SourceGraph(source)
    skipped = set(exclude)
    nodes = quantizable_nodes(graph.model)
    targets = [n.name for n in nodes if n.name not in skipped]
    if not targets:
        raise ExportError(
            f"Nothing to quantize in {source.name}: all {len(nodes)} MatMul/Gemm/Conv nodes "
            "are excluded",
            fix="Exclude fewer nodes, or leave this graph out of --components",
        )
    plan = _static_plan(graph, targets)
    if amax is None or not set(plan.activations) <= set(amax):
        amax = activation_amax(graph, plan.activations, samples)
    external = graph_bytes(source) > EXTERNAL_DATA_BYTES
    with TensorSink(output, external=external) as sink:
        rewired = _write_static_weights(graph, plan, sink, precision)
        new_nodes = _static_nodes(graph, plan, rewired, amax, sink, precision)
        _copy_used_initializers(graph, new_nodes, sink)
        model = graph.model
        if precision == "fp8":
            _raise_opset(model, FP8_MIN_OPSET)
            del model.graph.value_info[:]  # Q outputs were recorded as float by the exporter
        sink.save(model, new_nodes)
    return dict(amax)


def _write_static_weights(
    graph: SourceGraph, plan: _StaticPlan, sink: TensorSink, precision: str
) -> dict[tuple[str, int], str]:
    """Quantize each planned weight (read once per channel axis) into `sink`; returns the name
    of each weight's DequantizeLinear output."""
    from onnx import TensorProto, helper

    dequantized: dict[tuple[str, int], str] = {}
    for (name, axis), _readers in plan.weights.items():
        weight = graph.array(name)
        if precision == "fp8":
            quantized, scale = fp8_weight(weight.astype(np.float32), axis)
            zero = helper.make_tensor(
                f"{name}_zero_point", TensorProto.FLOAT8E4M3FN, [scale.size], [0.0] * scale.size
            )
        else:
            quantized, scale = int8_weight(weight, axis)
            zero = helper.make_tensor(
                f"{name}_zero_point", TensorProto.INT8, [scale.size], [0] * scale.size
            )
        sink.add_array(quantized, f"{name}_quantized")
        sink.add_array(scale, f"{name}_scale")
        sink.add(zero)
        dequantized[(name, axis)] = f"{name}_dequantized"
        del weight, quantized
    return dequantized


def int8_weight(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel symmetric INT8 weight and scale (amax / 127) along `axis`.

    The arithmetic of onnxruntime.quantization's per-channel QDQ weights, vectorised: the scale is
    computed in float64 and stored in the weight's dtype, an all-zero channel gets scale 1, and
    values are rounded half to even and clipped to [-128, 127].
    """
    reduce = tuple(i for i in range(weight.ndim) if i != axis % weight.ndim)
    amax = np.abs(weight).max(axis=reduce, keepdims=True)
    scale = symmetric_scale(amax, INT8_MAX)
    quantized = np.clip(np.round(weight.astype(np.float32) / scale), -128, 127).astype(np.int8)
    return quantized, scale.reshape(-1)


def symmetric_scale(amax: np.ndarray, qmax: float) -> np.ndarray:
    """amax / qmax in the dtype of `amax` (onnxruntime.quantization's `compute_scale_zp` with a
    symmetric range [-qmax, qmax]); 1 where it would underflow."""
    dtype = amax.dtype
    scale = np.asarray(amax, dtype=np.float64) * 2 / (2 * qmax)
    return np.where(scale < np.finfo(dtype).tiny, 1.0, scale.astype(dtype)).astype(dtype)


def _static_nodes(
    graph: SourceGraph,
    plan: _StaticPlan,
    dequantized: Mapping[tuple[str, int], str],
    amax: Mapping[str, np.float32],
    sink: TensorSink,
    precision: str,
) -> list[Any]:
    """The graph's nodes with a Q -> DQ pair before every planned activation input (one pair per
    reading node: TensorRT fuses each into its GEMM) and a DQ on every planned weight. Only the
    planned node reads each pair; every other reader keeps the float tensor."""
    from onnx import helper

    types = graph.elem_types()
    scales: dict[str, tuple[str, str]] = {}
    weight_dqs = {key: False for key in dequantized}
    nodes: list[Any] = []
    for node in graph.model.graph.node:
        if node.name not in plan.nodes:
            nodes.append(node)
            continue
        for index, tensor in plan.nodes[node.name]:
            if tensor not in scales:
                scales[tensor] = _activation_scale(tensor, amax[tensor], types, sink, precision)
            scale, zero = scales[tensor]
            pair = f"{node.name}_input{index}"
            nodes += [
                helper.make_node(
                    "QuantizeLinear",
                    [tensor, scale, zero],
                    [f"{pair}_quantized"],
                    name=f"{pair}_QuantizeLinear",
                ),
                helper.make_node(
                    "DequantizeLinear",
                    [f"{pair}_quantized", scale, zero],
                    [f"{pair}_dequantized"],
                    name=f"{pair}_DequantizeLinear",
                ),
            ]
            node.input[index] = f"{pair}_dequantized"
        key = (node.input[1], _weight_axis(node))
        if key in dequantized:
            if not weight_dqs[key]:
                name = key[0]
                inputs = [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"]
                nodes.append(
                    helper.make_node(
                        "DequantizeLinear",
                        inputs,
                        [dequantized[key]],
                        name=f"{name}_DequantizeLinear",
                        axis=key[1],
                    )
                )
                weight_dqs[key] = True
            node.input[1] = dequantized[key]
        nodes.append(node)
    return nodes


def _activation_scale(
    tensor: str, amax: np.float32, types: Mapping[str, int], sink: TensorSink, precision: str
) -> tuple[str, str]:
    """Per-tensor scale and zero point initializers of an activation, from its calibrated amax.

    FP8 scales are the INT8 symmetric scale (amax / 127) times 127 / 448, i.e. amax / 448."""
    from onnx import TensorProto, helper

    dtype = helper.tensor_dtype_to_np_dtype(types.get(tensor, TensorProto.FLOAT))
    scale = symmetric_scale(np.asarray(amax, dtype=np.float32), INT8_MAX)
    if precision == "fp8":
        scale = scale * (INT8_MAX / FP8_E4M3_MAX)
    names = (f"{tensor}_scale", f"{tensor}_zero_point")
    sink.add_array(scale.astype(dtype), names[0])
    zero_type = TensorProto.FLOAT8E4M3FN if precision == "fp8" else TensorProto.INT8
    sink.add(helper.make_tensor(names[1], zero_type, [], [0]))
    return names


def fp8_weight(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel FP8 E4M3FN weight and scale (amax / 448) along `axis`."""
    from ml_dtypes import float8_e4m3fn

    reduce = tuple(i for i in range(weight.ndim) if i != axis % weight.ndim)
    amax = np.abs(weight).max(axis=reduce, keepdims=True)
    scale = np.where(amax > 0, amax / FP8_E4M3_MAX, 1.0).astype(np.float32)
    quantized = np.clip(weight / scale, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(float8_e4m3fn)
    return quantized, scale.reshape(-1)


# --- INT4: weight-only, block-wise ------------------------------------------------------------


@dataclass(frozen=True)
class _Int4Target:
    node: str
    weight: str
    transposed: bool  # a Gemm with transB: the weight is [N, K]


def _int4_targets(graph: SourceGraph, exclude: Sequence[str]) -> list[_Int4Target]:
    """MatMuls with a constant 2-D weight and plain linear Gemms (rewritten as MatMul + Add:
    ONNX Runtime's block-wise INT4 kernel and TensorRT's INT4 GEMM take MatMul), not excluded."""
    skipped = set(exclude)
    targets = []
    for node in graph.model.graph.node:
        weight = node.input[1] if len(node.input) > 1 else ""
        if node.name in skipped or weight not in graph.initializers:
            continue
        if len(graph.shape(weight)) != 2:
            continue
        if node.op_type == "MatMul":
            targets.append(_Int4Target(node.name, weight, transposed=False))
        elif node.op_type == "Gemm" and _is_plain_linear(node, graph.initializers):
            trans = any(a.name == "transB" and a.i for a in node.attribute)
            targets.append(_Int4Target(node.name, weight, transposed=trans))
    return targets


def int4_block_size(channels: Iterable[int]) -> int:
    """The largest of 128/64/32/16 dividing every input-channel count in `channels`."""
    channels = set(channels)
    for block in INT4_BLOCK_SIZES:
        if all(k % block == 0 for k in channels):
            return block
    raise ExportError(
        "No INT4 block size fits the decoder's weights",
        why=f"input channel counts {sorted(channels)} are not all divisible by 16",
        fix="Exclude the odd-sized layers with --exclude, or use int8",
    )


def plan_int4(source: Path, exclude: Sequence[str]) -> tuple[int, int]:
    """(nodes INT4 would quantize, their block size) for `source`, from its structure alone."""
    graph = SourceGraph(source)
    targets = _int4_targets(graph, exclude)
    return len(targets), int4_block_size(_input_channels(graph, targets))


def _input_channels(graph: SourceGraph, targets: Sequence[_Int4Target]) -> list[int]:
    return [graph.shape(t.weight)[1 if t.transposed else 0] for t in targets]


def quantize_int4_graph(
    source: Path, output: Path, *, exclude: Sequence[str], block_size: int, external: bool
) -> None:
    """INT4 weight-only block-wise Q/DQ (symmetric) on the constant-weight MatMuls and plain
    linear Gemms of `source`, one weight at a time.

    Each weight is quantized by onnxruntime.quantization's block-wise kernel (the one its
    `MatMulNBitsQuantizer` calls, so the INT4 values and scales are that tool's) and written at
    once; the graph gets DequantizeLinear(axis 0, block_size) -> MatMul, the MatMul keeping the
    original node's name and metadata so manifests and --exclude patterns still name it.
    """
    graph = SourceGraph(source)
    targets = {t.node: t for t in _int4_targets(graph, exclude)}
    with TensorSink(output, external=external) as sink:
        for target in {_int4_name(t): t for t in targets.values()}.values():  # shared weights once
            _write_int4_weight(graph, target, block_size, sink)
        nodes: list[Any] = []
        for node in graph.model.graph.node:
            target = targets.get(node.name)
            nodes += [node] if target is None else _int4_nodes(node, target, block_size)
        _copy_used_initializers(graph, nodes, sink)
        model = graph.model
        _raise_opset(model, INT4_MIN_OPSET)
        model.ir_version = max(model.ir_version, INT4_MIN_IR_VERSION)
        sink.save(model, nodes)


def _write_int4_weight(
    graph: SourceGraph, target: _Int4Target, block_size: int, sink: TensorSink
) -> None:
    """Quantize one weight a block of stored rows at a time and write it.

    INT4 blocks run along K (the input channel), so each output column is quantized on its own
    and the pieces' values and scales are exactly the whole tensor's: a [K, N] weight is read in
    groups of whole K-blocks, a stored [N, K] weight (Gemm transB, e.g. the LM head) in groups
    of columns. Only the INT4 result is held whole (for the latter unpacked, one byte a value:
    a byte of packed [K, N] may hold two pieces' values when N is odd, as in a 151655-word
    vocabulary), so a vocabulary-sized head does not decide the peak.
    """
    from onnx import TensorProto, helper

    rows, cols = graph.shape(target.weight)
    k, n = (cols, rows) if target.transposed else (rows, cols)
    block_rows = max(1, INT4_READ_BYTES // (4 * cols))
    if not target.transposed:
        block_rows = max(block_size, block_rows // block_size * block_size)
    values = np.empty((k, n), np.uint8) if target.transposed else None
    packed = np.empty((k * n + 1) // 2, np.uint8)  # row-major [K, N], two values a byte
    scales = None  # in the weight's dtype, as the kernel returns them
    for start, block in graph.row_blocks(target.weight, block_rows):
        stop = start + block.shape[0]
        part, part_scales = _int4_block_quant(
            np.ascontiguousarray(block.T if target.transposed else block), block_size
        )
        if scales is None:
            scales = np.empty((-(-k // block_size), n), part_scales.dtype)
        if values is not None:
            values[:, start:stop] = _unpack_int4(part, k * (stop - start)).reshape(k, -1)
            scales[:, start:stop] = part_scales
        else:
            packed[start * n // 2 : start * n // 2 + part.size] = part
            scales[start // block_size : start // block_size + part_scales.shape[0]] = part_scales
    if values is not None:
        packed = _pack_int4(values.reshape(-1))
        del values
    name = _int4_name(target)
    sink.add(helper.make_tensor(name, TensorProto.INT4, (k, n), packed.tobytes(), raw=True))
    sink.add_array(scales, f"{name}_scales")


def _unpack_int4(packed: np.ndarray, count: int) -> np.ndarray:
    """The `count` 4-bit values of `packed`, one a byte (ONNX order: low nibble first)."""
    values = np.empty(2 * packed.size, np.uint8)
    values[0::2], values[1::2] = packed & 0x0F, packed >> 4
    return values[:count]


def _pack_int4(values: np.ndarray) -> np.ndarray:
    """Inverse of `_unpack_int4`: two 4-bit values a byte, an odd last one in a low nibble."""
    packed = values[0::2].copy()
    packed[: values.size // 2] |= values[1::2] << 4
    return packed


def _int4_block_quant(kn: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime.quantization's block-wise symmetric INT4 of a [K, N] weight: packed, scales."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, quant_format=QuantFormat.QDQ
    )
    packed, scales, _ = DefaultWeightOnlyQuantizer(config).qbits_block_quant(kn)
    return packed, scales


def _int4_name(target: _Int4Target) -> str:
    return f"{target.weight}{'_kn' if target.transposed else ''}_DQ_Q4"


def _int4_nodes(node: Any, target: _Int4Target, block_size: int) -> list[Any]:
    """DequantizeLinear -> MatMul for one target; a Gemm's bias becomes an Add after it."""
    from onnx import helper

    name = _int4_name(target)
    dq = helper.make_node(
        "DequantizeLinear",
        [name, f"{name}_scales"],
        [f"{name}_output"],
        name=f"{target.node}_DQ_Q4",
        axis=0,
        block_size=block_size,
    )
    has_bias = node.op_type == "Gemm" and len(node.input) > 2 and bool(node.input[2])
    product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
    matmul = helper.make_node("MatMul", [node.input[0], dq.output[0]], [product], name=node.name)
    matmul.metadata_props.extend(node.metadata_props)
    if not has_bias:
        return [dq, matmul]
    bias = helper.make_node(
        "Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"
    )
    return [dq, matmul, bias]


def _is_plain_linear(node: Any, inits: Mapping[str, Any]) -> bool:
    """Gemm computing x @ W(^T) + b: alpha = beta = 1, no transposed x, a constant W."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    scaled = attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0
    return not scaled and not attrs.get("transA", 0) and node.input[1] in inits


# --- files --------------------------------------------------------------------------------------


def _copy_used_initializers(graph: SourceGraph, nodes: Sequence[Any], sink: TensorSink) -> None:
    """Copy, one at a time, the source initializers the new nodes (or outputs) still read."""
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.model.graph.output}
    for name in graph.initializers:
        if name in used:
            sink.add(graph.tensor(name))


def _raise_opset(model: onnx.ModelProto, version: int) -> None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = max(entry.version, version)


def graph_bytes(path: Path) -> int:
    """Size of an ONNX graph with its external data files (those beside it named by it)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = {
        entry.value
        for tensor in model.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / n).stat().st_size for n in names)
