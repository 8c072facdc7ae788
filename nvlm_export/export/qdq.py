"""Q/DQ placement on one ONNX graph with ONNX Runtime's quantization tooling.

Three schemes, all in the form TensorRT builds for explicit quantization (docs/quantization.md):

- INT8: `quantize_static` in QDQ format — symmetric (zero point 0) MinMax calibration, per-channel
  weights along the output channel, per-tensor activations, only the inputs of MatMul (with a
  constant weight), Gemm and Conv; biases, residual adds, norms and softmax stay in float.
- FP8: the INT8 placement and calibration, then every Q/DQ re-typed to FLOAT8E4M3FN with amax
  scales (`scale = amax / 448`). ONNX Runtime's own FP8 path derives scales from the tensor's
  standard deviation, which clips the outliers that TensorRT's and ModelOpt's amax scaling keeps.
- INT4: weight-only, block-wise symmetric along the input channel (`MatMulNBitsQuantizer` in QDQ
  format: blocked DequantizeLinear, opset 21), activations stay in float.

The nodes to quantize are always named explicitly (`quantizable_nodes` minus exclusions), never
left to ONNX Runtime's op-type rules, which in QDQ format also quantize attention's activation x
activation MatMuls. Exclusions are selected by module path (the exporter's
`pkg.torch.onnx.name_scopes` metadata, e.g. `layers.3.mlp.down_proj`) or node name; the LM head
is found by what it computes (`output_projection`: the GEMM behind the `logits` output).
"""

from __future__ import annotations

import ast
import fnmatch
import logging
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nvlm_export.errors import ExportError

if TYPE_CHECKING:
    import onnx

