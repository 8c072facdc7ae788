"""GPU-free TensorRT lint: the problems TensorRT's parser would hit, nothing on clean graphs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import typer
from helpers.manifests import interface_model, make_manifest, write_bundle
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from nvlm_export.commands.engine import lint as lint_command
from nvlm_export.export.lint import lint_bundle, lint_model
from nvlm_export.export.targets import resolve_target


def _model(nodes: list, initializers: list, *, opset: int = 18) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _quantized_matmul(activation_zero_point: int) -> tuple[list, list]:
    """x -> Q/DQ (int8, per tensor) -> MatMul with a per-channel DQ'd int8 weight -> y."""
    weight = numpy_helper.from_array(np.ones((8, 4), np.int8), "w_q")
    w_scale = numpy_helper.from_array(np.full(4, 0.1, np.float32), "w_scale")
    w_zero = numpy_helper.from_array(np.zeros(4, np.int8), "w_zero")
    x_scale = numpy_helper.from_array(np.array(0.05, np.float32), "x_scale")
    x_zero = numpy_helper.from_array(np.array(activation_zero_point, np.int8), "x_zero")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xdq"], name="dq_x"),
        helper.make_node(
            "DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], name="dq_w", axis=1
        ),
        helper.make_node("MatMul", ["xdq", "w"], ["y"], name="matmul"),
    ]
    return nodes, [weight, w_scale, w_zero, x_scale, x_zero]


def test_clean_quantized_graph_has_no_findings() -> None:
    nodes, inits = _quantized_matmul(0)
    assert lint_model(_model(nodes, inits), target=resolve_target("orin")) == []


def test_unsupported_op_and_nonzero_zero_point_are_exactly_the_findings() -> None:
    nodes, inits = _quantized_matmul(3)
    nodes.append(helper.make_node("Unique", ["y"], ["u"], name="unique"))
    findings = lint_model(_model(nodes, inits), graph="decoder")
    got = sorted((f.severity, f.code, f.where) for f in findings)
    assert got == [
        ("error", "qdq-zero-point", "dq_x"),
        ("error", "qdq-zero-point", "q_x"),
        ("error", "unsupported-op", "unique"),
    ]
    assert all(f.graph == "decoder" and f.fix for f in findings)


def test_per_channel_activation_and_bad_block_size_are_errors() -> None:
    scales = numpy_helper.from_array(np.full(8, 0.1, np.float32), "per_channel")
    weight = numpy_helper.from_array(np.ones((8, 4), np.int8), "w4")
    block_scale = numpy_helper.from_array(np.full((3, 4), 0.1, np.float32), "block_scale")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "per_channel"], ["xq"], name="q_pc", axis=1),
        helper.make_node(
            "DequantizeLinear", ["w4", "block_scale"], ["w"], name="dq_block", axis=0, block_size=3
        ),  # 3 does not divide the 8 input channels
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
    ]
    model = _model(nodes, [scales, weight, block_scale], opset=21)  # block_size needs opset 21
    newer = replace(resolve_target("thor"), tensorrt="10.15")  # parses opsets up to 24
    codes = sorted((f.code, f.where) for f in lint_model(model, target=newer))
    assert codes == [("qdq-axis", "q_pc"), ("qdq-block", "dq_block")]


def test_opset_dtypes_and_custom_domains() -> None:
    nodes = [
        helper.make_node("Cast", ["x"], ["x64"], name="to_double", to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["x64"], ["y"], name="back", to=TensorProto.FLOAT),
        helper.make_node("FusedMatMul", ["x", "x"], ["z"], name="fused", domain="com.microsoft"),
    ]
    model = _model(nodes, [], opset=22)
    findings = {(f.code, f.severity) for f in lint_model(model, target=resolve_target("orin"))}
    assert findings == {("opset", "error"), ("dtype", "warning"), ("custom-op", "error")}


