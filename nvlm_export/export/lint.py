"""GPU-free lint of a bundle's ONNX graphs against what TensorRT's ONNX parser accepts.

Runs anywhere onnx is installed, so problems show up on the export host instead of an hour into a
build on a Jetson:

    findings = lint_bundle(bundle_dir, target=resolve_target("orin"))
    errors = [f for f in findings if f.severity == "error"]

Checks, each a small function over the ModelProto: operators outside TensorRT's support list,
opsets outside the parser's range, element types TensorRT lacks (or the target lacks), Q/DQ nodes
TensorRT refuses (non-zero zero points, per-channel activations, bad axes or block sizes), graph
inputs whose fixed dimensions contradict the build plan's profiles, and large INT64 tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from nvlm_export.errors import BundleError
from nvlm_export.export.engine_plan import (
    DEFAULT_TENSORRT,
    PlanOptions,
    ProfilePlan,
    axis_ranges,
    graph_profiles,
    tensorrt_major,
)
from nvlm_export.export.targets import Target, first_tensorrt_reading, max_opset
from nvlm_export.runtime.manifest import load_manifest

if TYPE_CHECKING:
    import onnx

Severity = Literal["error", "warning"]

# TensorRT's ONNX operator support, from onnx/onnx-tensorrt docs/operators.md as of TensorRT 10.15
# (the rows marked "Y"). Ops added after 10.3 (Attention, RMSNormalization, RotaryEmbedding,
# TensorScatter) need opset 23+, which the opset check below already refuses for TensorRT 10.3.
TENSORRT_OPS_SOURCE = "onnx/onnx-tensorrt docs/operators.md, TensorRT 10.15"
TENSORRT_ONNX_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool
    BatchNormalization BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape
    Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum
    Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
    GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
    GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If
    ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
    LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
    RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
    ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
    RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter
    ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
    Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile
    TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()  # noqa: SIM905 - the list reads like the doc's table
)
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
MIN_OPSET = 9

# ONNX TensorProto element types, by name, that TensorRT cannot hold at all.
UNSUPPORTED_TYPES = {"STRING": "string", "COMPLEX64": "complex64", "COMPLEX128": "complex128"}
# FP8 in TensorRT is E4M3 only.
UNSUPPORTED_FP8 = ("FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
LARGE_INT64_ELEMENTS = 1 << 20  # 8 MB of int64 in one tensor is data, not shape arithmetic


@dataclass(frozen=True)
class Finding:
    """One problem: where it is, how bad, and what to do about it."""

    severity: Severity
    code: str
    graph: str
    where: str  # node or tensor name
    message: str
    fix: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lint_bundle(bundle_dir: str | Path, target: Target | None = None) -> list[Finding]:
    """Lint every graph a bundle's manifest names, against the profiles a build would use.

    The bundle's files are first checked against the SHA-256 recorded in its manifest."""
    import onnx

    bundle = Path(bundle_dir)
    manifest = load_manifest(bundle, verify_hashes=True)
    axes = axis_ranges(manifest, PlanOptions())
    findings: list[Finding] = []
    for name, graph in manifest.graphs.items():
        path = bundle / graph.file
        # The weights stay on disk: the checks need the graph and small constants only.
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as error:  # protobuf's DecodeError and friends share no base class
            raise BundleError(
                f"The {name} graph {path} is not a readable ONNX file",
                why=str(error).splitlines()[0] if str(error) else type(error).__name__,
                fix="Re-export or re-copy the bundle",
            ) from None
        profiles = graph_profiles(name, graph, axes)
        findings += lint_model(model, graph=name, target=target, profiles=profiles, base_dir=path)
    return findings


def lint_model(
    model: onnx.ModelProto,
    *,
    graph: str = "model",
    target: Target | None = None,
    profiles: Iterable[ProfilePlan] = (),
    base_dir: Path | None = None,
) -> list[Finding]:
    """All findings for one ONNX model (its subgraphs included)."""
    context = _Context(model, graph, target, base_dir.parent if base_dir else None)
    findings = [
        *_check_opset(context),
        *_check_ops(context),
        *_check_types(context),
        *_check_qdq(context),
        *_check_int64(context),
        *_check_profiles(context, tuple(profiles)),
    ]
    return findings


# --- shared walking ---------------------------------------------------------------------------


