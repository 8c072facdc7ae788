"""The language decoder's ONNX export computes what transformers computes, prefill and decode."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from nvlm_export.errors import ExportError
from nvlm_export.export import onnx_utils
from nvlm_export.export.decoder import (
    DEFAULT_OPSET,
    DecoderSpec,
    ExportableDecoder,
    export_decoder_onnx,
)
from nvlm_export.export.onnx_utils import non_standard_ops, save_embedding_table

torch.set_num_threads(1)

# Small but structurally faithful: GQA (4 query heads per KV head), several layers, untied head.
# initializer_range 0.2 makes attention peaked, so a wrong mask or rotation changes the logits.
COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=97,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    initializer_range=0.2,
)


def qwen2(**overrides: object) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(**{**COMMON, "rope_theta": 1e6, "rms_norm_eps": 1e-6, **overrides})
    return Qwen2ForCausalLM(config).eval()


def llama(**overrides: object) -> LlamaForCausalLM:
    torch.manual_seed(1)
    config = LlamaConfig(**{**COMMON, "rms_norm_eps": 1e-5, **overrides})
    return LlamaForCausalLM(config).eval()


def empty_cache(decoder: ExportableDecoder, dtype: torch.dtype = torch.float32) -> list:
    spec = decoder.spec
    kv = torch.zeros(1, spec.num_kv_heads, 0, spec.head_dim, dtype=dtype)
    return [kv] * (2 * spec.num_layers)


def chunks(hidden: int, lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    """Embeddings for a prefill chunk and following steps, e.g. [6, 1, 1, 1, 1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n, hidden, generator=generator) for n in lengths]


# ---------------------------------------------------------------------------------------------
# The plain module equals transformers (prefill + decode with a cache)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_lm", [qwen2, llama], ids=["qwen2-bias-gqa", "llama-no-bias"])
def test_module_matches_transformers_prefill_and_decode(make_lm) -> None:
    lm = make_lm()
    decoder = ExportableDecoder(lm).eval()
    cache, past, position = DynamicCache(config=lm.config), empty_cache(decoder), 0
    with torch.no_grad():
        for embeds in chunks(lm.config.hidden_size, [6, 1, 1, 1, 1, 1]):
            positions = torch.arange(position, position + embeds.shape[1])[None]
            expected = lm(inputs_embeds=embeds, position_ids=positions, cache=cache, use_cache=True)
            logits, *past = decoder(embeds, positions, *past)
            torch.testing.assert_close(logits, expected.logits[:, -1], rtol=0, atol=1e-5)
            position += embeds.shape[1]
    # The cache we hand back is the one transformers keeps (same layout, same values).
    torch.testing.assert_close(past[0], cache.layers[0].keys, rtol=0, atol=1e-5)
    assert past[0].shape == (1, 2, 11, 8)


def test_module_shares_weights_instead_of_copying() -> None:
    lm = qwen2()
    decoder = ExportableDecoder(lm)
    assert decoder.lm_head.weight.data_ptr() == lm.lm_head.weight.data_ptr()
    ours = {p.data_ptr() for p in decoder.parameters()}
    assert lm.model.layers[2].mlp.down_proj.weight.data_ptr() in ours


def test_module_detects_a_wrong_cache() -> None:
    """Guard: the comparison above can fail (a stale cache changes the logits)."""
    lm = qwen2()
    decoder = ExportableDecoder(lm).eval()
    prefill, step = chunks(lm.config.hidden_size, [6, 1])
    with torch.no_grad():
        _, *past = decoder(prefill, torch.arange(6)[None], *empty_cache(decoder))
        right, *_ = decoder(step, torch.tensor([[6]]), *past)
        stale = [t[:, :, :-1] for t in past]
        wrong, *_ = decoder(step, torch.tensor([[5]]), *stale)
    assert (right - wrong).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# The ONNX graph in ONNX Runtime equals the module
# ---------------------------------------------------------------------------------------------


def run_session(
    session: ort.InferenceSession,
    decoder: ExportableDecoder,
    lengths: list[int],
    dtype: np.dtype = np.float32,
) -> list[np.ndarray]:
    """Feed chunks through the graph, presents back as pasts; return each call's logits."""
    spec = decoder.spec
    past = {
        name: np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), dtype)
        for name in decoder.past_names()
    }
    position, all_logits = 0, []
    for embeds in chunks(spec.hidden_size, lengths):
        seq = embeds.shape[1]
        feeds = {
            "inputs_embeds": embeds.numpy().astype(dtype),
            "position_ids": np.arange(position, position + seq, dtype=np.int64)[None],
            **past,
        }
        logits, *presents = session.run(None, feeds)
        past = dict(zip(decoder.past_names(), presents, strict=True))
        all_logits.append(logits)
        position += seq
    return all_logits


