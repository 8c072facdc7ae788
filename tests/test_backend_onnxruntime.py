"""The ONNX Runtime runner on tiny graphs built here with onnx.helper."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, pre_tokenizers

from nvlm_export.errors import BundleError, InputError
from nvlm_export.profiling.memory import current_rss_bytes
from nvlm_export.runtime.backends import (
    GraphSpec,
    TensorSpec,
    available_backends,
    base,
    get_backend,
)
from nvlm_export.runtime.backends import onnxruntime as ort_runner
from nvlm_export.runtime.backends.onnxruntime import OnnxRuntimeRunner
from nvlm_export.runtime.generation import GenerateOptions, KVCache, generate, prefill
from nvlm_export.runtime.manifest import GraphSpec as ManifestGraph

WEIGHT = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
BIAS = np.array([1.0, -1.0, 0.5, 0.0], dtype=np.float32)


def save_affine_graph(path: Path, *, external_data: bool = False) -> Path:
    """y = x @ WEIGHT + BIAS with x float32 [batch, 3]."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "weight"], ["xw"]),
            helper.make_node("Add", ["xw", "bias"], ["y"]),
        ],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(WEIGHT, "weight"), numpy_helper.from_array(BIAS, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(
        model,
        str(path),
        save_as_external_data=external_data,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
        size_threshold=0,
    )
    return path


def affine_spec(path: Path, *, input_name: str = "x", dtype: str = "float32") -> GraphSpec:
    return GraphSpec(
        name="affine",
        path=path,
        inputs=(TensorSpec(input_name, dtype, ("batch", 3)),),
        outputs=(TensorSpec("y", "float32", ("batch", 4)),),
    )


@pytest.fixture
def affine(tmp_path: Path) -> Path:
    return save_affine_graph(tmp_path / "affine.onnx")


def test_runner_computes_the_graph_and_times_each_call(affine: Path) -> None:
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    with OnnxRuntimeRunner(affine_spec(affine), intra_op_threads=1) as runner:
        for _ in range(3):
            outputs = runner.infer({"x": x})
        assert runner.providers == ["CPUExecutionProvider"]
    np.testing.assert_allclose(outputs["y"], x @ WEIGHT + BIAS, rtol=1e-6)
    assert runner.calls == 3 and runner.total_seconds > 0
    assert not runner.is_active


def test_external_data_models_load(tmp_path: Path) -> None:
    path = save_affine_graph(tmp_path / "affine.onnx", external_data=True)
    assert (tmp_path / "affine.onnx.data").is_file()
    runner = get_backend("onnxruntime")(affine_spec(path))
    outputs = runner.infer({"x": np.ones((1, 3), np.float32)})  # activates on first use
    np.testing.assert_allclose(outputs["y"][0], WEIGHT.sum(axis=0) + BIAS, rtol=1e-6)


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({"x": np.ones((1, 3), np.float64)}, "Input 'x' of graph 'affine' has dtype float64"),
        ({"x": np.ones(3, np.float32)}, "Input 'x' of graph 'affine' has rank 1"),
        ({"x": np.ones((1, 5), np.float32)}, "has size 5 on axis 1.*expects shape \\[batch, 3\\]"),
        ({}, "got the wrong set of inputs: missing \\['x'\\]"),
        (
            {"x": np.ones((1, 3), np.float32), "z": np.ones(1)},
            "wrong set of inputs: unexpected \\['z'\\]",
        ),
        ({"x": [[1.0, 2.0, 3.0]]}, "Input 'x' of graph 'affine' is a list"),
    ],
)
def test_feeds_are_checked_against_the_spec(
    affine: Path, feeds: dict[str, np.ndarray], message: str
) -> None:
    with OnnxRuntimeRunner(affine_spec(affine)) as runner, pytest.raises(InputError, match=message):
        runner.infer(feeds)


def test_a_corrupt_graph_file_is_one_bundle_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "decoder.onnx"
    path.write_bytes(b"\x08\x07 this is not a protobuf \xff\xfe" * 10)
    with pytest.raises(BundleError) as caught:
        OnnxRuntimeRunner(affine_spec(path)).activate()
    message = str(caught.value)
    assert f"cannot load the affine graph {path}" in message
    assert "\n" not in message and "re-export" in message


def test_a_missing_graph_file_is_a_bundle_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        OnnxRuntimeRunner(affine_spec(tmp_path / "vision.onnx")).activate()


def test_a_graph_that_disagrees_with_its_spec_fails_at_load(affine: Path) -> None:
    with pytest.raises(BundleError, match=r"has no input 'pixel_values'.*inputs are \['x'\]"):
        OnnxRuntimeRunner(affine_spec(affine, input_name="pixel_values")).activate()
    with pytest.raises(BundleError, match=r"input 'x' is float32 of rank 2.*declares float16"):
        OnnxRuntimeRunner(affine_spec(affine, dtype="float16")).activate()