class _Context:
    def __init__(
        self, model: onnx.ModelProto, graph: str, target: Target | None, base_dir: Path | None
    ) -> None:
        import onnx

        self.onnx = onnx
        self.model = model
        self.graph = graph
        self.target = target
        self.base_dir = base_dir
        self.nodes = list(_walk_nodes(model.graph))
        self.initializers = {t.name: t for t in _walk_initializers(model.graph)}
        self.constants = {
            node.output[0]: attr.t
            for node in self.nodes
            if node.op_type == "Constant"
            for attr in node.attribute
            if attr.name == "value"
        }

    def finding(self, severity: Severity, code: str, where: str, message: str, fix: str) -> Finding:
        return Finding(severity, code, self.graph, where, message, fix)

    def constant(self, name: str) -> Any | None:
        """The numpy value of an initializer or Constant output, else None (a runtime tensor)."""
        tensor = self.initializers.get(name) or self.constants.get(name)
        if tensor is None:
            return None
        from onnx import numpy_helper

        base = str(self.base_dir) if self.base_dir else ""
        return numpy_helper.to_array(tensor, base_dir=base)

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or name in self.constants

    def type_name(self, elem_type: int) -> str:
        return self.onnx.TensorProto.DataType.Name(elem_type)


def _walk_nodes(graph: Any) -> Iterator[Any]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in (attr.g, *attr.graphs) if attr.HasField("g") else attr.graphs:
                yield from _walk_nodes(sub)


