"""InternVL2 / 2.5 / 3: InternViT-300M, a 2-layer projector with biases and the LLM's hidden width,
`<img>` + `<IMG_CONTEXT>` blocks, a Qwen2 decoder. Two on-disk layouts: the remote-code
`internvl_chat` checkpoints and transformers' native `InternVLForConditionalGeneration`."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from nvlm_export.errors import CheckpointError
from nvlm_export.models.config import (
    ModelConfig,
    VisionConfig,
    decoder_architecture,
    render_base,
    require_key,
    shared_vision_fields,
)
from nvlm_export.models.families import tiny_shapes as tiny
from nvlm_export.models.families.remote_code import (
    REMOTE_CODE_KEYS,
    parse_remote_code,
    render_remote_code,
)
from nvlm_export.models.families.spec import (
    ArchitectureSpec,
    KeyRule,
    LayoutSpec,
    TinyShape,
    TokenizerSpec,
    key_rule,
)
from nvlm_export.runtime.manifest import IMAGE_FEATURES
from nvlm_export.runtime.prompt import ChatTemplate, PromptFormat

# InternVL2.5's `internvl2_5` conversation (InternVL repo, conversation.py): newline separators.
CHAT = ChatTemplate(
    default_system=(
        "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位"
        "联合开发的多模态大语言模型。"
    ),
    turn_end="<|im_end|>\n",
)

PROMPT_FORMAT = PromptFormat(
    name="internvl",
    image_layout="img_context",
    chat=CHAT,
    placeholder_token="<IMG_CONTEXT>",
    image_start="<img>",
    image_end="</img>",
)

# --- transformers-native layout (model_type "internvl"): vision_config + text_config -----------

_LAYER = r"vision\.vit\.layers\.(\d+)\."
_HF_LAYER = r"model.vision_tower.encoder.layer.\1."

HF_KEYS: tuple[KeyRule, ...] = (
    key_rule(
        r"vision\.vit\.embeddings\.class_embedding", "model.vision_tower.embeddings.cls_token"
    ),
    key_rule(
        r"vision\.vit\.embeddings\.position_embedding",
        "model.vision_tower.embeddings.position_embeddings",
    ),
    key_rule(
        r"vision\.vit\.embeddings\.patch_embedding\.(weight|bias)",
        r"model.vision_tower.embeddings.patch_embeddings.projection.\1",
    ),
    key_rule(  # transformers splits the fused qkv; the parts are concatenated on dim 0
        _LAYER + r"attn\.qkv\.(weight|bias)",
        _HF_LAYER + r"attention.q_proj.\2",
        _HF_LAYER + r"attention.k_proj.\2",
        _HF_LAYER + r"attention.v_proj.\2",
    ),
    key_rule(_LAYER + r"attn\.(q_norm|k_norm)\.weight", _HF_LAYER + r"attention.\2.weight"),
    key_rule(_LAYER + r"attn\.proj\.(weight|bias)", _HF_LAYER + r"attention.projection_layer.\2"),
    key_rule(_LAYER + r"norm1\.(weight|bias)", _HF_LAYER + r"layernorm_before.\2"),
    key_rule(_LAYER + r"norm2\.(weight|bias)", _HF_LAYER + r"layernorm_after.\2"),
    key_rule(_LAYER + r"ls1", _HF_LAYER + "lambda_1"),
    key_rule(_LAYER + r"ls2", _HF_LAYER + "lambda_2"),
    key_rule(_LAYER + r"mlp\.(fc1|fc2)\.(weight|bias)", _HF_LAYER + r"mlp.\2.\3"),
    key_rule(r"vision\.projector\.norm\.(.+)", r"model.multi_modal_projector.layer_norm.\1"),
    key_rule(r"vision\.projector\.fc1\.(.+)", r"model.multi_modal_projector.linear_1.\1"),
    key_rule(r"vision\.projector\.fc2\.(.+)", r"model.multi_modal_projector.linear_2.\1"),
    key_rule(r"language_model\.model\.(.+)", r"model.language_model.\1"),
    key_rule(r"language_model\.lm_head\.weight", "lm_head.weight"),
)


def _single(value: Any) -> int:
    """transformers stores image/patch sizes as [h, w]; InternVL tiles are square."""
    return int(value[0] if isinstance(value, list | tuple) else value)


def parse_hf(config: Mapping[str, Any], spec: LayoutSpec) -> ModelConfig:
    vc = require_key(config, "vision_config", "config.json")
    text = dict(require_key(config, "text_config", "config.json"))
    decoder_architecture(text)
    if not vc.get("use_mean_pooling", True) or not vc.get("use_absolute_position_embeddings", True):
        raise CheckpointError(
            "Unsupported InternVL vision tower variant",
            why="only use_mean_pooling=true with absolute position embeddings matches InternViT",
            fix="Convert the checkpoint with transformers' defaults for InternVL",
        )
    vision = VisionConfig(
        **shared_vision_fields(vc, "config.json vision_config"),
        norm_type=str(vc.get("norm_type", "layer_norm")),
        qk_normalization=bool(vc.get("use_qk_norm", False)),
        qkv_bias=bool(vc.get("attention_bias", False)),
        patch_size=_single(vc.get("patch_size", 14)),
        image_size=_single(vc.get("image_size", 448)),
    )
    ratio = float(config.get("downsample_ratio", 0.5))
    return spec.model_config(
        vision,
        text,
        ratio,
        select_layer=int(config.get("vision_feature_layer", -1)),
        template="internvl2_5",
        max_dynamic_patch=12,
        image_token_id=config.get("image_token_id", 151667),
        raw=copy.deepcopy(dict(config)),
    )


def render_hf(config: ModelConfig, spec: LayoutSpec) -> dict[str, Any]:
    v = config.vision
    tied = bool(config.llm_config.get("tie_word_embeddings", False))
    out = render_base(
        config,
        spec.model_type,
        spec.config_architecture,
        model_type="internvl_vision",
        use_qk_norm=v.qk_normalization,
        attention_bias=v.qkv_bias,
        patch_size=[v.patch_size, v.patch_size],
        image_size=[v.image_size, v.image_size],
        use_mean_pooling=True,
        use_absolute_position_embeddings=True,
    )
    out.update(
        architectures=[spec.config_architecture],
        text_config=copy.deepcopy(config.llm_config),
        image_token_id=config.image_token_id,
        image_seq_length=config.tokens_per_tile,
        downsample_ratio=config.downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=config.select_layer,
        vision_feature_select_strategy="default",
        tie_word_embeddings=tied,
    )
    return out


# transformers' InternVLProcessor expands <IMG_CONTEXT> itself and reads these named tokens.
HF_TOKENIZER = TokenizerSpec(
    image_text="<IMG_CONTEXT>\n",
    extra_specials=("<video>",),
    named_tokens=MappingProxyType(
        {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        }
    ),
)

# --- generated checkpoints ----------------------------------------------------------------------

# InternVL2-1B: InternViT-300M + Qwen2-0.5B. Vocabulary 151655 as in InternVL2-1B's config.json
# (Qwen2-0.5B itself pads to 151936); untied embeddings, as InternVL2-1B states.
BENCH_VIT = replace(
    tiny.TINY_VIT_300M, hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096
)
BENCH_LLM = MappingProxyType(
    {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151655,
    }
)
# Qwen2.5-3B (Qwen2.5-3B's config.json: 16 query heads, 2 KV heads, head_dim 128, rope theta 1e6,
# tied embeddings) with InternViT-300M: 6.8 GB in bf16, twice the bench model's depth-free tensors
# (the embedding) and 7x its layers' bytes, for measuring how memory scales.
QWEN_3B_LLM = MappingProxyType(
    {
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    }
)

TINY = TinyShape(tiny.TINY_VIT_300M, tiny.TINY_LLM, "float32", 1 << 30, "internvl2_5", 12)
BENCH = TinyShape(BENCH_VIT, BENCH_LLM, "bfloat16", 512 * 1024**2, "internvl2_5", 12, init="bench")
QWEN_3B = replace(BENCH, llm=QWEN_3B_LLM, max_shard_bytes=1024**3)

REMOTE_LAYOUT = LayoutSpec(
    name="internvl",
    model_type="internvl_chat",
    description="OpenGVLab InternVL2/2.5/3 remote-code checkpoint",
    stores_dummy_heads=False,
    default_dummy_heads=0,
    projector_bias=True,
    projector_hidden="hidden",
    parse=parse_remote_code,
    render=render_remote_code,
    key_rules=REMOTE_CODE_KEYS,
    shapes=MappingProxyType(
        {
            "tiny": TINY,  # one file: the unsharded case
            "tiny-engine": replace(TINY, llm=tiny.TINY_ENGINE_LLM),
            "bench": BENCH,
            "3b": QWEN_3B,
        }
    ),
    config_architecture="InternVLChatModel",
)

HF_LAYOUT = replace(
    REMOTE_LAYOUT,
    name="internvl-hf",
    model_type="internvl",
    description="transformers-native InternVLForConditionalGeneration checkpoint",
    parse=parse_hf,
    render=render_hf,
    key_rules=HF_KEYS,
    tokenizer=HF_TOKENIZER,
    shapes=MappingProxyType(
        {
            "tiny": replace(TINY, max_shard_bytes=tiny.TINY_SHARD_BYTES),
            "bench": BENCH,
            "3b": QWEN_3B,
        }
    ),
    config_architecture="InternVLForConditionalGeneration",
)

ARCHITECTURE = ArchitectureSpec(
    name="internvl",
    prompt_format=PROMPT_FORMAT,
    layouts=(REMOTE_LAYOUT, HF_LAYOUT),
    model="nvlm_export.models.model:VisionLanguageModel",
    export="nvlm_export.export.architectures:DECODER_ONLY",
    vision_outputs=((IMAGE_FEATURES, "projector"),),
    handoff=True,
)
