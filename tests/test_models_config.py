"""Config parsing: every layout, the real NVLM-D-72B config, and clear errors for the rest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nvlm_export.errors import CheckpointError
from nvlm_export.models.config import decoder_architecture
from nvlm_export.models.config_io import parse_config, read_config
from nvlm_export.models.model import build_model
from nvlm_export.models.registry import LAYOUTS

NVLM_D_72B = Path("/work/shared/reference/nvlm-d-72b/config.json")


@pytest.fixture(scope="module")
def nvlm_d_72b() -> dict:
    return json.loads(NVLM_D_72B.read_text())


def test_real_nvlm_d_72b_config_parses(nvlm_d_72b: dict) -> None:
    config = parse_config(nvlm_d_72b)
    assert config.layout == "nvlm-d"
    v = config.vision
    assert (v.hidden_size, v.num_layers, v.num_heads, v.intermediate_size) == (3200, 45, 25, 12800)
    assert (v.norm_type, v.qk_normalization, v.qkv_bias) == ("rms_norm", True, False)
    assert v.num_dummy_heads == 7 and v.padded_heads == 32 and v.head_dim == 128
    assert (v.image_size, v.patch_size, v.num_positions) == (448, 14, 1025)
    assert config.projector.bias is False
    assert config.projector.hidden_features == 29568  # the LLM's intermediate size
    assert config.tokens_per_tile == 256
    assert (config.max_dynamic_patch, config.use_thumbnail, config.template) == (6, True, "chatml")
    # model_type says "llama" but architectures and q/k/v biases say Qwen2: architectures wins.
    assert config.llm_config["model_type"] == "llama"
    assert config.decoder_architecture == "Qwen2ForCausalLM"


def test_full_nvlm_d_72b_model_on_meta_device(nvlm_d_72b: dict) -> None:
    with torch.device("meta"):
        model = build_model(parse_config(nvlm_d_72b))
    params = dict(model.named_parameters())
    layer = "vision.vit.layers.0.attn."
    assert params[layer + "qkv.weight"].shape == (12288, 3200)
    assert params[layer + "q_norm.weight"].shape == (4096,)
    assert params[layer + "k_norm.weight"].shape == (4096,)
    assert params[layer + "proj.weight"].shape == (3200, 4096)
    assert layer + "qkv.bias" not in params
    assert params["vision.projector.fc1.weight"].shape == (29568, 12800)
    assert params["vision.projector.fc2.weight"].shape == (8192, 29568)
    assert "vision.projector.fc1.bias" not in params
    assert params["language_model.model.embed_tokens.weight"].shape == (152064, 8192)
    assert params["language_model.model.layers.0.self_attn.q_proj.bias"].shape == (8192,)
    assert len(model.vision.vit.layers) == 45
    assert len(model.language_model.model.layers) == 80
    total = sum(p.numel() for p in model.parameters())
    assert 78e9 < total < 80.5e9  # NVLM-D-72B: 79.4B (ViT-6B with dummy heads + Qwen2-72B)


def test_unknown_model_type_names_it_and_lists_supported(nvlm_d_72b: dict) -> None:
    with pytest.raises(CheckpointError) as error:
        parse_config({**nvlm_d_72b, "model_type": "llava"}, "some/config.json")
    message = str(error.value)
    assert "'llava'" in message and "some/config.json" in message
    for spec in LAYOUTS.values():
        assert spec.model_type in message


def test_model_type_selects_layout(nvlm_d_72b: dict) -> None:
    assert parse_config({**nvlm_d_72b, "model_type": "internvl_chat"}).layout == "internvl"


def test_decoder_picked_from_architectures_then_model_type() -> None:
    assert decoder_architecture({"model_type": "llama"}) == "LlamaForCausalLM"
    assert decoder_architecture({"model_type": "qwen2"}) == "Qwen2ForCausalLM"
    assert (
        decoder_architecture({"model_type": "llama", "architectures": ["Qwen2ForCausalLM"]})
        == "Qwen2ForCausalLM"
    )
    with pytest.raises(CheckpointError, match="MistralForCausalLM"):
        decoder_architecture({"architectures": ["MistralForCausalLM"]})


def test_missing_config_json_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.json"):
        read_config(tmp_path)


def test_ps_version_v1_is_rejected(nvlm_d_72b: dict) -> None:
    with pytest.raises(CheckpointError, match="v1"):
        parse_config({**nvlm_d_72b, "ps_version": "v1"})
