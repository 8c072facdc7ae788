"""Quantized bundles: the Q/DQ pattern TensorRT builds, ORT runs them, accuracy within budget."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from helpers import quiet
from helpers.quantized import Graph, check_profile, check_qdq, fast
from helpers.tiny import TinyBundle
from onnx import TensorProto, numpy_helper
from typer.testing import CliRunner

from nvlm_export.calibration import CalibrationOptions, collect_calibration
from nvlm_export.cli import app as cli_app
from nvlm_export.errors import InputError, ValidationError
from nvlm_export.export.accuracy import Thresholds
from nvlm_export.export.lint import lint_model
from nvlm_export.export.qdq import quantize_static_graph
from nvlm_export.export.quantize import (
    ACCURACY_FILE,
    COMPONENT_PRECISIONS,
    QuantizeSettings,
    quantize_bundle,
)
from nvlm_export.runtime.manifest import DECODER_GRAPH, VISION_GRAPH, load_manifest
from nvlm_export.runtime.pipeline import Pipeline

LAYOUTS = ("nvlm-d", "internvl", "nvlm-x")  # nvlm-h: same graphs as nvlm-x
PRECISIONS = ("int8", "fp8", "int4")


@pytest.fixture(scope="module")
def sources(
    tiny_bundle: TinyBundle, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], tuple[Path, Path]]:
    cache: dict[str, tuple[Path, Path]] = {}

    def get(layout: str) -> tuple[Path, Path]:
        if layout not in cache:
            _, bundle = tiny_bundle(layout)
            calib = tmp_path_factory.mktemp(f"calib-{layout}") / "calib"
            options = CalibrationOptions(max_samples=2, decode_steps=2)
            collect_calibration(bundle, calib, options, warn=quiet, progress=False)
            cache[layout] = (bundle, calib)
        return cache[layout]

    return get


@pytest.fixture(scope="module")
def quantized(
    sources: Callable[[str], tuple[Path, Path]], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str, str], Path]:
    cache: dict[tuple[str, str], Path] = {}

    def get(layout: str, precision: str) -> Path:
        if (layout, precision) not in cache:
            bundle, calib = sources(layout)
            out = tmp_path_factory.mktemp(f"{layout}-{precision}") / "bundle"
            quantize_bundle(
                bundle, out, fast(precision), calib if precision != "int4" else None, quiet=True
            )
            cache[layout, precision] = out
        return cache[layout, precision]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_quantized_bundle_runs_and_has_the_tensorrt_qdq_pattern(
    quantized: Callable[[str, str], Path], layout: str, precision: str
) -> None:
    out = quantized(layout, precision)
    manifest = load_manifest(out)
    assert manifest.precision == precision and manifest.engines == {}
    expected = {n for n in manifest.graphs if precision in COMPONENT_PRECISIONS[n]}
    assert DECODER_GRAPH in expected and (VISION_GRAPH in expected) == (precision != "int4")
    assert {n for n, g in manifest.graphs.items() if g.quantization} == expected
    for name, spec in manifest.graphs.items():
        graph = Graph(out / spec.file)
        if spec.quantization is None:
            assert not graph.qdq(), f"{name} is not quantized but has Q/DQ"
            continue
        record = spec.quantization
        assert record["library"].startswith("onnxruntime.quantization")
        check_qdq(graph, precision, record)
        findings = lint_model(graph.model, graph=name, base_dir=out / spec.file)
        assert not [f for f in findings if f.code.startswith("qdq") or f.code == "dtype"]
    record = manifest.graph(DECODER_GRAPH).quantization
    assert record is not None
    head_quantized = precision == "int4"  # the default per precision (QUANTIZE_LM_HEAD_BY_DEFAULT)
    assert record["lm_head"]["module"] == "lm_head"
    assert record["lm_head"]["quantized"] is head_quantized
    excluded = [n["module"] for n in record["excluded_nodes"]]
    assert excluded == ([] if head_quantized else ["lm_head"])
    # ONNX Runtime runs the quantized bundle through the normal pipeline.
    pipe = Pipeline.load(out)
    image = np.full((400, 500, 3), 128, dtype=np.uint8)
    result = pipe.generate("What is this?", [image], max_new_tokens=3).run()
    assert 1 <= len(result.token_ids) <= 3
    accuracy = json.loads((out / ACCURACY_FILE).read_text())
    assert accuracy["passed"], accuracy["failures"]
    assert accuracy["decoder"]["positions"] >= 1


def test_exclude_keeps_matching_nodes_in_float(
    sources: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    bundle, _ = sources("nvlm-d")
    settings = fast("int4", exclude=("*mlp.down_proj",), quantize_lm_head=False)
    quantize_bundle(bundle, tmp_path / "q", settings, None, quiet=True)
    spec = load_manifest(tmp_path / "q").graph(DECODER_GRAPH)
    modules = [n["module"] for n in spec.quantization["excluded_nodes"]]  # type: ignore[index]
    assert sorted(modules) == ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj", "lm_head"]
    graph = Graph(tmp_path / "q" / spec.file)
    excluded = {n["node"] for n in spec.quantization["excluded_nodes"]}  # type: ignore[index]
    for node in graph.nodes:
        if node.name in excluded:
            assert not graph.dequantized_inputs(node)


def test_int4_vision_is_an_unsupported_component(
    sources: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    bundle, _ = sources("nvlm-d")
    with pytest.raises(InputError, match="Unsupported precision for a component"):
        quantize_bundle(bundle, tmp_path / "q", fast("int4", components=("vision",)), None)
    assert not (tmp_path / "q").exists()


def test_cli_reports_unsupported_component(
    sources: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    import typer

    from nvlm_export.commands.quantize import quantize

    app = typer.Typer()
    app.command()(quantize)
    app.command("other")(lambda: None)  # two commands: Typer keeps `quantize` as a subcommand
    bundle, _ = sources("nvlm-d")
    args = [
        "quantize",
        str(bundle),
        "-p",
        "int4",
        "--components",
        "vision",
        "-o",
        str(tmp_path / "q"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert isinstance(result.exception, InputError)


def test_accuracy_outside_budget_leaves_no_bundle_unless_forced(
    sources: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    bundle, _ = sources("nvlm-d")
    impossible = Thresholds(min_cosine=0.0, min_top1=1.01, max_kl=1.0)
    with pytest.raises(ValidationError, match="top-1 agreement"):
        quantize_bundle(
            bundle, tmp_path / "q", fast("int4", thresholds=impossible), None, quiet=True
        )
    assert not (tmp_path / "q").exists() and not list(tmp_path.iterdir())
    forced = fast("int4", thresholds=impossible, force=True)
    quantize_bundle(bundle, tmp_path / "q", forced, None, quiet=True, warn=quiet)
    report = json.loads((tmp_path / "q" / ACCURACY_FILE).read_text())
    assert report["passed"] is False and report["failures"]
    with pytest.raises(InputError, match="already exists"):
        quantize_bundle(bundle, tmp_path / "q", forced, None, quiet=True)


def test_a_quantized_vision_graph_outside_the_cosine_budget_is_refused(
    sources: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    bundle, calib = sources("nvlm-d")
    impossible = Thresholds(min_cosine=1.01, min_top1=0.0, max_kl=100.0)
    settings = fast("int8", components=(VISION_GRAPH,), thresholds=impossible)
    with pytest.raises(ValidationError, match=r"vision\.image_features cosine"):
        quantize_bundle(bundle, tmp_path / "q", settings, calib, quiet=True)
    assert not (tmp_path / "q").exists()


def test_a_shared_runner_must_match_the_backend_and_the_graph(
    sources: Callable[[str], tuple[Path, Path]],
) -> None:
    bundle, _ = sources("nvlm-d")
    reference = Pipeline.load(bundle)
    shared = Pipeline.load(bundle, shared_runners={VISION_GRAPH: reference.runners[VISION_GRAPH]})
    assert shared.runners[VISION_GRAPH] is reference.runners[VISION_GRAPH]
    with pytest.raises(InputError, match="another interface"):
        Pipeline.load(bundle, shared_runners={VISION_GRAPH: reference.runners[DECODER_GRAPH]})


def test_int8_needs_a_calibration_set(
    sources: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    bundle, _ = sources("nvlm-d")
    with pytest.raises(InputError, match="needs a calibration set"):
        quantize_bundle(bundle, tmp_path / "q", fast("int8"), None)


# --- the LM head --------------------------------------------------------------------------------


def lm_head_weight_dq(graph: Graph, node_name: str) -> onnx.NodeProto | None:
    node = next(n for n in graph.nodes if n.name == node_name)
    weight = graph.producer.get(node.input[1])
    return weight if weight is not None and weight.op_type == "DequantizeLinear" else None


def test_quantize_lm_head_puts_per_channel_int8_qdq_on_the_head(
    sources: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    bundle, calib = sources("nvlm-d")
    settings = fast("int8", quantize_lm_head=True)
    quantize_bundle(bundle, tmp_path / "q", settings, calib, quiet=True)
    spec = load_manifest(tmp_path / "q").graph(DECODER_GRAPH)
    record = spec.quantization
    assert record is not None and record["lm_head"]["quantized"] is True
    assert record["excluded_nodes"] == []
    graph = Graph(tmp_path / "q" / spec.file)
    dq = lm_head_weight_dq(graph, record["lm_head"]["node"])
    assert dq is not None, "the LM head's weight is not quantized"
    weight = graph.inits[dq.input[0]]
    assert weight.data_type == TensorProto.INT8
    assert numpy_helper.to_array(graph.inits[dq.input[1]]).size > 1  # per output channel
    accuracy = json.loads((tmp_path / "q" / ACCURACY_FILE).read_text())
    assert accuracy["passed"], accuracy["failures"]


def test_keep_lm_head_leaves_the_int4_head_in_float(
    sources: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    bundle, _ = sources("nvlm-d")
    quantize_bundle(bundle, tmp_path / "q", fast("int4", quantize_lm_head=False), None, quiet=True)
    spec = load_manifest(tmp_path / "q").graph(DECODER_GRAPH)
    record = spec.quantization
    assert record is not None and record["lm_head"]["quantized"] is False
    graph = Graph(tmp_path / "q" / spec.file)
    assert lm_head_weight_dq(graph, record["lm_head"]["node"]) is None


def test_lm_head_is_found_by_what_computes_the_logits_not_by_its_name(
    sources: Callable[[str], tuple[Path, Path]],
) -> None:
    """A re-saved graph without the exporter's module names, a renamed node, and a bias and a
    reshape between the head and the output: the head is still the GEMM behind `logits`."""
    from onnx import helper

    from nvlm_export.export.qdq import output_projection

    bundle, _ = sources("nvlm-d")
    model = onnx.load(str(bundle / load_manifest(bundle).graph(DECODER_GRAPH).file))
    producer = {o: n for n in model.graph.node for o in n.output}
    head = producer["logits"]
    assert output_projection(model, "logits").name == head.name  # type: ignore[union-attr]
    for node in model.graph.node:
        del node.metadata_props[:]
    head.name = "renamed_projection"
    head.output[0] = "head_out"
    vocab = next(t for t in model.graph.initializer if t.name == head.input[1]).dims[0]
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(vocab, np.float32), "b"))
    model.graph.node.extend(
        [
            helper.make_node("Add", ["head_out", "b"], ["biased"], name="bias"),
            helper.make_node("Identity", ["biased"], ["logits"], name="same"),
        ]
    )
    found = output_projection(model, "logits")
    assert found is not None and found.name == "renamed_projection" and found.module == ""
    assert output_projection(model, "present.0.key") is None


def test_int4_gemm_becomes_a_matmul_on_dequantized_weights_that_computes_the_same(
    tmp_path: Path,
) -> None:
    """The exporter writes a linear layer on a 2-D input (the lm_head) as Gemm(x, W, b, transB=1);
    INT4 rewrites it as DequantizeLinear -> MatMul (+ Add for the bias), keeping its name."""
    import onnxruntime as ort
    from onnx import helper

    from nvlm_export.export.qdq import quantize_int4_graph

    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(5, 32)).astype(np.float32), rng.normal(size=5).astype(np.float32)
    gemm = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="head", transB=1)
    graph = helper.make_graph(
        [gemm],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "g")
    quantize_int4_graph(tmp_path / "g", tmp_path / "q", exclude=(), block_size=16, external=False)
    model = onnx.load(tmp_path / "q")
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "MatMul", "Add"]
    assert model.graph.node[1].name == "head"  # exclusion patterns and manifests still match
    assert {t.name for t in model.graph.initializer} >= {"b"} and "w" not in {
        t.name for t in model.graph.initializer
    }
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    dq = model.graph.node[0]
    quantized, scales = inits[dq.input[0]].astype(np.float32), inits[dq.input[1]]
    assert quantized.shape == (32, 5) and scales.shape == (2, 5)  # [K, N], one scale per block
    w_kn = quantized * np.repeat(scales, 16, axis=0)
    assert np.abs(w_kn - w.T).max() <= np.abs(w).max() / 7  # INT4: 16 levels per block
    x = rng.normal(size=(2, 32)).astype(np.float32)
    plain = ort.SessionOptions()  # DequantizeLinear then MatMul as written, no fused kernel
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    run = ort.InferenceSession(str(tmp_path / "q"), plain).run(None, {"x": x})[0]
    np.testing.assert_allclose(run, x @ w_kn + b, rtol=1e-5, atol=1e-5)
    kept = tmp_path / "kept"
    quantize_int4_graph(tmp_path / "g", kept, exclude=("head",), block_size=16, external=False)
    assert [n.op_type for n in onnx.load(kept).graph.node] == ["Gemm"]


def test_a_sink_holds_no_written_tensor_data_so_memory_stays_flat_in_depth(tmp_path: Path) -> None:
    """Quantizing writes every weight through one TensorSink: what it keeps per tensor must not
    grow with the tensor (a protobuf header copied with its data keeps that data allocated)."""
    from nvlm_export.export.tensor_files import TensorSink

    def resident_mib() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20

    before = resident_mib()
    with TensorSink(tmp_path / "g.onnx", external=True) as sink:
        for index in range(16):  # 256 MiB written
            sink.add_array(np.full(4 << 20, index, np.float32), f"w{index}")
        grown = resident_mib() - before
    assert grown < 64, f"{grown:.0f} MiB kept after writing 256 MiB"
    assert (tmp_path / "g.onnx.data").stat().st_size == 16 * (16 << 20)


def test_int4_weights_read_in_row_blocks_quantize_to_the_same_bytes_as_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A vocabulary-sized LM head is read and quantized a block of rows at a time (so it never
    sits in memory whole); the INT4 values and scales are the ones the whole tensor gets, for a
    stored [N, K] head (Gemm transB) and a [K, N] MatMul weight, both with an odd N (pieces of
    the head then share bytes of the packed tensor)."""
    from onnx import helper

    from nvlm_export.export import qdq

    rng = np.random.default_rng(0)
    head, mlp = rng.normal(size=(71, 64)), rng.normal(size=(64, 33))
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "mlp"], ["h"], name="mlp"),
            helper.make_node("Gemm", ["h2", "head"], ["y"], name="head", transB=1),
        ],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 64]) for n in ("x", "h2")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("h", "y")],
        [
            numpy_helper.from_array(w.astype(np.float32), n)
            for n, w in (("head", head), ("mlp", mlp))
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, tmp_path / "g.onnx", save_as_external_data=True, size_threshold=0)

    def quantized(read_bytes: int) -> dict[str, bytes]:
        monkeypatch.setattr(qdq, "INT4_READ_BYTES", read_bytes)
        out = tmp_path / f"q{read_bytes}" / "g.onnx"
        qdq.quantize_int4_graph(tmp_path / "g.onnx", out, exclude=(), block_size=16, external=True)
        loaded = onnx.load(out)
        return {t.name: numpy_helper.to_array(t).tobytes() for t in loaded.graph.initializer}

    whole = quantized(1 << 30)
    assert quantized(4 * 64 * 6) == whole  # 6 head rows, 16 MLP rows (one K-block) at a time
    assert {"head_kn_DQ_Q4", "mlp_DQ_Q4_scales"} <= set(whole)


