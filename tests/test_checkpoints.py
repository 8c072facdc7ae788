"""Checkpoint loading and saving in the real on-disk layouts, and the errors for broken ones."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nvlm_export.errors import CheckpointError
from nvlm_export.models.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    canonical_parameters,
    default_dtype,
    load_checkpoint,
    save_checkpoint,
)
from nvlm_export.models.model import build_model
from nvlm_export.models.tiny import make_tiny_checkpoint, randomize

torch.set_num_threads(1)

LAYOUTS = ("nvlm-d", "internvl", "internvl-hf")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    for layout in LAYOUTS:
        make_tiny_checkpoint(root / layout, layout, seed=1)
    return {layout: root / layout for layout in LAYOUTS}


def _copy(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    return target


def _stored_keys(directory: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_and_forward_on_an_image_prompt(tiny: dict[str, Path], layout: str) -> None:
    model = load_checkpoint(tiny[layout])
    ids = torch.tensor([[7, 8, 9] + [model.image_token_id] * 512 + [10, 11]])
    with torch.no_grad():
        pixels = torch.randn(2, 3, 448, 448)
        logits = model(ids, pixels)
        features = model.image_features(torch.randn(3, 3, 448, 448))
    assert logits.shape == (1, 517, model.config.llm_config["vocab_size"])
    assert torch.isfinite(logits).all()
    with torch.no_grad():  # only the last position's logits: what the reference asks for
        last = model(ids, pixels, logits_to_keep=1)
    assert last.shape == (1, 1, logits.shape[-1])
    assert torch.allclose(last[0, 0], logits[0, -1], atol=1e-5)
    assert features.shape == (3, 256, 64)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_save_load_round_trips_exactly(tiny: dict[str, Path], layout: str, tmp_path: Path) -> None:
    model = load_checkpoint(tiny[layout])
    save_checkpoint(model, tmp_path, dtype=torch.float32, tokenizer_from=tiny[layout])
    _assert_same_state(load_checkpoint(tmp_path), model)
    assert _stored_keys(tmp_path) == _stored_keys(tiny[layout])
    original = json.loads((tiny[layout] / "config.json").read_text())
    assert json.loads((tmp_path / "config.json").read_text()) == original


def test_nvlm_d_layout_on_disk(tiny: dict[str, Path]) -> None:
    directory = tiny["nvlm-d"]
    index = json.loads((directory / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    shapes = _stored_keys(directory)
    assert shapes.keys() == index["weight_map"].keys()
    # 4 real heads + 7 dummy heads of 16 channels, stored padded.
    assert shapes["vision_model.encoder.layers.0.attn.qkv.weight"] == (3 * 11 * 16, 64)
    assert shapes["vision_model.encoder.layers.0.attn.q_norm.weight"] == (11 * 16,)
    assert shapes["vision_model.encoder.layers.0.attn.proj.weight"] == (64, 11 * 16)
    assert shapes["vision_model.embeddings.position_embedding"] == (1, 1025, 64)
    assert shapes["mlp1.1.weight"] == (128, 256) and "mlp1.1.bias" not in shapes
    assert "language_model.lm_head.weight" in shapes
    assert "language_model.model.embed_tokens.weight" in shapes
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "NVLM_D"
    assert config["llm_config"]["model_type"] == "llama"
    assert config["llm_config"]["architectures"] == ["Qwen2ForCausalLM"]
    # the dummy heads carry real (non-zero) weights
    qkv = load_file(
        str(directory / index["weight_map"]["vision_model.encoder.layers.0.attn.qkv.weight"])
    )
    assert qkv["vision_model.encoder.layers.0.attn.qkv.weight"][64:176].abs().min() > 0


def test_internvl_layouts_on_disk(tiny: dict[str, Path]) -> None:
    remote = _stored_keys(tiny["internvl"])
    assert (tiny["internvl"] / SINGLE_FILE).is_file()
    assert remote["vision_model.encoder.layers.1.attn.qkv.bias"] == (192,)
    assert remote["mlp1.1.bias"] == (64,) and remote["mlp1.3.weight"] == (64, 64)
    hf = _stored_keys(tiny["internvl-hf"])
    layer = "model.vision_tower.encoder.layer.1.attention."
    assert hf[layer + "q_proj.weight"] == hf[layer + "v_proj.weight"] == (64, 64)
    assert hf["model.multi_modal_projector.linear_1.weight"] == (64, 256)
    assert "lm_head.weight" in hf and "model.language_model.norm.weight" in hf


def test_bf16_on_disk_loads_into_any_dtype(tiny: dict[str, Path], tmp_path: Path) -> None:
    model = load_checkpoint(tiny["nvlm-d"])
    save_checkpoint(model, tmp_path, dtype=torch.bfloat16, tokenizer_from=tiny["nvlm-d"])
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    as_fp32 = load_checkpoint(tmp_path, dtype=torch.float32)
    as_bf16 = load_checkpoint(tmp_path, dtype=torch.bfloat16)
    for key, value in model.state_dict().items():
        expected = value.to(torch.bfloat16)
        assert torch.equal(as_bf16.state_dict()[key], expected), key
        assert torch.equal(as_fp32.state_dict()[key], expected.float()), key
    assert as_bf16.vision.vit.layers[0].attn.qkv.weight.dtype == torch.bfloat16


def test_internvl_converts_to_transformers_layout_and_back(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    model = load_checkpoint(tiny["internvl"])
    save_checkpoint(
        model,
        tmp_path,
        layout="internvl-hf",
        dtype=torch.float32,
        tokenizer_from=tiny["internvl-hf"],
    )
    converted = load_checkpoint(tmp_path)
    assert converted.config.layout == "internvl-hf"
    _assert_same_state(converted, model)


def test_nvlm_d_cannot_be_written_as_internvl_hf(tiny: dict[str, Path], tmp_path: Path) -> None:
    model = load_checkpoint(tiny["nvlm-d"])
    with pytest.raises(CheckpointError, match="internvl-hf"):
        save_checkpoint(model, tmp_path, layout="internvl-hf")


def test_tied_embeddings_round_trip(tiny: dict[str, Path], tmp_path: Path) -> None:
    loaded = load_checkpoint(tiny["internvl"])
    config = replace(
        loaded.config, llm_config={**loaded.config.llm_config, "tie_word_embeddings": True}
    )
    with default_dtype(torch.float32):
        model = build_model(config)
    randomize(model, seed=5)
    save_checkpoint(model, tmp_path, dtype=torch.float32, tokenizer_from=tiny["internvl"])
    assert "language_model.lm_head.weight" not in _stored_keys(tmp_path)
    reloaded = load_checkpoint(tmp_path)
    assert reloaded.language_model.lm_head.weight is reloaded.embed_tokens.weight
    _assert_same_state(reloaded, model)


def test_loading_holds_each_weight_once_in_the_dtype_it_runs_in(tiny: dict[str, Path]) -> None:
    model = load_checkpoint(tiny["internvl"], dtype=torch.bfloat16)
    tensors = canonical_parameters(model)
    assert all(t.device.type == "cpu" for t in (*tensors.values(), *model.buffers()))
    assert {t.dtype for t in dict(model.named_parameters()).values()} == {torch.bfloat16}
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors.values()
    }
    assert sum(storages.values()) == sum(t.numel() * t.element_size() for t in tensors.values())


# --- broken checkpoints ---------------------------------------------------------------------------


def _edit_config(directory: Path, **changes: object) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        target = config
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    path.write_text(json.dumps(config))


def test_missing_config_names_config_json(tiny: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(tiny["internvl"], tmp_path)
    (directory / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_checkpoint(directory)


def test_missing_weights_names_the_files(tiny: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(tiny["internvl"], tmp_path)
    (directory / SINGLE_FILE).unlink()
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors\.index\.json.*model\.safetensors"
    ):
        load_checkpoint(directory)


def test_missing_shard_names_the_shard(tiny: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(tiny["nvlm-d"], tmp_path)
    (directory / "model-00002-of-00004.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00004\.safetensors"):
        load_checkpoint(directory)


def test_unknown_model_type(tiny: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(tiny["nvlm-d"], tmp_path)
    _edit_config(directory, model_type="qwen2_vl")
    with pytest.raises(CheckpointError, match=r"config\.json.*'qwen2_vl'.*NVLM_D"):
        load_checkpoint(directory)


def test_shape_disagreeing_with_config_names_file_and_key(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    directory = _copy(tiny["internvl-hf"], tmp_path)
    _edit_config(directory, vision_config__intermediate_size=96)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(directory)
    message = str(error.value)
    assert "model.vision_tower.encoder.layer.0.mlp.fc1" in message
    assert ".safetensors" in message and "[128, 64]" in message and "[96, 64]" in message


def _rewrite_single(directory: Path, edit) -> None:  # type: ignore[no-untyped-def]
    tensors = load_file(str(directory / SINGLE_FILE))
    edit(tensors)
    save_file(tensors, str(directory / SINGLE_FILE))


def test_missing_key_names_file_and_key(tiny: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(tiny["internvl"], tmp_path)
    _rewrite_single(directory, lambda t: t.pop("mlp1.3.bias"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing key 'mlp1\.3\.bias'"):
        load_checkpoint(directory)


def test_unexpected_key_names_file_and_key(tiny: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(tiny["internvl"], tmp_path)
    _rewrite_single(directory, lambda t: t.update({"vision_model.extra.weight": torch.ones(2)}))
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: unexpected key 'vision_model\.extra"
    ):
        load_checkpoint(directory)


def test_missing_tokenizer_is_named(tiny: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(tiny["nvlm-d"], tmp_path)
    (directory / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        load_checkpoint(directory)


# --- hostile or broken checkpoints: one clear line, before any large allocation (#16) ----------


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_single_file_weights_are_a_checkpoint_error(
    tiny: dict[str, Path], tmp_path: Path, damage: str
) -> None:
    directory = _copy(tiny["internvl"], tmp_path)
    weights = directory / SINGLE_FILE
    data = weights.read_bytes()
    weights.write_bytes(b"\xff" * 64 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*not a valid safetensors"):
        load_checkpoint(directory)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ({"llm_config__hidden_size": -64}, "llm_config.hidden_size = -64"),
        ({"llm_config__vocab_size": 2**40}, "llm_config.vocab_size = 1099511627776"),
        ({"llm_config__intermediate_size": "wide"}, "llm_config.intermediate_size = 'wide'"),
        ({"vision_config__num_hidden_layers": 0}, "vision_config.num_hidden_layers = 0"),
        ({"vision_config__hidden_size": "x"}, "is malformed"),
        ({"llm_config__num_key_value_heads": 3}, "not a multiple of"),
        ({"max_dynamic_patch": 100_000}, "max_dynamic_patch = 100000"),
    ],
)
def test_config_with_bad_dimensions_is_refused_naming_the_key(
    tiny: dict[str, Path], tmp_path: Path, edit: dict, named: str
) -> None:
    directory = _copy(tiny["internvl"], tmp_path)
    _edit_config(directory, **edit)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(directory)
    assert "config.json" in str(error.value) and named in str(error.value)


def test_config_bigger_than_its_weights_fails_before_allocating(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    """Within every bound, but ~275 GB of fp32 weights: the stored shapes (file headers) are
    compared with the config on the meta device, before the model is built in memory. Run with
    an 8 GB address-space cap, so an allocation fails fast instead of paging the machine."""
    import resource
    import subprocess
    import sys

    directory = _copy(tiny["internvl"], tmp_path)
    _edit_config(
        directory,
        llm_config__hidden_size=65_536,
        llm_config__intermediate_size=262_144,
        llm_config__vocab_size=1_048_576,
    )
    exe = str(Path(sys.executable).with_name("nvlm-export"))
    result = subprocess.run(
        [exe, "export", str(directory), "-o", str(tmp_path / "bundle"), "--no-validate"],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30)),
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]  # after the progress lines: one error line
    assert error.startswith("error:") and "has shape" in error and "config.json implies" in error


def test_tokenizer_file_linked_out_of_the_checkpoint_is_refused(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    from nvlm_export.export.bundle import export_bundle

    directory = _copy(tiny["internvl"], tmp_path)
    secret = tmp_path / "secret.json"
    secret.write_text('{"not": "a tokenizer config"}')
    (directory / "tokenizer_config.json").unlink()
    (directory / "tokenizer_config.json").symlink_to(secret)
    with pytest.raises(CheckpointError) as error:
        export_bundle(directory, tmp_path / "bundle", quiet=True)
    assert "tokenizer_config.json points outside the checkpoint" in str(error.value)
    assert str(secret) in str(error.value)
    assert not (tmp_path / "bundle").exists()
