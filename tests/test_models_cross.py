"""NVLM-X / NVLM-H reference models: gated cross-attention, checkpoint layout, tiny checkpoints."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from typer.testing import CliRunner

from nvlm_export.cli import app
from nvlm_export.errors import CheckpointError, PromptError
from nvlm_export.models.checkpoint import load_checkpoint
from nvlm_export.models.config_io import convert_layout, parse_config, read_config
from nvlm_export.models.cross_attention import CrossBlockShape, GatedCrossAttentionBlock
from nvlm_export.models.cross_model import CrossAttentionVisionLanguageModel
from nvlm_export.models.families.nvlm_h import PROMPT_FORMAT as NVLM_H
from nvlm_export.models.families.nvlm_x import PROMPT_FORMAT as NVLM_X
from nvlm_export.models.model import build_model
from nvlm_export.models.tiny import make_tiny_checkpoint, randomize
from nvlm_export.runtime.prompt import PromptFormat, PromptTokens, build_prompt

NVLM_D_72B = Path("/work/shared/reference/nvlm-d-72b/config.json")
FORMATS = {"nvlm-x": NVLM_X, "nvlm-h": NVLM_H}


@dataclass(frozen=True)
class Tiles:
    num_tiles: int
    has_thumbnail: bool = True


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint: Callable[[str], Path]) -> dict[str, Path]:
    return {layout: tiny_checkpoint(layout) for layout in FORMATS}


@pytest.fixture(scope="module")
def models(checkpoints: dict[str, Path]) -> dict[str, CrossAttentionVisionLanguageModel]:
    return {layout: load_checkpoint(path) for layout, path in checkpoints.items()}


def tokenizer(checkpoints: dict[str, Path], layout: str) -> Tokenizer:
    return Tokenizer.from_file(str(checkpoints[layout] / "tokenizer.json"))


def prompt_for(
    checkpoints: dict[str, Path], layout: str, tiles: list[int], question: str = "What is this?"
) -> PromptTokens:
    fmt: PromptFormat = FORMATS[layout]
    return build_prompt(tokenizer(checkpoints, layout), fmt, question, [Tiles(n) for n in tiles])


def images(tiles: list[int], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 448, 448, generator=generator) for n in tiles]


def logits(
    model: torch.nn.Module, prompt: PromptTokens, pixels: list[torch.Tensor]
) -> torch.Tensor:
    return model(torch.from_numpy(prompt.input_ids)[None], pixels, prompt)[0]


def closed_gates(model: CrossAttentionVisionLanguageModel) -> CrossAttentionVisionLanguageModel:
    for block in model.cross_layers:
        block.attn_gate.zero_()
        block.mlp_gate.zero_()
    return model


# --- config and layout ---------------------------------------------------------------------------


def nvlm_72b_config(model_type: str, every: int = 8) -> dict:
    config = json.loads(NVLM_D_72B.read_text())
    return config | {"model_type": model_type, "cross_attention_every": every}


def test_72b_geometry_has_ten_blocks_after_every_eighth_layer() -> None:
    config = parse_config(nvlm_72b_config("NVLM_X"))
    assert config.layout == "nvlm-x" and config.projector is None
    assert config.cross_attention is not None and config.cross_attention.num_blocks == 10
    after = [layer for layer in range(80) if config.cross_attention.block_after(layer) is not None]
    assert after == [7, 15, 23, 31, 39, 47, 55, 63, 71, 79]
    assert parse_config(nvlm_72b_config("NVLM_X", every=6)).cross_attention.num_blocks == 13


def test_72b_nvlm_h_on_meta_device_has_both_projectors_and_gqa_blocks() -> None:
    with torch.device("meta"):
        model = build_model(parse_config(nvlm_72b_config("NVLM_H")))
    params = dict(model.named_parameters())
    assert params["vision.projector.fc1.weight"].shape == (29568, 12800)  # 2-layer: thumbnail
    assert params["vision.cross_projector.fc.weight"].shape == (8192, 12800)  # 1-layer: tiles
    assert len(model.cross_layers) == 10
    block = "cross_layers.0."
    assert params[block + "cross_attn.q_proj.weight"].shape == (8192, 8192)  # 64 heads
    assert params[block + "cross_attn.k_proj.weight"].shape == (1024, 8192)  # 8 KV heads
    assert params[block + "mlp.gate_proj.weight"].shape == (29568, 8192)
    assert params[block + "attn_gate"].shape == (1,)


@pytest.mark.parametrize("every", [0, 81, "8", None])
def test_bad_cross_attention_every_is_a_checkpoint_error(every: object) -> None:
    config = nvlm_72b_config("NVLM_X")
    if every is None:
        del config["cross_attention_every"]
    else:
        config["cross_attention_every"] = every
    with pytest.raises(CheckpointError, match="cross_attention_every"):
        parse_config(config)


def test_cross_layouts_cannot_be_written_as_decoder_only(checkpoints: dict[str, Path]) -> None:
    config = read_config(checkpoints["nvlm-h"])
    with pytest.raises(CheckpointError, match="different architectures"):
        convert_layout(config, "nvlm-d")
    with pytest.raises(CheckpointError, match="different architectures"):
        convert_layout(config, "nvlm-x")


def test_config_json_declares_model_type_and_placement(checkpoints: dict[str, Path]) -> None:
    for layout, model_type in (("nvlm-x", "NVLM_X"), ("nvlm-h", "NVLM_H")):
        data = json.loads((checkpoints[layout] / "config.json").read_text())
        assert data["model_type"] == model_type and data["cross_attention_every"] == 1
        assert "vision_config" in data and "llm_config" in data


# --- the gated block -----------------------------------------------------------------------------


def block_and_inputs(k: int) -> tuple[GatedCrossAttentionBlock, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    shape = CrossBlockShape.from_llm_config(
        {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 48}
    )  # fmt: skip
    block = GatedCrossAttentionBlock(shape)
    block.attn_gate.fill_(1.0)
    block.mlp_gate.fill_(1.0)
    return block, torch.randn(1, 5, 32), torch.randn(1, k, 32)


def test_fully_masked_rows_pass_through_unchanged_without_nan() -> None:
    block, hidden, cross = block_and_inputs(k=6)
    mask = torch.ones(1, 5, 6, dtype=torch.bool)
    mask[0, :2] = False  # the first two tokens see nothing
    out = block(hidden, *block.key_value(cross), mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, :2], hidden[0, :2])
    assert not torch.allclose(out[0, 2:], hidden[0, 2:])


def test_empty_cross_sequence_equals_one_masked_slot() -> None:
    block, hidden, cross = block_and_inputs(k=1)
    empty = block(hidden, *block.key_value(cross[:, :0]), torch.zeros(1, 5, 0, dtype=torch.bool))
    masked = block(hidden, *block.key_value(cross), torch.zeros(1, 5, 1, dtype=torch.bool))
    assert torch.equal(empty, hidden) and torch.equal(masked, hidden)


def test_fresh_block_is_the_identity() -> None:
    block, hidden, cross = block_and_inputs(k=3)
    block.attn_gate.zero_()
    block.mlp_gate.zero_()
    assert torch.equal(
        block(hidden, *block.key_value(cross), torch.ones(1, 5, 3, dtype=bool)), hidden
    )


# --- the models ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", FORMATS)
def test_open_gates_make_the_image_matter(
    models: dict[str, CrossAttentionVisionLanguageModel], checkpoints: dict[str, Path], layout: str
) -> None:
    prompt = prompt_for(checkpoints, layout, [3])
    first, second = images([3], seed=1), images([3], seed=2)
    second[0][2] = first[0][2]  # same thumbnail: for NVLM-H only the cross path differs
    a, b = logits(models[layout], prompt, first), logits(models[layout], prompt, second)
    assert (a[-1] - b[-1]).abs().max() > 1e-2
    assert a[-1].argmax() != b[-1].argmax() or (a[-1] - b[-1]).abs().max() > 0.1


def test_nvlm_x_with_closed_gates_ignores_the_image(checkpoints: dict[str, Path]) -> None:
    model = closed_gates(load_checkpoint(checkpoints["nvlm-x"]))
    prompt = prompt_for(checkpoints, "nvlm-x", [3])
    a = logits(model, prompt, images([3], seed=1))
    b = logits(model, prompt, images([3], seed=2))
    assert torch.equal(a, b)


def test_nvlm_h_with_closed_gates_sees_only_the_thumbnail(checkpoints: dict[str, Path]) -> None:
    model = closed_gates(load_checkpoint(checkpoints["nvlm-h"]))
    prompt = prompt_for(checkpoints, "nvlm-h", [3])
    base = images([3], seed=1)
    other_tiles = [base[0].clone()]
    other_tiles[0][:2] = torch.randn(2, 3, 448, 448)
    other_thumbnail = [base[0].clone()]
    other_thumbnail[0][2] = torch.randn(3, 448, 448)
    reference = logits(model, prompt, base)
    assert torch.equal(reference, logits(model, prompt, other_tiles))
    assert not torch.allclose(reference, logits(model, prompt, other_thumbnail))


@pytest.mark.parametrize("layout", FORMATS)
def test_text_only_request_equals_the_plain_language_model(
    models: dict[str, CrossAttentionVisionLanguageModel], checkpoints: dict[str, Path], layout: str
) -> None:
    model = models[layout]
    prompt = prompt_for(checkpoints, layout, [])
    assert prompt.cross_attention_mask.shape[1] == 0  # K = 0
    ids = torch.from_numpy(prompt.input_ids)[None]
    plain = model.language_model(inputs_embeds=model.embed_tokens(ids), use_cache=False).logits
    assert torch.allclose(model(ids, [], prompt), plain, atol=1e-5)
    last = model(ids, [], prompt, logits_to_keep=1)  # what the reference asks for
    assert last.shape == (1, 1, plain.shape[-1])
    assert torch.allclose(last[0, 0], plain[0, -1], atol=1e-5)
    # One masked slot (what the runtime feeds when there is nothing to attend to) is the same.
    embeds = model.embed_tokens(ids)
    cross_kv = model.cross_key_values(model.embed_tokens(torch.zeros(1, 1, dtype=torch.long)))
    masked = model.decode(embeds, cross_kv, torch.zeros(1, ids.shape[1], 1, dtype=torch.bool))
    assert torch.allclose(masked, plain, atol=1e-5)


def test_nvlm_x_tag_tokens_see_only_their_own_tile(
    models: dict[str, CrossAttentionVisionLanguageModel], checkpoints: dict[str, Path]
) -> None:
    model, prompt = models["nvlm-x"], prompt_for(checkpoints, "nvlm-x", [3])
    outputs: list[torch.Tensor] = []
    hook = model.cross_layers[0].register_forward_hook(lambda m, i, o: outputs.append(o[0]))
    try:
        base = images([3], seed=1)
        changed = [base[0].clone()]
        changed[0][1] = torch.randn(3, 448, 448)  # tile 1 only
        logits(model, prompt, base)
        logits(model, prompt, changed)
    finally:
        hook.remove()
    rows_changed = (outputs[0] - outputs[1]).abs().amax(dim=-1) > 0
    sees_tile_1 = torch.from_numpy(prompt.cross_attention_mask[:, 256:512].any(axis=1))
    assert torch.equal(rows_changed, sees_tile_1)
    # The test means something: after the image starts, the other tiles' tag rows stay unchanged.
    image_start = int(np.flatnonzero(prompt.cross_attention_mask.any(axis=1))[0])
    assert not sees_tile_1[image_start:].all() and sees_tile_1[-1]


@pytest.mark.parametrize("layout", FORMATS)
def test_generated_tokens_extend_the_prompt_causally(
    models: dict[str, CrossAttentionVisionLanguageModel], checkpoints: dict[str, Path], layout: str
) -> None:
    model, prompt = models[layout], prompt_for(checkpoints, layout, [1, 2])
    pixels = images([1, 2])
    ids = torch.from_numpy(prompt.input_ids)[None]
    longer = torch.cat([ids, torch.tensor([[5, 6, 7]])], dim=1)
    short, long = model(ids, pixels, prompt), model(longer, pixels, prompt)
    assert long.shape[1] == ids.shape[1] + 3
    # A longer sequence takes other fp32 GEMM blockings: differences of ~1e-5 relative are
    # rounding (seen 5e-5 on logits of ~7); a causal leak moves logits by O(1).
    assert torch.allclose(long[:, : ids.shape[1]], short, atol=1e-4, rtol=1e-5)
    with pytest.raises(PromptError, match="start with the prompt"):
        model(torch.cat([ids[:, 1:], ids[:, :1]], dim=1), pixels, prompt)


# --- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", FORMATS)
def test_save_load_round_trip_is_exact_and_seeded(tmp_path: Path, layout: str) -> None:
    made = make_tiny_checkpoint(tmp_path / "a", layout, seed=3)
    make_tiny_checkpoint(tmp_path / "b", layout, seed=3)
    model = build_model(made.config)  # the streamed writer draws what randomize() draws
    randomize(model, seed=3)
    loaded = load_checkpoint(tmp_path / "a")
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    gates = [float(b.attn_gate) for b in loaded.cross_layers]
    assert all(abs(g) > 0.5 for g in gates)  # non-zero by default: the image matters
    for file in sorted((tmp_path / "a").glob("*.safetensors")):
        assert file.read_bytes() == (tmp_path / "b" / file.name).read_bytes()


def _single_file_checkpoint(source: Path, target: Path) -> dict[str, torch.Tensor]:
    """A copy of `source` with all weights in one model.safetensors (easy to tamper with)."""
    target.mkdir()
    index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index.values())):
        tensors.update(load_file(str(source / shard)))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (target / name).write_bytes((source / name).read_bytes())
    return tensors


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda t: t.pop("language_model.model.cross_layers.1.mlp_gate"), "missing key"),
        (lambda t: t.pop("mlp2.weight"), "missing key 'mlp2.weight'"),
        (
            lambda t: t.update({"language_model.model.cross_layers.2.attn_gate": torch.ones(1)}),
            "unexpected key 'language_model.model.cross_layers.2.attn_gate'",
        ),
        (
            lambda t: t.update(
                {"language_model.model.cross_layers.0.cross_attn.k_proj.weight": torch.ones(8, 64)}
            ),
            r"k_proj.weight' has shape \[8, 64\]",
        ),
    ],
)
def test_strict_loading_names_the_key(
    checkpoints: dict[str, Path], tmp_path: Path, tamper, message: str
) -> None:
    tensors = _single_file_checkpoint(checkpoints["nvlm-h"], tmp_path / "ckpt")
    tamper(tensors)
    save_file(tensors, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "ckpt")


def test_nvlm_x_stores_no_decoder_projector(checkpoints: dict[str, Path]) -> None:
    index = json.loads((checkpoints["nvlm-x"] / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert "mlp2.weight" in names and not any(n.startswith("mlp1.") for n in names)
    assert "language_model.model.cross_layers.1.cross_attn.q_proj.weight" in names


def test_make_tiny_cli_writes_a_loadable_nvlm_h(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["make-tiny", "--layout", "nvlm-h", "-o", str(tmp_path / "h")])
    assert result.exit_code == 0, result.output
    model = load_checkpoint(tmp_path / "h")
    assert isinstance(model, CrossAttentionVisionLanguageModel) and len(model.cross_layers) == 2
