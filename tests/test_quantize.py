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
    PRECISION_PLAN,
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
            quantize_bundle(bundle, out, fast(precision), calib, quiet=True)
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
    # Every graph is quantized; an INT4 bundle's vision graph is INT8 (W8A8), not weight-only.
    assert {n: g.precision for n, g in manifest.graphs.items()} == {
        n: PRECISION_PLAN[precision][n] for n in manifest.graphs
    }
    assert manifest.graph(VISION_GRAPH).precision == ("int8" if precision == "int4" else precision)
    for name, spec in manifest.graphs.items():
        graph = Graph(out / spec.file)
        record = spec.quantization
        assert record is not None and record["library"].startswith("onnxruntime.quantization")
        assert ("calibration" in record) == (spec.precision != "int4")
        check_qdq(graph, spec.precision, record)
        findings = lint_model(graph.model, graph=name, base_dir=out / spec.file)
        assert not [f for f in findings if f.code.startswith("qdq") or f.code == "dtype"]
    record = manifest.graph(DECODER_GRAPH).quantization
    assert record is not None
    # --lm-head auto (the default): the quantized head is tried first and kept when the bundle is
    # within budget with it; otherwise the float head's figures are measured and reported too.
    accuracy = json.loads((out / ACCURACY_FILE).read_text())
    head = accuracy["lm_head"]
    assert record["lm_head"]["module"] == "lm_head" and record["lm_head"]["setting"] == "auto"
    assert record["lm_head"]["quantized"] is head["quantized"]
    assert head["measured"]["quantized"]["passed"] is head["quantized"]
    assert ("float" in head["measured"]) is (not head["quantized"])
    excluded = [n["module"] for n in record["excluded_nodes"]]
    assert excluded == ([] if head["quantized"] else ["lm_head"])
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
    settings = fast("int4", exclude=("*mlp.down_proj",), lm_head="float")
    quantize_bundle(bundle, tmp_path / "q", settings, None, quiet=True)
    spec = load_manifest(tmp_path / "q").graph(DECODER_GRAPH)
    modules = [n["module"] for n in spec.quantization["excluded_nodes"]]  # type: ignore[index]
    assert sorted(modules) == ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj", "lm_head"]
    graph = Graph(tmp_path / "q" / spec.file)
    excluded = {n["node"] for n in spec.quantization["excluded_nodes"]}  # type: ignore[index]
    for node in graph.nodes:
        if node.name in excluded:
            assert not graph.dequantized_inputs(node)