def run_module(decoder: ExportableDecoder, lengths: list[int]) -> list[np.ndarray]:
    past, position, all_logits = empty_cache(decoder, decoder.dtype), 0, []
    with torch.no_grad():
        for embeds in chunks(decoder.spec.hidden_size, lengths):
            seq = embeds.shape[1]
            positions = torch.arange(position, position + seq)[None]
            logits, *past = decoder(embeds.to(decoder.dtype), positions, *past)
            all_logits.append(logits.numpy())
            position += seq
    return all_logits


# Prefill from an empty cache, a second (chunked) prefill on top of it, then decode steps:
# three different seq lengths and growing past lengths through one session.
LENGTHS = [7, 3, 1, 1, 1, 1]


@pytest.fixture(scope="module")
def qwen2_export(tmp_path_factory: pytest.TempPathFactory):
    lm = qwen2()
    path = tmp_path_factory.mktemp("qwen2") / "decoder.onnx"
    io = export_decoder_onnx(lm, path, dtype="fp32", opset=DEFAULT_OPSET)
    return lm, path, io


def test_onnx_matches_module_across_prefill_and_decode(qwen2_export) -> None:
    lm, path, _ = qwen2_export
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = run_session(session, ExportableDecoder(lm), LENGTHS)
    expected = run_module(ExportableDecoder(lm).eval(), LENGTHS)
    for step, (g, e) in enumerate(zip(got, expected, strict=True)):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-4, err_msg=f"call {step}")


def test_batch_axis_is_dynamic(qwen2_export) -> None:
    """Two equal-length rows in one call give each row's own logits and cache."""
    lm, path, _ = qwen2_export
    decoder = ExportableDecoder(lm)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    embeds = torch.cat(chunks(lm.config.hidden_size, [5, 5]))  # (2, 5, hidden)
    empty = np.zeros((2, 2, 0, 8), np.float32)
    feeds = {
        "inputs_embeds": embeds.numpy(),
        "position_ids": np.tile(np.arange(5, dtype=np.int64), (2, 1)),
        **{name: empty for name in decoder.past_names()},
    }
    logits, *presents = session.run(None, feeds)
    assert logits.shape == (2, 97) and presents[0].shape == (2, 2, 5, 8)
    with torch.no_grad():
        for row in range(2):
            alone, *_ = decoder.eval()(
                embeds[row : row + 1], torch.arange(5)[None], *empty_cache(decoder)
            )
            np.testing.assert_allclose(logits[row], alone[0].numpy(), rtol=0, atol=1e-4)


def test_graph_uses_only_standard_ops_at_the_chosen_opset(qwen2_export) -> None:
    _, path, io = qwen2_export
    model = onnx.load(str(path))
    assert non_standard_ops(model) == []
    assert {(o.domain or "ai.onnx"): o.version for o in model.opset_import}["ai.onnx"] == 18
    assert io.opset == DEFAULT_OPSET == 18


def test_graph_io_describes_the_written_file(qwen2_export) -> None:
    _, path, io = qwen2_export
    model = onnx.load(str(path), load_external_data=False)
    assert [i.name for i in model.graph.input] == [t.name for t in io.inputs]
    assert [o.name for o in model.graph.output] == [t.name for t in io.outputs]
    assert io.input("past_key_values.2.value").shape == ("batch", 2, "past", 8)
    assert io.output("present.0.key").shape == ("batch", 2, "past + seq", 8)
    assert io.output("logits") == onnx_utils.TensorIO("logits", "float32", ("batch", 97))
    assert io.input("position_ids").dtype == "int64"
    assert io.external_data is None
    json.dumps(io.to_dict())  # plain data for the manifest


@pytest.mark.slow
def test_fp16_graph_keeps_fp32_logits_and_stays_close(tmp_path: Path) -> None:
    lm = qwen2()
    path = tmp_path / "decoder_fp16.onnx"
    io = export_decoder_onnx(copy.deepcopy(lm).half(), path, dtype="fp16")
    assert io.input("inputs_embeds").dtype == "float16"
    assert io.output("present.0.key").dtype == "float16"
    assert io.output("logits").dtype == "float32"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = run_session(session, ExportableDecoder(lm), LENGTHS, np.float16)
    expected = run_module(ExportableDecoder(lm).eval(), LENGTHS)  # the fp32 reference
    for step, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.dtype == np.float32
        # fp16 weights and activations: measured error is 0.1-0.3 % of the logit range; 1 % is
        # loose enough for fp16 rounding and far below what a broken mask or rotation causes.
        scale = np.abs(e).max()
        np.testing.assert_allclose(g, e, rtol=0, atol=0.01 * scale, err_msg=f"call {step}")