def _walk_initializers(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            for sub in (attr.g, *attr.graphs) if attr.HasField("g") else attr.graphs:
                yield from _walk_initializers(sub)


def _attribute(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


# --- checks -----------------------------------------------------------------------------------


def _check_opset(c: _Context) -> Iterator[Finding]:
    """The target's own TensorRT (a Jetson's JetPack) must read the graph's opset. Where the user
    picks the version (data-center GPUs, no target), an opset that only newer TensorRTs read is a
    warning naming the first that does; `engine` checks the installed one."""
    fixed = c.target.tensorrt if c.target else None
    version = fixed or DEFAULT_TENSORRT
    tensorrt_major(version)  # validates the version text
    highest = max_opset(version)
    for entry in c.model.opset_import:
        if entry.domain not in STANDARD_DOMAINS:
            continue
        if entry.version < MIN_OPSET:
            yield c.finding(
                "error",
                "opset",
                "opset_import",
                f"opset {entry.version} is older than any TensorRT reads ({MIN_OPSET}+)",
                "Re-export with opset 18 (the exporter's default)",
            )
        elif entry.version > highest:
            yield _newer_opset(c, entry.version, version, fixed is not None)


def _newer_opset(c: _Context, opset: int, version: str, fixed: bool) -> Finding:
    first = first_tensorrt_reading(opset)
    severity: Severity
    if fixed and c.target is not None:
        severity, fix = "error", f"Quantize to one of {', '.join(c.target.precisions)} for it"
    elif first is None:
        severity, fix = "error", "Re-export with opset 18 (the exporter's default)"
    else:
        severity, fix = "warning", f"Build the engines with TensorRT {first} or newer"
    whose = "the target's TensorRT" if fixed else "TensorRT"
    return c.finding(
        severity,
        "opset",
        "opset_import",
        f"opset {opset} is newer than {whose} {version} reads ({MIN_OPSET}-{max_opset(version)})",
        fix,
    )


def _check_ops(c: _Context) -> Iterator[Finding]:
    for node in c.nodes:
        where = node.name or f"{node.op_type}->{','.join(node.output)}"
        if node.domain not in STANDARD_DOMAINS:
            yield c.finding(
                "error",
                "custom-op",
                where,
                f"{node.domain}::{node.op_type} is not a standard ONNX op; TensorRT needs a plugin",
                "Export without contrib/custom ops (ONNX Runtime fusions are not portable)",
            )
        elif node.op_type not in TENSORRT_ONNX_OPS:
            yield c.finding(
                "error",
                "unsupported-op",
                where,
                f"{node.op_type} is not in TensorRT's ONNX support list ({TENSORRT_OPS_SOURCE})",
                "Rewrite this part of the model with supported ops or provide a TensorRT plugin",
            )


def _tensor_types(c: _Context) -> Iterator[tuple[str, int]]:
    """(tensor name, element type) of graph I/O, value_info, initializers and Cast targets."""
    graph = c.model.graph
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.HasField("tensor_type"):
            yield value.name, value.type.tensor_type.elem_type
    for name, tensor in c.initializers.items():
        yield name, tensor.data_type
    for name, tensor in c.constants.items():
        yield name, tensor.data_type
    for node in c.nodes:
        if node.op_type == "Cast":
            yield node.output[0], int(_attribute(node, "to", 0))


def _check_types(c: _Context) -> Iterator[Finding]:
    for name, elem_type in _tensor_types(c):
        problem = _type_problem(c.type_name(elem_type), c.target)
        if problem is not None:
            severity, what, fix = problem
            yield c.finding(severity, "dtype", name, f"tensor is {what}", fix)


def _type_problem(type_name: str, target: Target | None) -> tuple[str, str, str] | None:
    """What TensorRT (on `target`, if named) makes of a tensor type: (severity, what the tensor
    is and why that matters, what to do), or None when the type is fine."""
    if type_name in UNSUPPORTED_TYPES:
        return (
            "error",
            f"{UNSUPPORTED_TYPES[type_name]}, which TensorRT cannot hold",
            "Keep strings and complex numbers outside the graph",
        )
    if type_name == "DOUBLE":
        return (
            "warning",
            "float64; TensorRT casts it to float32 (clamping to +-FLT_MAX)",
            "Export in float32 to make the cast explicit",
        )
    if type_name in UNSUPPORTED_FP8:
        return "error", f"{type_name}; TensorRT's FP8 is E4M3FN only", "Quantize to FLOAT8E4M3FN"
    if type_name == "BFLOAT16" and target and not target.supports_bf16:
        return (
            "error",
            f"bfloat16; {target.name} (sm {target.sm}) has no bf16",
            "Export in float16 for this target",
        )
    if type_name == "FLOAT8E4M3FN" and target and "fp8" not in target.precisions:
        return (
            "error",
            f"FP8; {target.name} (sm {target.sm}) has no FP8 kernels",
            "Quantize the bundle to int8 or int4 for this target",
        )
    return None


def _check_qdq(c: _Context) -> Iterator[Finding]:
    for node in c.nodes:
        if node.domain in STANDARD_DOMAINS and node.op_type in QDQ_OPS:
            yield from _check_qdq_node(c, node)


def _check_qdq_node(c: _Context, node: Any) -> Iterator[Finding]:
    where = node.name or f"{node.op_type}->{node.output[0]}"
    data, scale = node.input[0], node.input[1]
    zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if zero_point is not None:
        value = c.constant(zero_point)
        if value is None or value.any():
            yield c.finding(
                "error",
                "qdq-zero-point",
                where,
                f"{node.op_type} has a {'dynamic' if value is None else 'non-zero'} zero point "
                f"'{zero_point}'; TensorRT supports symmetric quantization only",
                "Quantize symmetrically (zero point 0)",
            )
    scale_value = c.constant(scale)
    if scale_value is None:
        yield c.finding(
            "error",
            "qdq-scale",
            where,
            f"{node.op_type} scale '{scale}' is computed at run time; TensorRT needs a constant",
            "Store the scale as an initializer",
        )
        return
    is_weight = c.is_constant(data)
    block_size = int(_attribute(node, "block_size", 0) or 0)
    data_value = c.constant(data) if is_weight else None
    rank = data_value.ndim if data_value is not None else None
    if block_size > 0:
        yield from _check_block(c, node, where, is_weight, data_value, scale_value, block_size)
    elif scale_value.size > 1:
        axis = int(_attribute(node, "axis", 1))
        if not is_weight:
            yield c.finding(
                "error",
                "qdq-axis",
                where,
                f"{node.op_type} quantizes activation '{data}' per channel; TensorRT quantizes "
                "activations per tensor",
                "Use one scale for activations (per-channel scales for weights only)",
            )
        elif rank is not None and not -rank <= axis < rank:
            yield c.finding(
                "error",
                "qdq-axis",
                where,
                f"{node.op_type} axis {axis} is out of range for rank-{rank} weight '{data}'",
                "Quantize along the weight's output-channel axis",
            )
        elif data_value is not None and data_value.shape[axis] != scale_value.size:
            yield c.finding(
                "error",
                "qdq-axis",
                where,
                f"{scale_value.size} scales for axis {axis} of size {data_value.shape[axis]}",
                "Give one scale per channel of the quantization axis",
            )
    if _is_int4(c, node, zero_point) and not is_weight:
        yield c.finding(
            "error",
            "qdq-int4",
            where,
            f"INT4 {node.op_type} on activation '{data}'; TensorRT runs INT4 weight-only",
            "Quantize activations to int8/fp8 or keep them in float",
        )


def _check_block(
    c: _Context,
    node: Any,
    where: str,
    is_weight: bool,
    data: Any | None,
    scale: Any,
    block_size: int,
) -> Iterator[Finding]:
    if not is_weight:
        yield c.finding(
            "error",
            "qdq-block",
            where,
            f"block-wise {node.op_type} on an activation; TensorRT supports block quantization "
            "of weights only",
            "Quantize activations per tensor",
        )
        return
    if data is None:
        return
    axis = int(_attribute(node, "axis", 1))
    if data.ndim != 2 or scale.ndim != 2:
        yield c.finding(
            "error",
            "qdq-block",
            where,
            f"block-wise {node.op_type} on a rank-{data.ndim} weight with rank-{scale.ndim} "
            "scales; TensorRT supports 2-D weights with 2-D scales",
            "Quantize 2-D MatMul/Gemm weights block-wise",
        )
        return
    if not -2 <= axis < 2 or data.shape[axis] % block_size:
        yield c.finding(
            "error",
            "qdq-block",
            where,
            f"block size {block_size} does not divide axis {axis} of weight shape "
            f"{list(data.shape)}",
            "Pick a block size that divides the input-channel dimension (e.g. 128 or 64)",
        )


def _is_int4(c: _Context, node: Any, zero_point: str | None) -> bool:
    """INT4 is told by the zero point's type, the Q output_dtype attribute or the DQ input."""
    int4 = {c.onnx.TensorProto.INT4, c.onnx.TensorProto.UINT4}
    if zero_point is not None:
        tensor = c.initializers.get(zero_point) or c.constants.get(zero_point)
        if tensor is not None and tensor.data_type in int4:
            return True
    if node.op_type == "QuantizeLinear":
        return int(_attribute(node, "output_dtype", 0) or 0) in int4
    tensor = c.initializers.get(node.input[0]) or c.constants.get(node.input[0])
    return tensor is not None and tensor.data_type in int4


def _check_int64(c: _Context) -> Iterator[Finding]:
    int64 = c.onnx.TensorProto.INT64
    for name, tensor in c.initializers.items():
        count = 1
        for dim in tensor.dims:
            count *= dim
        if tensor.data_type == int64 and count >= LARGE_INT64_ELEMENTS:
            yield c.finding(
                "warning",
                "int64",
                name,
                f"{count} int64 elements in one tensor; TensorRT computes int64 slower than "
                "int32 (shape arithmetic in int64 is fine)",
                "Store large integer data as int32",
            )


def _check_profiles(c: _Context, profiles: tuple[ProfilePlan, ...]) -> Iterator[Finding]:
    if not profiles:
        return
    inputs = {v.name: v for v in c.model.graph.input if v.name not in c.initializers}
    planned = set(profiles[0].shapes)
    for name in sorted(set(inputs) - planned):
        yield c.finding(
            "error",
            "profile",
            name,
            "graph input is not declared in the manifest, so no profile covers it",
            "The manifest and the graph disagree; re-export the bundle",
        )
    for name in sorted(planned - set(inputs)):
        yield c.finding(
            "error",
            "profile",
            name,
            "the manifest declares this input but the graph has none by that name",
            "The manifest and the graph disagree; re-export the bundle",
        )
    for profile in profiles:
        for name, (low, _, high) in profile.shapes.items():
            if name in inputs:
                yield from _check_input_dims(c, profile.name, inputs[name], low, high)


def _check_input_dims(
    c: _Context, profile: str, value: Any, low: tuple[int, ...], high: tuple[int, ...]
) -> Iterator[Finding]:
    dims = value.type.tensor_type.shape.dim
    if len(dims) != len(low):
        yield c.finding(
            "error",
            "profile",
            value.name,
            f"graph input has rank {len(dims)}, the {profile} profile rank {len(low)}",
            "The manifest and the graph disagree; re-export the bundle",
        )
        return
    for axis, (dim, lo, hi) in enumerate(zip(dims, low, high, strict=True)):
        if dim.HasField("dim_value") and not lo == dim.dim_value == hi:
            yield c.finding(
                "error",
                "profile",
                value.name,
                f"axis {axis} is fixed to {dim.dim_value} in the graph but the {profile} profile "
                f"needs {lo}..{hi}",
                "Re-export with this axis dynamic (the exporter specialised it)",
            )
