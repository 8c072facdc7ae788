"""NVLM-D: InternViT-6B (with 7 padded heads), a bias-free 2-layer projector with the LLM's
intermediate width, tile tags before each tile's image tokens, a Qwen2 decoder."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

from nvlm_export.models.config import NVLM_D_DUMMY_HEADS
from nvlm_export.models.families import tiny_shapes as tiny
from nvlm_export.models.families.remote_code import (
    REMOTE_CODE_KEYS,
    parse_remote_code,
    render_remote_code,
)
from nvlm_export.models.families.spec import ArchitectureSpec, LayoutSpec, TinyShape
from nvlm_export.runtime.manifest import IMAGE_FEATURES
from nvlm_export.runtime.prompt import ChatTemplate, PromptFormat

# NVLM-D's `chatml` conversation (MPT separator style): no newline after <|im_end|>.
CHAT = ChatTemplate(default_system="Answer the questions.", turn_end="<|im_end|>")

PROMPT_FORMAT = PromptFormat(
    name="nvlm-d",
    image_layout="tile_tags",
    chat=CHAT,
    placeholder_token="<|vision_pad|>",
    image_start="<Image>",
    image_end="</Image>",
)

# The tiny NVLM checkpoints mirror NVLM-D-72B's llm_config quirk: model_type "llama", Qwen2 inside.
TINY = TinyShape(
    tiny.TINY_VIT_6B, tiny.TINY_LLM, "float32", tiny.TINY_SHARD_BYTES, "chatml", 6, "llama"
)

LAYOUT = LayoutSpec(
    name="nvlm-d",
    model_type="NVLM_D",
    description="NVIDIA NVLM-D remote-code checkpoint (InternViT-6B style, Qwen2 decoder)",
    stores_dummy_heads=True,
    default_dummy_heads=NVLM_D_DUMMY_HEADS,
    projector_bias=False,
    projector_hidden="intermediate",
    parse=parse_remote_code,
    render=render_remote_code,
    key_rules=REMOTE_CODE_KEYS,
    shapes=MappingProxyType(
        {
            "tiny": TINY,
            "tiny-engine": replace(TINY, llm=tiny.TINY_ENGINE_LLM),
        }
    ),
    config_architecture="NVLM_D",
)

ARCHITECTURE = ArchitectureSpec(
    name="nvlm-d",
    prompt_format=PROMPT_FORMAT,
    layouts=(LAYOUT,),
    model="nvlm_export.models.model:VisionLanguageModel",
    export="nvlm_export.export.architectures:DECODER_ONLY",
    vision_outputs=((IMAGE_FEATURES, "projector"),),
    handoff=True,
)