def test_unavailable_providers_fall_back_to_cpu(
    affine: Path, caplog: pytest.LogCaptureFixture
) -> None:
    providers = ["NoSuchExecutionProvider", "CPUExecutionProvider"]
    with (
        caplog.at_level(logging.WARNING),
        OnnxRuntimeRunner(affine_spec(affine), providers=providers) as runner,
    ):
        assert runner.providers == ["CPUExecutionProvider"]
    assert "NoSuchExecutionProvider is not available" in caplog.text


def test_the_optimised_model_is_cached_to_the_given_path(affine: Path, tmp_path: Path) -> None:
    cached = tmp_path / "affine.opt.onnx"
    OnnxRuntimeRunner(affine_spec(affine), optimized_model_path=cached).activate()
    assert cached.is_file()
    reloaded = OnnxRuntimeRunner(affine_spec(cached), optimization_level="disable")
    x = np.ones((1, 3), np.float32)
    np.testing.assert_allclose(reloaded.infer({"x": x})["y"], x @ WEIGHT + BIAS, rtol=1e-6)


def test_bad_runner_options_and_backend_names_are_input_errors(affine: Path) -> None:
    with pytest.raises(InputError, match="Unknown graph optimisation level 'max'"):
        OnnxRuntimeRunner(affine_spec(affine), optimization_level="max")
    with pytest.raises(InputError, match=r"Unknown backend 'tensorflow'.*onnxruntime"):
        get_backend("tensorflow")
    assert get_backend("onnxruntime") is OnnxRuntimeRunner
    assert "onnxruntime" in available_backends()


def test_a_manifest_graph_entry_resolves_inside_the_bundle(affine: Path) -> None:
    entry = ManifestGraph(
        file="affine.onnx",
        inputs=(TensorSpec("x", "float32", ("batch", 3)),),
        outputs=(TensorSpec("y", "float32", ("batch", 4)),),
    )
    spec = GraphSpec.from_manifest("affine", entry, affine.parent)
    assert spec == replace(affine_spec(affine), precision="fp32")  # what the manifest says
    outputs = OnnxRuntimeRunner(spec).infer({"x": np.zeros((1, 3), np.float32)})
    np.testing.assert_allclose(outputs["y"][0], BIAS)


# -- a toy decoder that follows the real decoder contract, run through generate() -------------
VOCAB, LAYERS = 6, 2


def save_toy_decoder(path: Path) -> GraphSpec:
    """Predicts token (t + 1) mod VOCAB after token t; caches the embeddings as keys and values.

    Embeddings are one-hot (D = VOCAB); logits = last embedding @ shift matrix.
    """
    shift = np.roll(np.eye(VOCAB, dtype=np.float32), 1, axis=1)  # row t has its 1 at t + 1
    nodes = [
        helper.make_node("Unsqueeze", ["inputs_embeds", "axis1"], ["kv_new"]),  # (1, 1, S, D)
        helper.make_node("Gather", ["inputs_embeds", "last"], ["last_embed"], axis=1),  # (1, D)
        helper.make_node("MatMul", ["last_embed", "shift"], ["logits"]),  # (1, V)
    ]
    inputs = [
        helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, [1, "seq", VOCAB]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "seq"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, VOCAB])]
    for i in range(LAYERS):
        for kind in ("key", "value"):
            past, present = f"past_key_values.{i}.{kind}", f"present.{i}.{kind}"
            nodes.append(helper.make_node("Concat", [past, "kv_new"], [present], axis=2))
            shape = [1, 1, "past", VOCAB]
            inputs.append(helper.make_tensor_value_info(past, TensorProto.FLOAT, shape))
            outputs.append(helper.make_tensor_value_info(present, TensorProto.FLOAT, None))
    constants = [
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array(-1, np.int64), "last"),
        numpy_helper.from_array(shift, "shift"),
    ]
    graph = helper.make_graph(nodes, "toy_decoder", inputs, outputs, constants)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        dims = value.type.tensor_type.shape.dim
        shape = tuple(d.dim_param or d.dim_value for d in dims) or (1, 1, "total", VOCAB)
        dtype = "int64" if value.name == "position_ids" else "float32"
        return TensorSpec(value.name, dtype, shape)

    return GraphSpec("decoder", path, tuple(map(spec, inputs)), tuple(map(spec, graph.output)))


