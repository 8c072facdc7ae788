"""NVLM-H (the project's own format; no public weights): NVLM-D's thumbnail path (2-layer MLP into
the decoder sequence) plus NVLM-X's gated cross-attention over the regular tiles."""

from __future__ import annotations

from dataclasses import replace

from nvlm_export.models.families import nvlm_d, nvlm_x
from nvlm_export.runtime.manifest import CROSS_FEATURES, IMAGE_FEATURES

PROMPT_FORMAT = replace(nvlm_d.PROMPT_FORMAT, name="nvlm-h", image_layout="hybrid")

LAYOUT = replace(
    nvlm_x.LAYOUT,
    name="nvlm-h",
    model_type="NVLM_H",
    description="NVLM-H (project format): NVLM-D's thumbnail path plus NVLM-X's gated "
    "cross-attention over the regular tiles",
    decoder_projector=True,
    config_architecture="NVLM_H",
)

ARCHITECTURE = replace(
    nvlm_x.ARCHITECTURE,
    name="nvlm-h",
    prompt_format=PROMPT_FORMAT,
    layouts=(LAYOUT,),
    # Both projections of every tile from one ViT pass: the runtime takes the thumbnail's
    # image_features and the regular tiles' cross_features, as the prompt's slots say.
    vision_outputs=((IMAGE_FEATURES, "projector"), (CROSS_FEATURES, "cross_projector")),
)