def test_excluding_every_node_is_an_error_not_a_fully_quantized_graph(
    sources: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    """ONNX Runtime reads an empty nodes_to_quantize as "all nodes"."""
    from nvlm_export.errors import ExportError

    bundle, calib = sources("nvlm-d")
    with pytest.raises(ExportError, match=r"all \d+ MatMul/Gemm/Conv nodes are excluded"):
        quantize_bundle(
            bundle, tmp_path / "q", fast("int8", exclude=("*",), components=("vision",)), calib
        )
    assert not (tmp_path / "q").exists()


def shared_input_graph() -> onnx.ModelProto:
    """x feeds a projector MatMul, a LayerNorm and a second MatMul (to be excluded): NVLM-H's
    pixel-shuffled features feeding the tile and the thumbnail projectors, in miniature."""
    from onnx import helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "w_tiles"),
        numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "w_other"),
        numpy_helper.from_array(np.ones(8, np.float32), "gamma"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w_tiles"], ["tiles"], name="tiles_proj"),
        helper.make_node("LayerNormalization", ["x", "gamma"], ["thumb"], name="thumb_norm"),
        helper.make_node("MatMul", ["x", "w_other"], ["other"], name="other_proj"),
        helper.make_node("Shape", ["x"], ["x_shape"], name="x_shape"),
    ]
    outputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("tiles", "thumb")
    ] + [
        helper.make_tensor_value_info("other", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("x_shape", TensorProto.INT64, None),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])
    graph = helper.make_graph(nodes, "shared", [x], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("precision", ("int8", "fp8"))
def test_a_tensor_with_one_quantized_reader_stays_float_for_its_other_readers(
    tmp_path: Path, precision: str
) -> None:
    import onnxruntime as ort

    source, output = tmp_path / "source.onnx", tmp_path / "q.onnx"
    onnx.save(shared_input_graph(), str(source))
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.normal(size=(2, 3, 8)).astype(np.float32)} for _ in range(4)]
    quantize_static_graph(source, output, iter(feeds), precision=precision, exclude=("other_proj",))
    graph = Graph(output)
    by_name = {n.name: n for n in graph.nodes}
    assert graph.dequantized_inputs(by_name["tiles_proj"])  # activation and weight
    for name in ("thumb_norm", "other_proj", "x_shape"):
        assert by_name[name].input[0] == "x", name
    record = {"quantized_nodes": 1, "excluded_nodes": [{"node": "other_proj"}]}
    check_qdq(graph, precision, record)
    # The float readers compute exactly what the source does.
    x = feeds[0]
    want = ort.InferenceSession(str(source)).run(["thumb", "other"], x)
    got = ort.InferenceSession(str(output)).run(["thumb", "other"], x)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("layout", ["nvlm-d", "nvlm-x"])
