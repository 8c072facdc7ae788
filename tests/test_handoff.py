"""`nvlm-export handoff`: the decoder as a standard Hugging Face checkpoint, the manifest section,
and the TensorRT-LLM launch commands (TensorRT-LLM itself cannot run here)."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from nvlm_export.cli import app
from nvlm_export.errors import InputError
from nvlm_export.handoff.bundle import LLM_DIR, HandoffSettings, handoff_bundle
from nvlm_export.handoff.tensorrt_llm import DOCUMENTED_FLAGS, TENSORRT_LLM_VERSION
from nvlm_export.runtime.manifest import load_manifest
from nvlm_export.runtime.pipeline import Pipeline

LAYOUTS = ("nvlm-d", "internvl")


def _copy(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    return target


@pytest.fixture(scope="module")
def handed_off(tiny_bundle, tmp_path_factory: pytest.TempPathFactory):
    """(checkpoint, bundle with llm/ for vLLM) per layout, made once for this module."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(layout: str) -> tuple[Path, Path]:
        if layout not in made:
            checkpoint, bundle = tiny_bundle(layout)
            copy = _copy(bundle, tmp_path_factory.mktemp(f"handoff-{layout}"))
            handoff_bundle(checkpoint, copy, HandoffSettings("vllm", max_shard_bytes=200_000))
            made[layout] = (checkpoint, copy)
        return made[layout]

    return get


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decoder_checkpoint_gives_the_bundle_decoders_logits(handed_off, layout: str) -> None:
    """transformers loads llm/ as a plain causal LM whose logits equal the bundle's decoder graph
    (ONNX Runtime) on the same prompt embeddings."""
    from transformers import AutoModelForCausalLM

    _, bundle = handed_off(layout)
    model = AutoModelForCausalLM.from_pretrained(bundle / LLM_DIR).eval()
    pipe = Pipeline.load(bundle)
    ids = np.array([[3, 17, 250, 9, 41, 7]], dtype=np.int64)
    embeds = pipe.embed(ids)
    decoder = pipe.runners["decoder"]
    spec = pipe.manifest.kv_cache
    empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), dtype=np.float32)
    feeds = {"inputs_embeds": embeds, "position_ids": np.arange(ids.shape[1])[None, :]}
    for layer in range(spec.num_layers):
        feeds[spec.past_key.format(layer=layer)] = empty
        feeds[spec.past_value.format(layer=layer)] = empty
    ours = decoder.infer(feeds)["logits"][0]
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(ids)).logits[0, -1].numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)