@pytest.mark.slow
def test_large_models_write_weights_to_a_side_file(tmp_path: Path, monkeypatch) -> None:
    """Above the 2 GB protobuf limit the weights go to model.onnx.data (threshold lowered here)."""
    monkeypatch.setattr(onnx_utils, "EXTERNAL_DATA_THRESHOLD_BYTES", 1024)
    lm = llama()
    path = tmp_path / "model.onnx"
    io = export_decoder_onnx(lm, path)
    assert io.external_data == "model.onnx.data"
    assert (tmp_path / "model.onnx.data").stat().st_size > path.stat().st_size
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = run_session(session, ExportableDecoder(lm), [5, 1, 1])
    expected = run_module(ExportableDecoder(lm).eval(), [5, 1, 1])
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Configs and arguments that are rejected, naming the field
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_lm", "field"),
    [
        (
            lambda: llama(
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 128,
                }
            ),
            "rope_scaling.type",
        ),
        (lambda: qwen2(hidden_act="gelu"), "hidden_act"),
        (lambda: qwen2(use_sliding_window=True, max_window_layers=0), "use_sliding_window"),
    ],
    ids=["llama3-rope", "gelu", "sliding-window"],
)
def test_unsupported_config_is_an_export_error_naming_the_field(make_lm, field: str) -> None:
    with pytest.raises(ExportError, match=field):
        ExportableDecoder(make_lm())


def test_dynamic_ntk_rope_is_exact_up_to_max_positions_and_refused_beyond(tmp_path: Path) -> None:
    lm = qwen2(rope_scaling={"type": "dynamic", "factor": 3.0}, max_position_embeddings=64)
    spec = DecoderSpec.from_model(lm)
    assert (spec.rope_type, spec.rope_factor) == ("dynamic", 3.0)
    torch.testing.assert_close(spec.inv_freq(), lm.model.rotary_emb.original_inv_freq)
    with pytest.raises(ExportError, match="max_position_embeddings=64"):
        export_decoder_onnx(lm, tmp_path / "d.onnx", max_context=65)


def test_linear_rope_scaling_matches_transformers() -> None:
    lm = llama(rope_scaling={"rope_type": "linear", "factor": 4.0})
    decoder = ExportableDecoder(lm).eval()
    (embeds,) = chunks(lm.config.hidden_size, [9])
    positions = torch.arange(9)[None]
    with torch.no_grad():
        expected = lm(inputs_embeds=embeds, position_ids=positions).logits[:, -1]
        logits, *_ = decoder(embeds, positions, *empty_cache(decoder))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_nvlm_d_72b_rope_facts_are_read_from_its_config() -> None:
    reference = Path("/work/shared/reference/nvlm-d-72b/config.json")
    if not reference.is_file():
        pytest.skip("reference config not present")
    llm = json.loads(reference.read_text())["llm_config"]
    keep = ("rope_theta", "rope_scaling", "max_position_embeddings", "rms_norm_eps")
    small = {**COMMON, **{k: llm[k] for k in keep}}
    with torch.device("meta"):
        lm = Qwen2ForCausalLM(Qwen2Config(**small))
    spec = DecoderSpec.from_model(lm)
    assert (spec.rope_theta, spec.rope_type, spec.rope_factor) == (1e6, "dynamic", 3.0)
    assert spec.max_position_embeddings == 32768 and spec.biases.qkv and not spec.biases.output
    spec.check_max_context(32768)
    with pytest.raises(ExportError, match="dynamic NTK"):
        spec.check_max_context(32769)


def test_weights_in_another_dtype_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=re.escape("torch_dtype=torch.float16")):
        export_decoder_onnx(qwen2(), tmp_path / "x.onnx", dtype="fp16")


def test_unsupported_opset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="Opset 13"):
        export_decoder_onnx(qwen2(), tmp_path / "x.onnx", opset=13)


# ---------------------------------------------------------------------------------------------
# The embedding table outside the graph
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_embedding_table_is_a_memory_mappable_npy(tmp_path: Path, dtype: str) -> None:
    lm = qwen2()
    weight = lm.model.embed_tokens.weight
    path = tmp_path / "embeddings.npy"
    assert save_embedding_table(weight, path, dtype=dtype) == (97, 64)
    table = np.load(path, mmap_mode="r")
    assert isinstance(table, np.memmap) and table.dtype == dtype and table.shape == (97, 64)
    ids = np.array([0, 5, 96])
    expected = weight.detach()[torch.from_numpy(ids)].to(getattr(torch, dtype)).numpy()
    np.testing.assert_array_equal(table[ids], expected)


# ---------------------------------------------------------------------------------------------
# The graph's form lets ONNX Runtime fuse it (speed, docs/decoder-graph.md)
# ---------------------------------------------------------------------------------------------


def test_onnxruntime_fuses_every_rms_norm_into_one_node(qwen2_export, tmp_path: Path) -> None:
    """Each RMSNorm (2 per layer + the final one) becomes one SimplifiedLayerNormalization with
    its weight; none of the six small ops it is written with are left to dispatch per step."""
    _, path, _ = qwen2_export
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    layers = COMMON["num_hidden_layers"]
    assert ops.count("SimplifiedLayerNormalization") == 2 * layers + 1
    assert not {"Pow", "ReduceMean", "Sqrt", "Reciprocal", "Div"} & set(ops)
    assert ops.count("Neg") <= 1  # rotary's sign is folded into the shared sin table