QUANTIZABLE_OPS = ("MatMul", "Gemm", "Conv")
# Ops between a projection and a graph output that keep it "the projection's output" (a bias,
# a reshape to [batch, seq, vocab], the last position's slice, an fp16/fp32 cast).
PASS_THROUGH_OPS = {"Add", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Slice", "Gather", "Identity"}
INT8_MAX = 127.0  # symmetric INT8: [-127, 127]
FP8_E4M3_MAX = 448.0
INT4_BLOCK_SIZES = (128, 64, 32, 16)  # largest first: 128 is TensorRT's usual INT4 block
FP8_MIN_OPSET = 19  # QuantizeLinear / DequantizeLinear with float8 types
NAME_SCOPES = "pkg.torch.onnx.name_scopes"
# Graphs above this size are saved with their weights in an external data file (protobuf's 2 GB
# limit leaves room for the graph itself).
EXTERNAL_DATA_BYTES = 1 << 30
# Calibration outputs held in memory before ONNX Runtime folds them into running min/max.
CALIBRATION_FLUSH = 16


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


class _FeedReader:
    """ONNX Runtime's CalibrationDataReader protocol over recorded samples (streamed)."""

    def __init__(self, samples: Iterator[Mapping[str, np.ndarray]]) -> None:
        self._samples = samples

    def get_next(self) -> dict[str, np.ndarray] | None:
        return dict(next(self._samples, None) or {}) or None


@contextmanager
def _quiet_root_advice() -> Iterator[None]:
    """onnxruntime's quantizer logs advice to run its shape-inference pre-processing on the root
    logger, once per graph; our graphs come from the exporter with shapes, so it is only noise
    in the middle of `build`'s progress."""

    def keep(record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def quantize_static_graph(
    source: Path,
    output: Path,
    samples: Iterator[Mapping[str, np.ndarray]],
    *,
    precision: str,
    exclude: Sequence[str],
) -> None:
    """INT8 or FP8 Q/DQ on the MatMul/Gemm/Conv inputs of `source`, written to `output`."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    # The nodes to quantize are named explicitly: ONNX Runtime honours `MatMulConstBOnly` only in
    # QOperator format, so in QDQ format it would also quantize attention's activation x
    # activation MatMuls (Q.K^T and softmax.V). INT8 softmax probabilities with a symmetric
    # per-tensor scale (1/127) round most of a long sequence's weights to zero.
    skipped = set(exclude)
    nodes = quantizable_nodes(onnx.load(str(source), load_external_data=False))
    targets = [n.name for n in nodes if n.name not in skipped]
    if not targets:  # an empty list would mean "every node" to ONNX Runtime
        raise ExportError(
            f"Nothing to quantize in {source.name}: all {len(nodes)} MatMul/Gemm/Conv nodes "
            "are excluded",
            fix="Exclude fewer nodes, or leave this graph out of --components",
        )
    external = graph_bytes(source) > EXTERNAL_DATA_BYTES
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nvlm-quant-") as scratch, _quiet_root_advice():
        int8_path = Path(scratch) / "int8.onnx"
        quantize_static(
            str(source),
            str(int8_path),
            _FeedReader(samples),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZABLE_OPS),
            nodes_to_quantize=targets,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(exclude),
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=external,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "MatMulConstBOnly": True,
                # One Q/DQ pair per quantized consumer when there are several; with a single
                # quantized reader the other readers still share its DQ (see float_readers_off_qdq).
                "DedicatedQDQPair": True,
                # Q/DQ on inputs only (TensorRT fuses them into the GEMM/conv); outputs stay float.
                "OpTypesToExcludeOutputQuantization": list(QUANTIZABLE_OPS),
                "QuantizeBias": False,  # TensorRT has no INT32 DequantizeLinear; biases stay float
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # weight [K, N]: N is output
                "CalibMaxIntermediateOutputs": CALIBRATION_FLUSH,
            },
        )
        model = onnx.load(str(int8_path))
        float_readers_off_qdq(model, targets)
        if precision == "fp8":
            retype_to_fp8(model, source)
        save_model(model, output, external=external)


def float_readers_off_qdq(model: onnx.ModelProto, quantized: Iterable[str]) -> int:
    """Point every reader of an activation's DequantizeLinear that is not a quantized node back
    at the float tensor the QuantizeLinear reads; returns how many inputs were rewired.

    ONNX Runtime makes a dedicated Q/DQ pair per reader only when a tensor has more than one
    *quantized* reader. With one, it rewires every reader to the single DQ output: NVLM-H's
    pixel-shuffled features feed the tile projector (MatMul, quantized) and the thumbnail
    projector (LayerNorm first), so the LayerNorm read a quantized input. TensorRT's placement
    rule is Q/DQ on the inputs of MatMul/Gemm/Conv only; a Q/DQ elsewhere runs that op on
    rounded values (or, for a Shape reader, is at best useless). Weight Q/DQ are left alone.
    """
    targets = set(quantized)
    inits = {t.name for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    # DQ output -> the float tensor its activation QuantizeLinear reads
    float_of: dict[str, str] = {}
    for node in model.graph.node:
        q = producer.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in inits:
            float_of[node.output[0]] = q.input[0]
    rewired = 0
    for node in model.graph.node:
        if node.name in targets:
            continue
        for i, name in enumerate(node.input):
            if name in float_of:
                node.input[i] = float_of[name]
                rewired += 1
    return rewired


def retype_to_fp8(model: onnx.ModelProto, source: Path) -> None:
    """Turn the symmetric INT8 Q/DQ of `model` into FP8 E4M3FN Q/DQ with amax scales, in place.

    Activations: INT8 symmetric scale is amax / 127, so the FP8 scale is scale * 127 / 448.
    Weights: re-quantized from the source's float weights, per output channel, scale amax / 448.
    """
    import onnx
    from onnx import numpy_helper

    weights = {t.name: t for t in onnx.load(str(source)).graph.initializer}
    inits = {t.name: t for t in model.graph.initializer}
    done: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        data, scale_name, zero_name = node.input[0], node.input[1], node.input[2]
        original = data.removesuffix("_quantized")
        if node.op_type == "DequantizeLinear" and data in inits and original in weights:
            axis = _axis(node)
            weight = numpy_helper.to_array(weights[original]).astype(np.float32)
            quantized, scale = fp8_weight(weight, axis)
            _replace(inits[data], numpy_helper.from_array(quantized, data))
            _replace(inits[scale_name], numpy_helper.from_array(scale, scale_name))
        elif scale_name not in done:
            scale = numpy_helper.to_array(inits[scale_name]) * (INT8_MAX / FP8_E4M3_MAX)
            _replace(
                inits[scale_name], numpy_helper.from_array(scale.astype(np.float32), scale_name)
            )
        done.add(scale_name)
        if zero_name not in done:
            _replace(inits[zero_name], _fp8_zeros(inits[zero_name]))
            done.add(zero_name)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = max(entry.version, FP8_MIN_OPSET)
    # Shape inference recorded INT8 element types for the Q outputs; let it infer them again.
    del model.graph.value_info[:]


def fp8_weight(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel FP8 E4M3FN weight and scale (amax / 448) along `axis`."""
    from ml_dtypes import float8_e4m3fn

    reduce = tuple(i for i in range(weight.ndim) if i != axis % weight.ndim)
    amax = np.abs(weight).max(axis=reduce, keepdims=True)
    scale = np.where(amax > 0, amax / FP8_E4M3_MAX, 1.0).astype(np.float32)
    quantized = np.clip(weight / scale, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(float8_e4m3fn)
    return quantized, scale.reshape(-1)


def _fp8_zeros(zero_point: Any) -> Any:
    from onnx import TensorProto, helper

    count = int(np.prod(zero_point.dims)) if zero_point.dims else 1
    return helper.make_tensor(
        zero_point.name, TensorProto.FLOAT8E4M3FN, list(zero_point.dims), [0.0] * count
    )


def _axis(node: Any) -> int:
    for attr in node.attribute:
        if attr.name == "axis":
            return int(attr.i)
    return 1


def _replace(tensor: Any, new: Any) -> None:
    tensor.CopyFrom(new)


# --- INT4: weight-only, block-wise ------------------------------------------------------------


def int4_block_size(model: onnx.ModelProto, nodes: Sequence[QuantizableNode]) -> int:
    """The largest of 128/64/32/16 dividing the input channels of every MatMul weight in `nodes`."""
    inits = {t.name: t for t in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    channels = set()
    for node in nodes:
        weight = inits.get(by_name[node.name].input[1])
        if weight is not None and len(weight.dims) == 2:
            channels.add(int(weight.dims[0]))
    for block in INT4_BLOCK_SIZES:
        if all(k % block == 0 for k in channels):
            return block
    raise ExportError(
        "No INT4 block size fits the decoder's weights",
        why=f"input channel counts {sorted(channels)} are not all divisible by 16",
        fix="Exclude the odd-sized layers with --exclude, or use int8",
    )


def gemms_as_matmuls(model: onnx.ModelProto, exclude: Sequence[str]) -> onnx.ModelProto:
    """Rewrite each plain Gemm with a constant weight (not in `exclude`) as MatMul (+ Add bias).

    ONNX Runtime's block-wise INT4 quantizer takes MatMul only, and the exporter writes a linear
    layer on a 2-D input (the decoder's lm_head) as Gemm(x, W, b, transB=1). The MatMul keeps
    the Gemm's name and metadata, so manifests and --exclude patterns still name it.
    """
    inits = {t.name: t for t in model.graph.initializer}
    skipped = set(exclude)
    rewritten = []
    for node in model.graph.node:
        if node.op_type == "Gemm" and node.name not in skipped and _is_plain_linear(node, inits):
            rewritten += _gemm_as_matmul(node, inits[node.input[1]], model)
        else:
            rewritten.append(node)
    del model.graph.node[:]
    model.graph.node.extend(rewritten)
    _drop_unused_initializers(model)
    return model


def _is_plain_linear(node: Any, inits: Mapping[str, Any]) -> bool:
    """Gemm computing x @ W(^T) + b: alpha = beta = 1, no transposed x, a constant W."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    scaled = attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0
    return not scaled and not attrs.get("transA", 0) and node.input[1] in inits


def _gemm_as_matmul(node: Any, weight: Any, model: onnx.ModelProto) -> list[Any]:
    from onnx import helper, numpy_helper

    kn = numpy_helper.to_array(weight)
    if any(a.name == "transB" and a.i for a in node.attribute):
        kn = kn.T  # [N, K] -> [K, N]
    name = f"{weight.name}_kn"
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(kn), name))
    has_bias = len(node.input) > 2 and bool(node.input[2])
    product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
    matmul = helper.make_node("MatMul", [node.input[0], name], [product], name=node.name)
    matmul.metadata_props.extend(node.metadata_props)
    if not has_bias:
        return [matmul]
    bias = helper.make_node(
        "Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"
    )
    return [matmul, bias]


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def quantize_int4_graph(
    model: onnx.ModelProto,
    output: Path,
    *,
    exclude: Sequence[str],
    block_size: int,
    external: bool,
) -> None:
    """INT4 weight-only block-wise Q/DQ (symmetric) on the constant-weight MatMuls of `model`."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size,
        is_symmetric=True,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=("MatMul",),
        quant_axes=(("MatMul", 0),),  # blocks run along K, the input channel of a [K, N] weight
    )
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=list(exclude), algo_config=config)
    quantizer.process()
    save_model(quantizer.model.model, output, external=external)


# --- files --------------------------------------------------------------------------------------


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


def save_model(model: onnx.ModelProto, output: Path, *, external: bool) -> None:
    import onnx

    output.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save(
            model,
            str(output),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=output.name + ".data",
        )
    else:
        onnx.save(model, str(output))
