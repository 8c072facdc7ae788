"""NVLM-X (the project's own format; no public weights): NVLM-D's vision tower and tokenizer, every
tile through a 1-layer projector into the cross-attention sequence, a gated cross-attention block
after every `cross_attention_every`-th decoder layer. The decoder text holds only the tile tags."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

from nvlm_export.models.families import nvlm_d
from nvlm_export.models.families.remote_code import (
    CROSS_ATTENTION_KEYS,
    parse_cross_attention,
    render_cross_attention,
)
from nvlm_export.models.families.spec import CROSS_ATTENTION_GRAPHS, ArchitectureSpec
from nvlm_export.runtime.manifest import CROSS_FEATURES

# NVLM-D's tokenizer, tags and chat template; the tiles go to cross-attention.
PROMPT_FORMAT = replace(nvlm_d.PROMPT_FORMAT, name="nvlm-x", image_layout="cross_tile_tags")

LAYOUT = replace(
    nvlm_d.LAYOUT,
    name="nvlm-x",
    model_type="NVLM_X",
    description="NVLM-X (project format): InternViT-6B style, 1-layer tile projector, "
    "Qwen2 decoder with gated cross-attention blocks",
    parse=parse_cross_attention,
    render=render_cross_attention,
    key_rules=CROSS_ATTENTION_KEYS,
    shapes=MappingProxyType({"tiny": nvlm_d.TINY}),
    family="cross-attention",
    decoder_projector=False,
    config_architecture="NVLM_X",
)

MODEL = "nvlm_export.models.cross_model:CrossAttentionVisionLanguageModel"
EXPORT = "nvlm_export.export.cross:CROSS_ATTENTION"

ARCHITECTURE = ArchitectureSpec(
    name="nvlm-x",
    prompt_format=PROMPT_FORMAT,
    layouts=(LAYOUT,),
    model=MODEL,
    export=EXPORT,
    vision_outputs=((CROSS_FEATURES, "cross_projector"),),
    graph_parameters=CROSS_ATTENTION_GRAPHS,
)