def test_fp8_tensors_are_an_error_only_on_targets_without_fp8() -> None:
    weight = helper.make_tensor("w8", TensorProto.FLOAT8E4M3FN, [8, 4], np.zeros(32, np.float32))
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    nodes = [
        helper.make_node("DequantizeLinear", ["w8", "s"], ["w"], name="dq"),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
    ]
    model = _model(nodes, [weight, scale], opset=19)
    assert lint_model(model, target=resolve_target("h100")) == []
    (finding,) = lint_model(model, target=resolve_target("orin"))
    assert finding.code == "dtype" and finding.where == "w8" and "int8 or int4" in finding.fix


def test_fixed_input_dims_that_contradict_the_profiles_are_found(tmp_path: Path) -> None:
    manifest = make_manifest("nvlm-d")
    bundle = write_bundle(tmp_path, manifest)
    assert lint_bundle(bundle, resolve_target("orin")) == []
    # A vision graph whose tile axis the exporter specialised to 1.
    vision = interface_model(manifest.graphs["vision"])
    vision.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(vision, str(bundle / "vision.onnx"))
    manifest.save(bundle)  # record the new graph file, as a writer does
    (finding,) = lint_bundle(bundle)
    assert (finding.graph, finding.code, finding.where) == ("vision", "profile", "pixel_values")
    assert "1..7" in finding.message


def test_large_int64_initializer_is_a_warning() -> None:
    table = helper.make_tensor("ids", TensorProto.INT64, [1 << 20], np.zeros(1 << 20, np.int64))
    nodes = [helper.make_node("Identity", ["x"], ["y"], name="id")]
    (finding,) = lint_model(_model(nodes, [table]))
    assert (finding.severity, finding.code, finding.where) == ("warning", "int64", "ids")


app = typer.Typer()
app.command()(lint_command)


def test_lint_command_exits_non_zero_on_errors_and_prints_json(tmp_path: Path) -> None:
    manifest = make_manifest("nvlm-x")
    bundle = write_bundle(tmp_path, manifest)
    ok = CliRunner().invoke(app, [str(bundle), "--target", "thor"])
    assert ok.exit_code == 0, ok.output
    assert "no TensorRT problems" in ok.stdout
    broken = interface_model(manifest.graphs["cross_kv"])
    broken.graph.node.append(helper.make_node("StringSplit", ["cross_embeds"], ["s"], name="ss"))
    onnx.save(broken, str(bundle / "cross_kv.onnx"))
    manifest.save(bundle)
    result = CliRunner().invoke(app, [str(bundle), "--json"])
    assert result.exit_code == 1
    (finding,) = json.loads(result.stdout)
    assert finding["graph"] == "cross_kv" and finding["code"] == "unsupported-op"


@pytest.mark.parametrize(("opset", "said"), [(8, "9+"), (21, "TensorRT 10.3 reads (9-20)")])
def test_opset_range_follows_the_targets_tensorrt(opset: int, said: str) -> None:
    model = _model([helper.make_node("Identity", ["x"], ["y"])], [], opset=opset)
    (finding,) = lint_model(model, target=resolve_target("orin"))
    assert finding.code == "opset" and finding.severity == "error" and said in finding.message


@pytest.mark.parametrize(
    ("target", "severity", "fix"),
    [
        (None, "warning", "Build the engines with TensorRT 10.15 or newer"),
        ("h100", "warning", "Build the engines with TensorRT 10.15 or newer"),
        ("thor", "error", "Quantize to one of fp32, fp16, int8, fp8 for it"),
    ],
)
def test_a_newer_opset_names_the_first_tensorrt_that_reads_it(
    target: str | None, severity: str, fix: str
) -> None:
    """Where the user picks TensorRT (data-center GPUs, no target), opset 21 (INT4) is not an
    error: the finding names the first version that reads it; `engine` checks the installed one.
    A Jetson's TensorRT is its JetPack's: there it is an error naming what the target takes."""
    model = _model([helper.make_node("Identity", ["x"], ["y"])], [], opset=21)
    (finding,) = lint_model(model, target=resolve_target(target) if target else None)
    assert finding.severity == severity and finding.fix == fix
    (newest,) = lint_model(_model([helper.make_node("Identity", ["x"], ["y"])], [], opset=26))
    assert newest.severity == "error"