def test_profile_breaks_down_a_quantized_bundle(
    quantized: Callable[[str, str], Path], layout: str, precision: str
) -> None:
    """`nvlm-export profile` on quantized bundles of a decoder-only and a cross-attention model:
    every stage timed, and the totals consistent with their parts."""
    check_profile(quantized(layout, precision))


def test_an_unchanged_vision_graph_is_shared_and_run_once_per_request(
    sources: Callable[[str], tuple[Path, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INT4 leaves the vision graph as it is: the accuracy check must not load it twice nor run
    it for both bundles (it dominated quantize's time on the bench model), and says so."""
    from nvlm_export.runtime.backends.base import GraphRunner

    bundle, _ = sources("nvlm-d")  # made (and calibrated) before the vision graph is watched
    vision_tiles = []
    infer = GraphRunner.infer

    def counting(self: GraphRunner, feeds: Any) -> Any:
        if self.spec.name == VISION_GRAPH:
            vision_tiles.append(len(feeds["pixel_values"]))
        return infer(self, feeds)

    monkeypatch.setattr(GraphRunner, "infer", counting)
    settings = QuantizeSettings("int4", accuracy_requests=1, accuracy_steps=8)
    quantize_bundle(bundle, tmp_path / "q", settings, None, quiet=True)
    report = json.loads((tmp_path / "q" / ACCURACY_FILE).read_text())
    assert report["unchanged_graphs"] == [VISION_GRAPH]
    assert [o["graph"] for o in report["outputs"]] == []
    assert len(report["requests"]) == 1
    assert sum(vision_tiles) == report["tiling"][0]["tiles"]  # the reference's one encode


def test_cli_accuracy_requests_sets_how_many_requests_are_checked(
    sources: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    bundle, _ = sources("nvlm-d")
    args = ["quantize", str(bundle), "-p", "int4", "--accuracy-requests", "1", "-o"]
    result = CliRunner().invoke(cli_app, [*args, str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "q" / ACCURACY_FILE).read_text())["requests"]) == 1
    assert "not quantized" in result.output  # the vision row of the accuracy table


def test_no_accuracy_check_writes_a_working_bundle_with_a_warning_and_no_report(
    sources: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    """For a model that cannot be held twice: quantize alone, say the bundle is unchecked."""
    bundle, _ = sources("nvlm-d")
    args = ["quantize", str(bundle), "-p", "int4", "--no-accuracy-check", "-o"]
    result = CliRunner().invoke(cli_app, [*args, str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    assert "accuracy not checked" in " ".join(result.output.split())
    assert not (tmp_path / "q" / ACCURACY_FILE).exists()
    image = np.full((400, 500, 3), 128, dtype=np.uint8)
    tokens = Pipeline.load(tmp_path / "q").generate("Hi", [image], max_new_tokens=2).run()
    assert 1 <= len(tokens.token_ids) <= 2
