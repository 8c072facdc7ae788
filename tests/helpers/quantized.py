"""Questions asked of quantized bundles by more than one test module: the Q/DQ placement
TensorRT builds from, and a profile that times every stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from nvlm_export.export.qdq import QUANTIZABLE_OPS
from nvlm_export.export.quantize import QuantizeSettings
from nvlm_export.profiling.profiler import ProfileSettings, profile_bundle

QDQ = ("QuantizeLinear", "DequantizeLinear")
FLOAT_ONLY = ("Add", "Softmax", "LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Mul", "Div")


def fast(precision: str, **kwargs: object) -> QuantizeSettings:
    """Settings whose accuracy check is short (2 requests, 8 steps): enough on tiny bundles."""
    return QuantizeSettings(precision, accuracy_requests=2, accuracy_steps=8, **kwargs)  # type: ignore[arg-type]


class Graph:
    """A quantized ONNX graph, with the questions the tests ask of it."""

    def __init__(self, path: Path) -> None:
        self.model = onnx.load(str(path))
        self.inits = {t.name: t for t in self.model.graph.initializer}
        self.producer = {o: n for n in self.model.graph.node for o in n.output}
        self.nodes = list(self.model.graph.node)

    def qdq(self) -> list[onnx.NodeProto]:
        return [n for n in self.nodes if n.op_type in QDQ]

    def dequantized_inputs(self, node: onnx.NodeProto) -> list[str]:
        return [i for i in node.input if i in self.producer and self.producer[i].op_type in QDQ]

    def attr(self, node: onnx.NodeProto, name: str, default: int) -> int:
        return next((int(a.i) for a in node.attribute if a.name == name), default)

    def weight_dqs(self) -> list[onnx.NodeProto]:
        return [
            n for n in self.nodes if n.op_type == "DequantizeLinear" and n.input[0] in self.inits
        ]


def check_qdq(graph: Graph, precision: str, record: dict) -> None:
    excluded = {n["node"] for n in record["excluded_nodes"]}
    for node in graph.qdq():
        zero = graph.inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero is not None:
            assert not numpy_helper.to_array(zero).astype(np.float32).any(), "zero point != 0"
            want = {"int8": TensorProto.INT8, "fp8": TensorProto.FLOAT8E4M3FN}.get(precision)
            assert want is None or zero.data_type == want
        for consumer in (n for n in graph.nodes if set(n.input) & set(node.output)):
            if node.op_type == "DequantizeLinear":
                # TensorRT's placement: a DQ feeds only the GEMM/conv it was made for; every other
                # reader of the tensor (Shape, a norm, an excluded layer) reads it in float.
                assert consumer.op_type in QUANTIZABLE_OPS, consumer.op_type
                assert consumer.name not in excluded, consumer.name
    for node in graph.nodes:
        if node.op_type in FLOAT_ONLY:
            assert not graph.dequantized_inputs(node), f"{node.op_type} input is quantized"
        if node.op_type == "MatMul" and graph.dequantized_inputs(node):
            # Only weight GEMMs: attention's activation x activation MatMuls (Q.K^T, P.V) stay
            # float; INT8 softmax probabilities would round a long sequence's weights to 0.
            weight = graph.producer.get(node.input[1])
            assert weight is not None and weight.input[0] in graph.inits, node.name
    weights = graph.weight_dqs()
    assert len(weights) == record["quantized_nodes"] > 0
    for dq in weights:
        weight = graph.inits[dq.input[0]]
        scale = numpy_helper.to_array(graph.inits[dq.input[1]])
        consumer = next(n for n in graph.nodes if dq.output[0] in n.input)
        if precision == "int4":
            assert weight.data_type == TensorProto.INT4
            assert graph.attr(dq, "block_size", 0) == record["block_size"]
            assert weight.dims[0] % record["block_size"] == 0 and graph.attr(dq, "axis", 1) == 0
            continue
        want = TensorProto.INT8 if precision == "int8" else TensorProto.FLOAT8E4M3FN
        assert weight.data_type == want
        # Per output channel: MatMul [K, N] axis 1, Conv [O, I, kh, kw] and Gemm transB axis 0.
        axis = graph.attr(dq, "axis", 1)
        assert axis == (1 if consumer.op_type == "MatMul" else 0)
        assert scale.size == weight.dims[axis] > 1
    activations = [n for n in graph.qdq() if n.input[0] not in graph.inits]
    if precision == "int4":
        assert not activations  # weight-only
    else:
        assert activations
        for node in activations:
            assert numpy_helper.to_array(graph.inits[node.input[1]]).size == 1  # per tensor
    if precision in ("fp8", "int4"):
        assert graph.model.opset_import[0].version >= (19 if precision == "fp8" else 21)


def check_profile(bundle: Path) -> None:
    settings = ProfileSettings(tiles=(1,), prompt_tokens=8, new_tokens=3, runs=1, warmup=0)
    report = profile_bundle(bundle, settings, intra_op_threads=1).to_dict()
    (case,) = report["cases"]
    for stage in ("prepare", "vision", "prefill"):
        assert case["stages_ms"][stage]["median"] > 0
    (run,) = case["runs"]
    assert run["ttft_ms"] >= run["stages_ms"]["vision"] + run["stages_ms"]["prefill"]
    assert run["e2e_ms"] >= run["ttft_ms"] + sum(run["decode_ms"])
    assert len(run["decode_ms"]) == 2 and case["decode_tokens_per_second"] > 0