def test_int4_without_calibration_keeps_vision_in_float_and_says_so(
    sources: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    bundle, _ = sources("nvlm-d")
    warnings: list[str] = []
    quantize_bundle(bundle, tmp_path / "q", fast("int4"), None, quiet=True, warn=warnings.append)
    manifest = load_manifest(tmp_path / "q")
    assert manifest.graph(VISION_GRAPH).quantization is None
    assert manifest.graph(VISION_GRAPH).precision == "fp32"
    assert manifest.graph(DECODER_GRAPH).precision == "int4"
    assert not Graph(tmp_path / "q" / manifest.graph(VISION_GRAPH).file).qdq()
    [note] = [w for w in warnings if w.startswith("vision kept in fp32")]
    assert "--calib" in note and "--graphs vision" in note


def test_int4_vision_asked_for_by_name_needs_a_calibration_set(
    sources: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    bundle, _ = sources("nvlm-d")
    with pytest.raises(InputError, match=r"vision \(int8\) needs a calibration set"):
        quantize_bundle(bundle, tmp_path / "q", fast("int4", components=("vision",)), None)
    assert not (tmp_path / "q").exists()


def test_int4_vision_is_calibrated_from_a_vision_only_set(
    sources: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    """`calibrate --graphs vision` records vision samples only (the decoder is never run) and is
    enough for an INT4 bundle: INT8 vision, INT4 decoder; an INT8 bundle refuses the set."""
    bundle, _ = sources("nvlm-d")
    calib = tmp_path / "calib"
    options = CalibrationOptions(max_samples=2, graphs=(VISION_GRAPH,))
    info = collect_calibration(bundle, calib, options, warn=quiet, progress=False).info
    assert set(info.graphs) == {VISION_GRAPH} and info.requests == 2
    assert info.graphs[VISION_GRAPH].count == sum(t.tiles for t in info.tiling)  # a call per tile
    quantize_bundle(bundle, tmp_path / "q", fast("int4"), calib, quiet=True)
    manifest = load_manifest(tmp_path / "q")
    assert manifest.graph(VISION_GRAPH).precision == "int8"
    assert manifest.graph(DECODER_GRAPH).precision == "int4"
    with pytest.raises(InputError, match="no samples for the decoder graph"):
        quantize_bundle(bundle, tmp_path / "q8", fast("int8"), calib, quiet=True)


def test_cli_reports_a_component_that_needs_calibration(
    sources: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    import typer

    from nvlm_export.commands.quantize import quantize

    app = typer.Typer()
    app.command()(quantize)
    app.command("other")(lambda: None)  # two commands: Typer keeps `quantize` as a subcommand
    bundle, _ = sources("nvlm-d")
    args = ["quantize", str(bundle), "-p", "int4", "--components", "vision", "-o"]
    result = CliRunner().invoke(app, [*args, str(tmp_path / "q")])
    assert result.exit_code != 0
    assert isinstance(result.exception, InputError)
    assert "needs a calibration set" in str(result.exception)


def test_accuracy_outside_budget_leaves_no_bundle_unless_forced(
    sources: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    bundle, _ = sources("nvlm-d")
    impossible = Thresholds(min_cosine=0.0, min_top1=0.0, max_kl=0.0)  # INT4 always moves logits
    with pytest.raises(ValidationError, match="mean KL"):
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
    impossible = Thresholds(min_cosine=1.0, min_top1=0.0, max_kl=100.0)  # INT8 moves features
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


def test_auto_lm_head_falls_back_to_float_when_the_quantized_head_misses_the_budget(
    sources: Callable[[str], tuple[Path, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An accuracy check that fails whenever the head is quantized: auto quantizes the decoder
    again with the head in float (its activation ranges not recomputed), checks it against the
    source's answers kept from the first check (the source runs once), and reports both
    candidates' figures; the bundle's head is float."""
    from nvlm_export.export import qdq
    from nvlm_export.export import quantize as quantize_module

    real_accuracy, real_amax = quantize_module._accuracy, qdq.activation_amax
    real_reference = quantize_module.run_reference
    checked, ranged, references = [], [], []

    def accuracy(staging: Path, manifest: Any, reference: Any, *args: Any) -> Any:
        report = real_accuracy(staging, manifest, reference, *args)
        head = manifest.graph(DECODER_GRAPH).quantization["lm_head"]["quantized"]
        checked.append(head)
        references.append(reference)
        report.failures = ["quantized head: pretend KL too high"] if head else []
        return report

    def reference_run(*args: Any) -> Any:
        references.append("ran")
        return real_reference(*args)

    def amax(graph: Any, *args: Any) -> Any:
        ranged.append(Path(graph.path).name)
        return real_amax(graph, *args)

    monkeypatch.setattr(quantize_module, "_accuracy", accuracy)
    monkeypatch.setattr(quantize_module, "run_reference", reference_run)
    monkeypatch.setattr(qdq, "activation_amax", amax)
    bundle, calib = sources("nvlm-d")
    quantize_bundle(bundle, tmp_path / "q", fast("int8"), calib, quiet=True)
    assert checked == [True, False]
    ran, first, second = references
    assert ran == "ran" and first is second  # one reference run serves both candidates
    assert sorted(ranged) == ["decoder.onnx", "vision.onnx"]  # each graph's ranges run once
    spec = load_manifest(tmp_path / "q").graph(DECODER_GRAPH)
    assert spec.quantization["lm_head"]["quantized"] is False  # type: ignore[index]
    # What ONNX Runtime loads (the fused variant) was derived again from the float-head decoder.
    head = spec.quantization["lm_head"]["node"]  # type: ignore[index]
    for file in (spec.file, spec.variants["onnxruntime"].file):
        graph = Graph(tmp_path / "q" / file)
        assert not graph.dequantized_inputs(next(n for n in graph.nodes if n.name == head)), file
    graph = Graph(tmp_path / "q" / spec.file)
    assert lm_head_weight_dq(graph, spec.quantization["lm_head"]["node"]) is None  # type: ignore[index]
    report = json.loads((tmp_path / "q" / ACCURACY_FILE).read_text())
    assert report["passed"] and report["lm_head"]["quantized"] is False
    assert set(report["lm_head"]["measured"]) == {"quantized", "float"}
    assert report["lm_head"]["measured"]["quantized"]["passed"] is False
    assert report["lm_head"]["reason"].startswith("float (auto: with the quantized head")


def test_lm_head_without_an_accuracy_check_follows_the_precision_default(
    sources: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    bundle, _ = sources("nvlm-d")
    settings = fast("int4", check_accuracy=False)
    quantize_bundle(bundle, tmp_path / "q", settings, None, quiet=True, warn=quiet)
    record = load_manifest(tmp_path / "q").graph(DECODER_GRAPH).quantization
    assert record is not None and record["lm_head"]["quantized"] is True  # INT4's default
    assert not (tmp_path / "q" / ACCURACY_FILE).exists()
    assert fast("int8", check_accuracy=False).lm_head_quantized is False


def test_deprecated_lm_head_flags_map_onto_lm_head(
    sources: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    bundle, _ = sources("nvlm-d")
    out = tmp_path / "q"
    base = ["quantize", str(bundle), "-p", "int4", "--accuracy-requests", "1", "-o", str(out)]
    result = CliRunner().invoke(cli_app, [*base, "--keep-lm-head"])
    assert result.exit_code == 0, result.output
    assert "--keep-lm-head is deprecated; use --lm-head float" in result.stderr
    record = load_manifest(out).graph(DECODER_GRAPH).quantization
    assert record is not None and record["lm_head"]["quantized"] is False
    assert record["lm_head"]["setting"] == "float"
    result = CliRunner().invoke(
        cli_app, [*base, "--overwrite", "--keep-lm-head", "--lm-head", "quantized"]
    )
    assert result.exit_code == 2 and "contradicts --lm-head quantized" in result.stderr


def lm_head_weight_dq(graph: Graph, node_name: str) -> onnx.NodeProto | None:
    node = next(n for n in graph.nodes if n.name == node_name)
    weight = graph.producer.get(node.input[1])
    return weight if weight is not None and weight.op_type == "DequantizeLinear" else None


def test_quantize_lm_head_puts_per_channel_int8_qdq_on_the_head(
    sources: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    bundle, calib = sources("nvlm-d")
    settings = fast("int8", lm_head="quantized")
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
    quantize_bundle(bundle, tmp_path / "q", fast("int4", lm_head="float"), None, quiet=True)
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
    from nvlm_export.profiling.memory import current_rss_bytes
    from nvlm_export.runtime.backends.base import return_freed_memory

    def resident_mib() -> float:
        # glibc keeps freed 16 MiB blocks in its heap once its mmap threshold has grown (CI once
        # read 67 MiB here from that alone): trim first, so only memory still in use counts.
        return_freed_memory()
        return current_rss_bytes() / 2**20

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

    def counting(self: GraphRunner, feeds: Any, **options: Any) -> Any:
        if self.spec.name == VISION_GRAPH:
            vision_tiles.append(len(feeds["pixel_values"]))
        return infer(self, feeds, **options)

    monkeypatch.setattr(GraphRunner, "infer", counting)
    settings = QuantizeSettings("int4", accuracy_requests=1, accuracy_steps=8)
    quantize_bundle(bundle, tmp_path / "q", settings, None, quiet=True)
    report = json.loads((tmp_path / "q" / ACCURACY_FILE).read_text())
    assert report["unchanged_graphs"] == [VISION_GRAPH]
    assert [o["graph"] for o in report["outputs"]] == []
    assert len(report["requests"]) == 1
    assert sum(vision_tiles) == report["tiling"][0]["tiles"]  # the reference's one encode


def test_the_accuracy_check_holds_one_bundle_at_a_time(
    sources: Callable[[str], tuple[Path, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source bundle answers every request and is unloaded before the quantized one is
    loaded: a model that fits in memory once can be checked."""
    from nvlm_export.runtime.backends.base import GraphRunner

    bundle, calib = sources("nvlm-d")
    resident: dict[int, Path] = {}
    together: list[set[Path]] = []
    activate, deactivate = GraphRunner.activate, GraphRunner.deactivate

    def tracked_activate(self: GraphRunner) -> GraphRunner:
        runner = activate(self)
        resident[id(self)] = self.spec.path.parent
        together.append(set(resident.values()))
        return runner

    def tracked_deactivate(self: GraphRunner) -> None:
        resident.pop(id(self), None)
        deactivate(self)

    monkeypatch.setattr(GraphRunner, "activate", tracked_activate)
    monkeypatch.setattr(GraphRunner, "deactivate", tracked_deactivate)
    quantize_bundle(bundle, tmp_path / "q", fast("int8", force=True), calib, quiet=True)
    assert len({path for paths in together for path in paths}) == 2  # both bundles ran
    assert max(len(paths) for paths in together) == 1
    assert not resident  # and both were unloaded


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


def test_the_accuracy_check_decodes_a_long_prompt_in_the_runtime_s_chunks(
    tiny_bundle: TinyBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check runs each bundle as the runtime does: its prefill in the pipeline's chunks, which
    bound the memory of the check as they bound the runtime's (docs/memory.md), with the answer
    an unchunked prefill gives."""
    from PIL import Image

    from nvlm_export.export.accuracy import decode

    _, bundle = tiny_bundle("internvl")
    pixels = (np.random.default_rng(5).random((120, 200, 3)) * 255).astype(np.uint8)
    image, question = Image.fromarray(pixels), "What is in the picture?"
    chunked = Pipeline.load(bundle, prefill_chunk_tokens=8)
    prepared = chunked.prepare(question, [image])
    runner = chunked.runners[DECODER_GRAPH]
    calls: list[int] = []

    def infer(feeds: dict[str, np.ndarray], **options: Any) -> dict[str, np.ndarray]:
        calls.append(feeds["inputs_embeds"].shape[1])
        return type(runner).infer(runner, feeds, **options)

    monkeypatch.setattr(runner, "infer", infer)
    tokens, logits = decode(chunked, prepared, 3)
    assert max(calls) <= 8 < prepared.prompt.num_tokens
    whole = Pipeline.load(bundle, prefill_chunk_tokens=None)
    expected_tokens, expected_logits = decode(whole, whole.prepare(question, [image]), 3)
    assert tokens == expected_tokens
    np.testing.assert_allclose(logits, expected_logits, atol=1e-4)