def test_decoder_checkpoint_is_streamed_into_shards(handed_off) -> None:
    """A small shard limit gives several safetensors shards and an index naming every tensor."""
    _, bundle = handed_off("nvlm-d")
    index = json.loads((bundle / LLM_DIR / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert all((bundle / LLM_DIR / shard).is_file() for shard in shards)
    assert "lm_head.weight" in index["weight_map"]
    assert not list((bundle / LLM_DIR).glob(".shard-*")), "no staging file may remain"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_chat_template_renders_the_bundles_conversation(handed_off, layout: str) -> None:
    from transformers import AutoTokenizer

    _, bundle = handed_off(layout)
    tokenizer = AutoTokenizer.from_pretrained(bundle / LLM_DIR)
    chat = load_manifest(bundle).prompt.chat
    user = [{"role": "user", "content": "What is it?"}]
    rendered = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    assert rendered == chat.render("What is it?")
    system = [{"role": "system", "content": "Be brief."}, *user]
    rendered = tokenizer.apply_chat_template(system, add_generation_prompt=True, tokenize=False)
    assert rendered == chat.render("What is it?", system="Be brief.")


def test_manifest_names_the_engine_and_its_launch_settings(handed_off) -> None:
    _, bundle = handed_off("internvl")
    spec = load_manifest(bundle).language_engine
    assert spec is not None
    assert (spec.engine, spec.checkpoint, spec.tensor_parallel_size) == ("vllm", LLM_DIR, 1)
    assert spec.architecture == "Qwen2ForCausalLM"
    assert spec.max_context == load_manifest(bundle).kv_cache.max_context
    assert spec.dtype == "float32"  # tiny checkpoints are stored in fp32
    assert spec.commands == ()
    config = json.loads((bundle / LLM_DIR / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]


def _trtllm_bundle(tiny_bundle, tmp_path: Path, tp: int = 2) -> Path:
    checkpoint, bundle = tiny_bundle("nvlm-d")
    copy = _copy(bundle, tmp_path)
    settings = HandoffSettings("tensorrt-llm", tensor_parallel_size=tp, dtype="bfloat16")
    handoff_bundle(checkpoint, copy, settings)
    return copy


def test_tensorrt_llm_commands_follow_the_documented_cli(tiny_bundle, tmp_path: Path) -> None:
    """Every option of the written commands is one TensorRT-LLM documents for the named release,
    and the values agree with the hand-off: TP size, context, dtype, paths inside the bundle."""
    bundle = _trtllm_bundle(tiny_bundle, tmp_path, tp=2)
    spec = load_manifest(bundle).language_engine
    assert spec is not None and spec.engine_version == TENSORRT_LLM_VERSION
    convert, build, serve = (_options(shlex.split(c)) for c in spec.commands)
    for (program, options), documented in zip(
        (convert, build, serve),
        ("convert_checkpoint.py", "trtllm-build", "trtllm-serve"),
        strict=True,
    ):
        assert program.endswith(documented)
        flags = set(options) - {"positional"}
        assert flags <= DOCUMENTED_FLAGS[documented], flags - DOCUMENTED_FLAGS[documented]
    assert convert[0].endswith("examples/models/core/qwen/convert_checkpoint.py")
    assert convert[1]["--model_dir"] == LLM_DIR and (bundle / LLM_DIR / "config.json").is_file()
    assert convert[1]["--tp_size"] == serve[1]["--tp_size"] == "2"
    assert convert[1]["--dtype"] == "bfloat16"
    assert build[1]["--checkpoint_dir"] == convert[1]["--output_dir"]
    assert serve[1]["positional"] == build[1]["--output_dir"]
    assert build[1]["--max_seq_len"] == serve[1]["--max_seq_len"] == str(spec.max_context)
    assert int(build[1]["--max_input_len"]) < spec.max_context
    # Image features enter as prompt-table rows: a full batch of the largest images must fit.
    manifest = load_manifest(bundle)
    tiles = manifest.tiling.max_tiles + 1  # + the thumbnail
    assert int(build[1]["--max_prompt_embedding_table_size"]) == 8 * tiles * 256
    assert serve[1]["--tokenizer"] == LLM_DIR and serve[1]["--backend"] == "tensorrt"


def _options(words: list[str]) -> tuple[str, dict[str, str]]:
    """(program, {--flag: value, "positional": first positional}) of one command line."""
    if words[0] == "python3":
        words = words[1:]
    program, rest = words[0], words[1:]
    options: dict[str, str] = {}
    i = 0
    while i < len(rest):
        if rest[i].startswith("--"):
            options[rest[i]] = rest[i + 1]
            i += 2
        else:
            options.setdefault("positional", rest[i])
            i += 1
    return program, options


def test_decoder_weights_take_the_requested_dtype(tiny_bundle, tmp_path: Path) -> None:
    from safetensors import safe_open

    bundle = _trtllm_bundle(tiny_bundle, tmp_path)
    config = json.loads((bundle / LLM_DIR / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    with safe_open(str(bundle / LLM_DIR / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118


def test_refuses_a_tensor_parallel_size_that_splits_heads_unevenly(tiny_bundle, tmp_path) -> None:
    checkpoint, bundle = tiny_bundle("internvl")
    copy = _copy(bundle, tmp_path)
    with pytest.raises(InputError, match="does not split this decoder evenly"):
        handoff_bundle(checkpoint, copy, HandoffSettings("vllm", tensor_parallel_size=3))
    assert load_manifest(copy).language_engine is None
    assert not (copy / LLM_DIR).exists()


def test_refuses_the_checkpoint_of_another_bundle(tiny_bundle, tmp_path: Path) -> None:
    other, _ = tiny_bundle("nvlm-d")
    _, bundle = tiny_bundle("internvl")
    copy = _copy(bundle, tmp_path)
    with pytest.raises(InputError, match="does not belong to this bundle"):
        handoff_bundle(other, copy, HandoffSettings("vllm"))


@pytest.mark.parametrize("layout", ["internvl", "nvlm-x"])
def test_verify_refuses_the_checkpoint_of_another_bundle_in_one_line(
    tiny_bundle, layout: str
) -> None:
    """It used to run both models and fail on their prompts ("0 image placeholder tokens")."""
    other, _ = tiny_bundle(layout)
    _, bundle = tiny_bundle("nvlm-d")
    result = CliRunner().invoke(app, ["verify", str(other), str(bundle)])
    assert result.exit_code == 2, result.output
    assert "does not belong to this bundle" in result.output and layout in result.output
    assert "Traceback" not in result.output


def test_a_checkpoint_in_the_other_layout_of_its_family_belongs_to_the_bundle(
    tiny_bundle, tiny_checkpoint
) -> None:
    """InternVL's two layouts hold one model (docs/checkpoints.md converts between them)."""
    from nvlm_export.models.config_io import check_checkpoint_of

    _, bundle = tiny_bundle("internvl")
    config = check_checkpoint_of(load_manifest(bundle), tiny_checkpoint("internvl-hf"))
    assert config.layout == "internvl-hf"


@pytest.mark.slow
def test_cli_refuses_cross_attention_bundles_in_one_line(tiny_bundle, tmp_path: Path) -> None:
    checkpoint, bundle = tiny_bundle("nvlm-x")
    copy = _copy(bundle, tmp_path)
    result = CliRunner().invoke(app, ["handoff", str(checkpoint), str(copy), "--engine", "vllm"])
    assert result.exit_code == 2
    assert "cannot hand its decoder off" in result.output
    assert "Traceback" not in result.output
    assert not (copy / LLM_DIR).exists()


def test_cli_refuses_to_replace_a_hand_off_without_overwrite(handed_off) -> None:
    checkpoint, bundle = handed_off("internvl")
    args = ["handoff", str(checkpoint), str(bundle), "--engine", "vllm"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "already hands off to vllm" in result.output
    result = CliRunner().invoke(app, [*args, "--overwrite", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["engine"] == "vllm"


NVLM_D_72B = Path(__file__).parent / "fixtures" / "nvlm-d-72b" / "config.json"


def test_decoder_memory_counts_nvlm_d_72b_exactly() -> None:
    """docs/scale-out.md's per-GPU table comes from this count: it must equal the parameters of
    the decoder built from the real config (on the meta device, no memory)."""
    from nvlm_export.handoff.memory import decoder_memory
    from nvlm_export.models.language import build_decoder

    llm_config = json.loads(NVLM_D_72B.read_text())["llm_config"]
    with torch.device("meta"):
        decoder = build_decoder(llm_config)
    count = sum(p.numel() for p in decoder.parameters())
    memory = decoder_memory(llm_config, tensor_parallel_size=8)
    assert memory.parameters == count == 72_706_203_648
    assert memory.weight_bytes_per_gpu(2) == pytest.approx(18.18e9, rel=1e-3)
    assert memory.kv_heads_per_gpu == 1  # 8 key/value heads over 8 GPUs
    assert memory.kv_bytes_per_token_per_gpu(2) == 2 * 80 * 128 * 2
    assert decoder_memory(llm_config, 16).kv_heads_per_gpu == 1  # copied, not split further


def _run(bundle: Path, *extra: str) -> object:
    args = ["run", str(bundle), "-p", "Hi", "-n", "2", *extra]
    return CliRunner().invoke(app, args)


def test_run_with_vllm_needs_a_hand_off(tiny_bundle) -> None:
    _, bundle = tiny_bundle("internvl")
    result = _run(bundle, "--llm-engine", "vllm")
    assert result.exit_code == 2
    assert "has no language model handed off" in result.output
    assert "nvlm-export handoff" in result.output


def test_run_with_vllm_says_how_to_install_it(handed_off) -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    _, bundle = handed_off("internvl")
    result = _run(bundle, "--llm-engine", "vllm")
    assert result.exit_code == 3
    assert "pip install 'nvlm-export[vllm]'" in result.output


def test_tensor_parallelism_needs_the_vllm_engine(tiny_bundle) -> None:
    _, bundle = tiny_bundle("internvl")
    result = _run(bundle, "--tp", "2")
    assert result.exit_code == 2
    assert "--tensor-parallel-size needs --llm-engine vllm" in result.output


def test_prompts_for_vllm_are_checked_against_vllms_context(handed_off) -> None:
    """`handoff --max-context` may start vLLM with another context than the bundle's own cache:
    a prompt is refused, or let through, by the context of the engine that serves it."""
    from dataclasses import replace

    from nvlm_export.errors import PromptError
    from nvlm_export.handoff.vllm_engine import VLLMPipeline
    from nvlm_export.profiling.inputs import question_with_tokens

    _, bundle = handed_off("nvlm-d")
    pipe = Pipeline.load(bundle, graphs=("vision",))
    own = pipe.manifest.kv_cache.max_context
    question = question_with_tokens(pipe.tokenizer, own + 8)  # too long for the bundle's cache
    with pytest.raises(PromptError):
        pipe.prepare(question)
    engine = replace(pipe.manifest.language_engine, max_context=2 * own)
    VLLMPipeline(pipe, llm=None, spec=engine, tensor_parallel_size=1)
    assert pipe.prepare(question).prompt.num_tokens > own
    VLLMPipeline(pipe, llm=None, spec=replace(engine, max_context=64), tensor_parallel_size=1)
    with pytest.raises(PromptError, match="64 tokens"):
        pipe.prepare(question_with_tokens(pipe.tokenizer, 80))


def test_a_hand_off_keeps_the_bundles_calibration_sets(tiny_bundle, tmp_path: Path) -> None:
    """Handing the decoder off changes no graph, so a calibration set recorded on the bundle
    still belongs to it (it used to be refused as "recorded on another bundle")."""
    from nvlm_export.calibration.dataset import bundle_fingerprint

    checkpoint, bundle = tiny_bundle("nvlm-d")
    copy = _copy(bundle, tmp_path)
    before = bundle_fingerprint(copy)
    handoff_bundle(checkpoint, copy, HandoffSettings("vllm", max_shard_bytes=200_000))
    assert (copy / LLM_DIR).is_dir() and load_manifest(copy).language_engine is not None
    assert bundle_fingerprint(copy) == before