def test_generate_drives_an_onnx_decoder_one_token_per_step(tmp_path: Path) -> None:
    words = [f"w{i}" for i in range(VOCAB)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    table = np.eye(VOCAB, dtype=np.float32)
    cache = KVCache.empty(LAYERS, 1, VOCAB, capacity=32)
    with OnnxRuntimeRunner(save_toy_decoder(tmp_path / "decoder.onnx")) as decoder:
        prompt = [4, 2]
        first_logits = prefill(decoder.infer, table[np.array([prompt])], cache)
        stream = generate(
            decoder.infer,
            first_logits,
            cache=cache,
            embed=table.__getitem__,
            tokenizer=tokenizer,
            options=GenerateOptions(max_new_tokens=5),
            eos_token_ids=(0,),
            prompt_ids=prompt,
        )
        result = stream.run()
    assert result.token_ids == (3, 4, 5, 0)
    assert result.finish_reason == "eos"
    assert result.text == " w3 w4 w5"  # WordLevel joins with spaces; the prompt gives context
    assert decoder.calls == 1 + 3  # the prefill, then one step per token after the first
    assert cache.length == len(prompt) + 3
    np.testing.assert_array_equal(cache.keys[1][0, 0].argmax(axis=-1), [4, 2, 3, 4, 5])


def save_two_int8_matmuls_on_one_input(path: Path) -> Path:
    """x -> two MatMuls with int8 per-channel weights, each with its own (identical) activation
    Q/DQ pair: the form nvlm-export quantize writes for q/k/v and gate/up projections."""
    rng = np.random.default_rng(0)
    nodes, initializers = (
        [],
        [
            numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
            numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
        ],
    )
    for i in range(2):
        initializers += [
            numpy_helper.from_array(rng.integers(-127, 128, (8, 4)).astype(np.int8), f"w{i}"),
            numpy_helper.from_array(np.full(4, 0.01, np.float32), f"w{i}_scale"),
            numpy_helper.from_array(np.zeros(4, np.int8), f"w{i}_zero"),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], [f"xq{i}"]),
            helper.make_node("DequantizeLinear", [f"xq{i}", "x_scale", "x_zero"], [f"xd{i}"]),
            helper.make_node(
                "DequantizeLinear", [f"w{i}", f"w{i}_scale", f"w{i}_zero"], [f"wd{i}"], axis=1
            ),
            helper.make_node("MatMul", [f"xd{i}", f"wd{i}"], [f"y{i}"]),
        ]
    graph = helper.make_graph(
        nodes,
        "two_int8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["batch", 4]) for i in (0, 1)],
        initializers,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


@pytest.mark.parametrize(
    ("flags", "exact"),
    [
        ({"avx2", "fma"}, True),  # AVX2 only: 16-bit pair sums
        ({"avx2", "avx512f", "avx512bw"}, True),  # AVX-512 without VNNI: the same
        ({"avx2", "avx512f", "avx512_vnni"}, False),  # VNNI adds in 32 bits
        ({"avx2", "avx_vnni"}, False),
        ({"avx2", "amx_int8", "avx512_vnni"}, False),
        (set(), False),  # not x86 (an Arm CPU's /proc/cpuinfo has no "flags" line)
    ],
)
def test_exact_int8_kernels_only_where_the_fast_ones_saturate(
    monkeypatch: pytest.MonkeyPatch, flags: set[str], exact: bool
) -> None:
    monkeypatch.setattr(ort_runner, "cpu_flags", lambda: frozenset(flags))
    assert ort_runner.needs_exact_int8() is exact


@pytest.mark.parametrize(
    ("precision", "exact"), [("int8", True), (None, True), ("int4", False), ("fp32", False)]
)
def test_only_graphs_with_int8_gemms_take_the_exact_kernels(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, precision: str | None, exact: bool
) -> None:
    """On a CPU whose fast int8 kernels saturate, an INT8 graph (or one whose precision the
    manifest does not say) runs the exact ones; an INT4 decoder (4-bit weights cannot overflow
    a 16-bit pair sum, and the setting slowed it by 4-8 %) and an fp32 graph do not."""
    monkeypatch.setattr(ort_runner, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    spec = replace(two_int8_matmuls_spec(tmp_path / "g.onnx"), precision=precision)
    assert OnnxRuntimeRunner(spec).exact_int8 is exact
    assert OnnxRuntimeRunner(spec, exact_int8=not exact).exact_int8 is not exact  # forced


def two_int8_matmuls_spec(path: Path) -> GraphSpec:
    return GraphSpec(
        "int8",
        path,
        (TensorSpec("x", "float32", ("batch", 8)),),
        tuple(TensorSpec(f"y{i}", "float32", ("batch", 4)) for i in (0, 1)),
    )


def test_int8_qdq_matmuls_sharing_an_input_run_as_integer_kernels(tmp_path: Path) -> None:
    """ORT's common-subexpression elimination would merge the identical Q/DQ pairs and its
    integer MatMul fusion would then skip both MatMuls (float MatMuls on weights dequantized
    every call); the runner turns CSE off so both become MatMulIntegerToFloat."""
    path = save_two_int8_matmuls_on_one_input(tmp_path / "int8.onnx")
    spec = two_int8_matmuls_spec(path)
    optimized = tmp_path / "int8.opt.onnx"
    with OnnxRuntimeRunner(spec, optimized_model_path=optimized) as runner:
        x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)
        outputs = runner.infer({"x": x})
    ops = [node.op_type for node in onnx.load(str(optimized)).graph.node]
    assert ops.count("MatMulIntegerToFloat") == 2
    assert "MatMul" not in ops and "DequantizeLinear" not in ops
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    x_q = np.clip(np.round(x / 0.02), -128, 127) * 0.02
    for i in (0, 1):
        np.testing.assert_allclose(outputs[f"y{i}"], x_q @ (weights[f"w{i}"] * 0.01), atol=1e-5)


def test_int8_matmuls_are_exact_where_16_bit_pair_sums_would_saturate(tmp_path: Path) -> None:
    """Activations at the top of their range times large weights: on x86 CPUs without VNNI, ONNX
    Runtime's fast u8·s8 kernels add products in pairs in saturating 16-bit lanes (255·127·2 >
    32767) and return wrong sums; the runner asks for its exact kernels there by default."""
    path = save_two_int8_matmuls_on_one_input(tmp_path / "int8.onnx")
    spec = two_int8_matmuls_spec(path)
    x = np.full((2, 8), 127 * 0.02, np.float32)  # quantizes to 127: the top of the range
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    with OnnxRuntimeRunner(spec) as runner:
        outputs = runner.infer({"x": x})
    for i in (0, 1):
        exact = (127 * 0.02) * (weights[f"w{i}"].astype(np.float64) * 0.01).sum(axis=0)
        np.testing.assert_allclose(outputs[f"y{i}"], np.broadcast_to(exact, (2, 4)), rtol=1e-5)


@pytest.mark.skipif(
    base._malloc_trim() is None, reason="needs glibc (malloc_trim): elsewhere it is a no-op"
)
def test_freed_heap_memory_goes_back_to_the_os() -> None:
    """Memory freed in the middle of the heap stays resident under glibc until trimmed; a closed
    session's working memory would otherwise count again under the next graph loaded."""
    chunks = [bytearray(64 * 1024) for _ in range(4096)]  # 256 MiB below the mmap threshold
    kept = chunks[7::8]  # every 8th stays allocated, so the freed pages are not at the top
    del chunks
    before = current_rss_bytes()
    base.return_freed_memory()
    assert before - current_rss_bytes() > 128 * 1024**2
    assert len(kept) == 512


def test_deactivating_a_runner_returns_freed_memory(
    affine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[None] = []
    monkeypatch.setattr(base, "return_freed_memory", lambda: calls.append(None))
    runner = OnnxRuntimeRunner(affine_spec(affine)).activate()
    runner.deactivate()
    runner.deactivate()  # already inactive: nothing to free
    assert len(calls) == 1


def test_outputs_written_into_given_arrays_follow_each_call_and_free_the_session(
    affine: Path,
) -> None:
    """The in-place path rebinds only what changed between calls (a new input array, a new
    output array), and a deactivated runner lets its session go."""
    import gc
    import weakref

    runner = OnnxRuntimeRunner(affine_spec(affine), intra_op_threads=1).activate()
    x = np.ones((2, 3), np.float32)
    y = np.empty((2, 4), np.float32)
    assert runner.infer({"x": x}, outputs_into={"y": y})["y"] is y
    np.testing.assert_allclose(y, x @ WEIGHT + BIAS, rtol=1e-6)
    x[:] = 2.0  # the same array, changed in place: read as it is now
    runner.infer({"x": x}, outputs_into={"y": y})
    np.testing.assert_allclose(y, x @ WEIGHT + BIAS, rtol=1e-6)
    other_x, other_y = np.full((3, 3), 3.0, np.float32), np.empty((3, 4), np.float32)
    runner.infer({"x": other_x}, outputs_into={"y": other_y})
    np.testing.assert_allclose(other_y, other_x @ WEIGHT + BIAS, rtol=1e-6)
    assert runner.infer({"x": x})["y"].shape == (2, 4)  # plain calls are unaffected
    session = weakref.ref(runner.session)
    runner.deactivate()
    gc.collect()
    assert session() is None


def test_onnx_runtime_logs_its_own_lines_only_with_debug_logging(
    affine: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Errors reach the user as one line of ours; ONNX Runtime's own log lines (its warnings,
    an error line before each failed run) come only with debug logging (`--verbose`)."""
    runner = OnnxRuntimeRunner(affine_spec(affine))
    assert runner._session_options().log_severity_level == 4  # fatal only
    with caplog.at_level(logging.DEBUG, logger="nvlm_export"):
        assert runner._session_options().log_severity_level == 2  # warnings and up
