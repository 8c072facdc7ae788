"""Building blocks of the generated checkpoints' geometry (`make-tiny --size`).

Every size keeps what the pipeline depends on: 448x448 tiles, patch 14, 1025 ViT positions, pixel
shuffle 0.5 (256 tokens per tile) and grouped-query attention in the decoder. Each family module
composes its `LayoutSpec.shapes` from these.
"""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

from nvlm_export.models.config import NVLM_D_DUMMY_HEADS, VisionConfig

TINY_LLM = MappingProxyType(
    {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": None,
    }
)

# The tiny decoder widened to head_dim 32, the smallest head size vLLM's CPU attention kernels
# take (its CPU backend supports 32..512): the `tiny-engine` size, for hand-off tests.
TINY_ENGINE_LLM = MappingProxyType({**TINY_LLM, "hidden_size": 128, "intermediate_size": 256})

# InternViT-6B style (NVLM-D): RMSNorm, QK-norm, no qkv bias, 4 real heads + 7 dummy heads whose
# weights are NOT zero, so the padding is really exercised.
TINY_VIT_6B = VisionConfig(
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    intermediate_size=128,
    norm_type="rms_norm",
    qk_normalization=True,
    qkv_bias=False,
    num_dummy_heads=NVLM_D_DUMMY_HEADS,
)

# InternViT-300M style (InternVL2/2.5/3): LayerNorm, qkv bias, no QK-norm, no padded heads.
TINY_VIT_300M = replace(
    TINY_VIT_6B, norm_type="layer_norm", qk_normalization=False, qkv_bias=True, num_dummy_heads=0
)

TINY_SHARD_BYTES = 512 * 1024  # several shards, so sharded reading is exercised
