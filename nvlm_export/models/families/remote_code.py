"""The remote-code checkpoint format (NVLM_D, internvl_chat, and the project's NVLM_X / NVLM_H).

config.json holds `vision_config` + `llm_config` at the top level; the tensors keep the reference
code's module names (`vision_model.*`, the `mlp1` projector, `language_model.*`). NVLM-X and
NVLM-H extend it with `cross_attention_every`, the 1-layer tile projector `mlp2` and the gated
blocks inside the language model.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from nvlm_export.errors import CheckpointError
from nvlm_export.models.config import (
    ModelConfig,
    VisionConfig,
    cross_attention_config,
    decoder_architecture,
    render_base,
    require_key,
    shared_vision_fields,
)
from nvlm_export.models.families.spec import KeyRule, LayoutSpec, key_rule

_LAYER = r"vision\.vit\.layers\.(\d+)\."

# The ViT under `vision_model`, the 2-layer projector as the nn.Sequential `mlp1`.
REMOTE_CODE_KEYS: tuple[KeyRule, ...] = (
    key_rule(r"vision\.vit\.embeddings\.(.+)", r"vision_model.embeddings.\1"),
    key_rule(_LAYER + r"(.+)", r"vision_model.encoder.layers.\1.\2"),
    key_rule(r"vision\.projector\.norm\.(.+)", r"mlp1.0.\1"),
    key_rule(r"vision\.projector\.fc1\.(.+)", r"mlp1.1.\1"),
    key_rule(r"vision\.projector\.fc2\.(.+)", r"mlp1.3.\1"),
    key_rule(r"language_model\.(.+)", r"language_model.\1"),
)

# NVLM-X / NVLM-H (no public weights exist): NVLM-D's names, plus the 1-layer tile projector as
# `mlp2` and the gated cross-attention blocks inside the language model.
CROSS_ATTENTION_KEYS: tuple[KeyRule, ...] = (
    key_rule(r"vision\.cross_projector\.fc\.(.+)", r"mlp2.\1"),
    key_rule(r"cross_layers\.(.+)", r"language_model.model.cross_layers.\1"),
    *REMOTE_CODE_KEYS,
)

CROSS_ATTENTION_EVERY = "cross_attention_every"


def _vision(vc: Mapping[str, Any], image_size: int, dummy_heads: int) -> VisionConfig:
    return VisionConfig(
        **shared_vision_fields(vc, "config.json vision_config"),
        norm_type=str(vc.get("norm_type", "rms_norm")),
        qk_normalization=bool(vc.get("qk_normalization", False)),
        qkv_bias=bool(vc.get("qkv_bias", True)),
        num_dummy_heads=dummy_heads,
        patch_size=int(vc.get("patch_size", 14)),
        image_size=int(image_size or vc.get("image_size", 448)),
    )


def parse_remote_code(config: Mapping[str, Any], spec: LayoutSpec) -> ModelConfig:
    vc = require_key(config, "vision_config", "config.json")
    llm = dict(require_key(config, "llm_config", "config.json"))
    decoder_architecture(llm)
    ratio = float(config.get("downsample_ratio", 0.5))
    vision = _vision(vc, config.get("force_image_size") or 0, spec.default_dummy_heads)
    return spec.model_config(
        vision,
        llm,
        ratio,
        select_layer=int(config.get("select_layer", -1)),
        ps_version=str(config.get("ps_version", "v2")),
        template=config.get("template"),
        min_dynamic_patch=int(config.get("min_dynamic_patch", 1)),
        max_dynamic_patch=int(config.get("max_dynamic_patch", 6)),
        use_thumbnail=bool(config.get("use_thumbnail", True)),
        image_token_id=config.get("image_token_id"),
        raw=copy.deepcopy(dict(config)),
    )


def render_remote_code(config: ModelConfig, spec: LayoutSpec) -> dict[str, Any]:
    v = config.vision
    out = render_base(
        config,
        spec.model_type,
        spec.config_architecture,
        qk_normalization=v.qk_normalization,
        qkv_bias=v.qkv_bias,
        patch_size=v.patch_size,
        image_size=v.image_size,
    )
    out.update(
        llm_config=copy.deepcopy(config.llm_config),
        downsample_ratio=config.downsample_ratio,
        force_image_size=v.image_size,
        select_layer=config.select_layer,
        ps_version=config.ps_version,
        template=config.template,
        min_dynamic_patch=config.min_dynamic_patch,
        max_dynamic_patch=config.max_dynamic_patch,
        use_thumbnail=config.use_thumbnail,
        dynamic_image_size=True,
    )
    # No image_token_id: the remote-code layouts take it from the tokenizer.
    return out


def parse_cross_attention(config: Mapping[str, Any], spec: LayoutSpec) -> ModelConfig:
    parsed = parse_remote_code(config, spec)
    every = require_key(config, CROSS_ATTENTION_EVERY, "config.json")
    return replace(
        parsed, cross_attention=cross_attention_config(every, parsed.llm_config, "config.json")
    )


def render_cross_attention(config: ModelConfig, spec: LayoutSpec) -> dict[str, Any]:
    if config.cross_attention is None:
        raise CheckpointError(
            f"A {config.layout} config needs its cross-attention settings",
            fix="Build the config with cross_attention set",
        )
    every = config.cross_attention.every
    return render_remote_code(config, spec) | {CROSS_ATTENTION_EVERY: every}
