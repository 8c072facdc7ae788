"""Small random checkpoints at real geometry, for tests (`tiny`) and performance work (`bench`).

Both keep everything the pipeline depends on: 448x448 tiles, patch 14, 1025 ViT positions, pixel
shuffle 0.5 (256 tokens per tile), grouped-query attention in the decoder, and for NVLM-D/X/H the
6B style ViT with 7 dummy heads whose weights are NOT zero, so the padding is really exercised.
NVLM-X/H get a gated cross-attention block after every decoder layer, with NON-zero gates.
Weights are drawn from a seeded generator with a spread large enough that logits are not flat:
greedy decoding picks different tokens for different inputs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nvlm_export.errors import InputError
from nvlm_export.models.checkpoint import canonical_parameters, default_dtype, save_weights
from nvlm_export.models.config import (
    NVLM_D_DUMMY_HEADS,
    ModelConfig,
    VisionConfig,
    cross_attention_config,
    cross_projector_config,
    decoder_projector_config,
    layout_spec,
)
from nvlm_export.models.model import build_model


@dataclass(frozen=True)
class TinyShape:
    """Geometry of one generated checkpoint."""

    vision: VisionConfig
    llm: dict[str, Any]  # decoder dimensions; vocab_size is set from the tokenizer when None
    dtype: torch.dtype  # on disk
    max_shard_bytes: int
    template: str
    max_dynamic_patch: int
    llm_model_type: str = "qwen2"  # NVLM-D-72B's llm_config says "llama" for its Qwen2 decoder
    cross_attention_every: int = 1  # NVLM-X/H: a gated cross-attention block after every layer
    init: str = "tiny"  # which INIT_RULES set fills the weights


_TINY_LLM = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": None,
}

# The tiny decoder widened to head_dim 32, the smallest head size vLLM's CPU attention kernels
# take (its CPU backend supports 32..512): the `tiny-engine` size, for hand-off tests.
_TINY_ENGINE_LLM = {**_TINY_LLM, "hidden_size": 128, "intermediate_size": 256}

# InternViT-6B style (NVLM-D): RMSNorm, QK-norm, no qkv bias, 4 real heads + 7 dummy heads.
_TINY_VIT_6B = VisionConfig(
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    intermediate_size=128,
    norm_type="rms_norm",
    qk_normalization=True,
    qkv_bias=False,
    num_dummy_heads=NVLM_D_DUMMY_HEADS,
)

# InternViT-300M style (InternVL2/2.5/3): LayerNorm, qkv bias, no QK-norm.
_TINY_VIT_300M = VisionConfig(
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    intermediate_size=128,
    norm_type="layer_norm",
    qk_normalization=False,
    qkv_bias=True,
)

# InternVL2-1B: InternViT-300M + Qwen2-0.5B. Vocabulary 151655 as in InternVL2-1B's config.json
# (Qwen2-0.5B itself pads to 151936); untied embeddings, as InternVL2-1B states.
_BENCH_VIT = VisionConfig(
    hidden_size=1024,
    num_layers=24,
    num_heads=16,
    intermediate_size=4096,
    norm_type="layer_norm",
    qk_normalization=False,
    qkv_bias=True,
)
_BENCH_LLM = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151655,
}
# Qwen2.5-3B (Qwen2.5-3B's config.json: 16 query heads, 2 KV heads, head_dim 128, rope theta 1e6,
# tied embeddings) with InternViT-300M: 6.8 GB in bf16, twice the bench model's depth-free tensors
# (the embedding) and 7x its layers' bytes, for measuring how memory scales.
_3B_LLM = {
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
}
BENCH_LAYOUTS = ("internvl", "internvl-hf")

SHAPES: dict[tuple[str, str], TinyShape] = {
    **{
        ("tiny", layout): TinyShape(
            _TINY_VIT_6B, _TINY_LLM, torch.float32, 512 * 1024, "chatml", 6, llm_model_type="llama"
        )
        for layout in ("nvlm-d", "nvlm-x", "nvlm-h")
    },
    ("tiny", "internvl"): TinyShape(
        _TINY_VIT_300M, _TINY_LLM, torch.float32, 1 << 30, "internvl2_5", 12
    ),
    ("tiny", "internvl-hf"): TinyShape(
        _TINY_VIT_300M, _TINY_LLM, torch.float32, 512 * 1024, "internvl2_5", 12
    ),
    ("tiny-engine", "nvlm-d"): TinyShape(
        _TINY_VIT_6B, _TINY_ENGINE_LLM, torch.float32, 512 * 1024, "chatml", 6, "llama"
    ),
    ("tiny-engine", "internvl"): TinyShape(
        _TINY_VIT_300M, _TINY_ENGINE_LLM, torch.float32, 1 << 30, "internvl2_5", 12
    ),
    **{
        ("bench", layout): TinyShape(
            _BENCH_VIT, _BENCH_LLM, torch.bfloat16, 512 * 1024**2, "internvl2_5", 12, init="bench"
        )
        for layout in BENCH_LAYOUTS
    },
    **{
        ("3b", layout): TinyShape(
            _BENCH_VIT, _3B_LLM, torch.bfloat16, 1024**3, "internvl2_5", 12, init="bench"
        )
        for layout in BENCH_LAYOUTS
    },
}
SIZES = ("tiny", "tiny-engine", "bench", "3b")

# Initial spread per parameter role, first match wins: (name pattern, mean, std).
# Tiny models get large, sharp weights so that tokens depend visibly on prompt and image.
TINY_INIT_RULES: tuple[tuple[str, float, float], ...] = (
    (r".*\.ls[12]$", 0.5, 0.1),  # layer scale
    (r".*(norm[^.]*|layernorm)\.weight$", 1.0, 0.1),
    (r".*norm\d?\.weight$", 1.0, 0.1),
    (r".*\.bias$", 0.0, 0.02),
    (r".*(class|position)_embedding$", 0.0, 0.5),
    (r".*embed_tokens\.weight$", 0.0, 1.0),
    (r".*lm_head\.weight$", 0.0, 0.2),
    (r"vision\.projector\.fc\d\.weight$", 0.0, 0.1),  # image tokens as strong as text tokens
    (r"vision\.cross_projector\.fc\.weight$", 0.0, 0.1),
    # Open gates (tanh(1) = 0.76) and sharp cross-attention: the image changes the answer.
    (r"cross_layers\.\d+\.(attn|mlp)_gate$", 1.0, 0.1),
    (r"cross_layers\..*\.(q_proj|k_proj)\.weight$", 0.0, 0.25),
    (r"cross_layers\..*\.(v_proj|o_proj)\.weight$", 0.0, 0.2),
    # Sharp, strong decoder attention: the answer depends on the context, not just the last token.
    (r"language_model\..*\.(q_proj|k_proj)\.weight$", 0.0, 0.25),
    (r"language_model\..*\.(v_proj|o_proj)\.weight$", 0.0, 0.2),
    (r".*", 0.0, 0.05),
)

# The bench model is deep (24 + 24 layers): the tiny rules would make its residual stream grow
# layer by layer until fp32 rounding differences decide the answer, which no real model does.
# GPT-2 style instead: std 0.02, residual output projections scaled by 1/sqrt(2 * layers).
_RESIDUAL_OUT = 0.02 / (2 * 24) ** 0.5
BENCH_INIT_RULES: tuple[tuple[str, float, float], ...] = (
    (r".*\.ls[12]$", 0.1, 0.0),  # layer scale, InternViT-300M's initial value
    (r".*(norm[^.]*|layernorm)\.(weight)$", 1.0, 0.0),
    (r".*norm\d?\.weight$", 1.0, 0.0),
    (r".*\.bias$", 0.0, 0.0),
    (r".*(o_proj|down_proj|attn\.proj|fc2)\.weight$", 0.0, _RESIDUAL_OUT),
    (r".*", 0.0, 0.02),
)
INIT_RULES = {"tiny": TINY_INIT_RULES, "bench": BENCH_INIT_RULES}


def shape_for(size: str, layout: str) -> TinyShape:
    layout_spec(layout)
    if (size, layout) not in SHAPES:
        raise InputError(
            f"No {size} checkpoint for the {layout} layout",
            why=f"the {size} size exists for: " + ", ".join(lay for s, lay in SHAPES if s == size),
            fix="Pick one of those layouts",
        )
    return SHAPES[(size, layout)]


def llm_config(shape: TinyShape, vocab_size: int, eos_id: int) -> dict[str, Any]:
    """A Qwen2 decoder config (the model_type may mirror NVLM-D-72B's "llama" quirk)."""
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": shape.llm_model_type,
        "attention_bias": True,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        **shape.llm,
        "vocab_size": shape.llm["vocab_size"] or vocab_size,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
    }
    return config


def tiny_config(
    size: str,
    layout: str,
    vocab_size: int,
    image_token_id: int,
    eos_id: int,
    layers: int | None = None,
) -> ModelConfig:
    """The config of a generated checkpoint; `layers` overrides the decoder's depth."""
    shape = shape_for(size, layout)
    spec = layout_spec(layout)
    llm = llm_config(shape, _round_up(vocab_size, 64), eos_id)
    if layers is not None:
        llm["num_hidden_layers"] = layers
    ratio = ModelConfig.downsample_ratio
    cross = spec.family == "cross-attention"
    return ModelConfig(
        layout=layout,
        vision=shape.vision,
        projector=decoder_projector_config(spec, shape.vision, llm, ratio),
        llm_config=llm,
        downsample_ratio=ratio,
        template=shape.template,
        max_dynamic_patch=shape.max_dynamic_patch,
        image_token_id=image_token_id,
        cross_projector=cross_projector_config(spec, shape.vision, llm, ratio) if cross else None,
        cross_attention=(
            cross_attention_config(shape.cross_attention_every, llm, f"{size} {layout}")
            if cross
            else None
        ),
    )


def _round_up(value: int, multiple: int) -> int:
    return math.ceil(value / multiple) * multiple


def random_values(seed: int, init: str = "tiny") -> Callable[[str, torch.Size], torch.Tensor]:
    """name, shape -> seeded random values following INIT_RULES[init]; call in parameter order."""
    generator = torch.Generator().manual_seed(seed)
    rules = INIT_RULES[init]

    def value_of(name: str, shape: torch.Size) -> torch.Tensor:
        mean, std = next((m, s) for pattern, m, s in rules if re.fullmatch(pattern, name))
        values = torch.randn(shape, generator=generator, dtype=torch.float32)
        return values.mul_(std).add_(mean)  # in place: one fp32 copy of the largest tensor

    return value_of


def randomize(model: torch.nn.Module, seed: int, init: str = "tiny") -> None:
    """Fill every parameter from a seeded generator, following INIT_RULES[init]."""
    value_of = random_values(seed, init)
    with torch.no_grad():
        for name, tensor in canonical_parameters(model).items():
            tensor.copy_(value_of(name, tensor.shape))


@dataclass(frozen=True)
class TinyCheckpoint:
    config: ModelConfig
    parameters: int
    files: list[Path]


def make_tiny_checkpoint(
    directory: Path,
    layout: str,
    seed: int = 0,
    size: str = "tiny",
    layers: int | None = None,
) -> TinyCheckpoint:
    """Write a random checkpoint (weights, config.json, tiny tokenizer) into `directory`.

    The model is built on the meta device (shapes only) and each tensor is drawn just before its
    shard is written, so peak memory is one shard however large the model; the values are the
    ones `randomize` would put into a real model.
    """
    from nvlm_export.models.tokenizer import save_tiny_tokenizer

    shape = shape_for(size, layout)
    directory = Path(directory)
    tokenizer = save_tiny_tokenizer(directory, layout)
    image_token_id = tokenizer.token_to_id(layout_spec(layout).image_token)
    eos_id = tokenizer.token_to_id("<|im_end|>")
    vocab = tokenizer.get_vocab_size()
    config = tiny_config(size, layout, vocab, image_token_id, eos_id, layers)
    with torch.device("meta"), default_dtype(shape.dtype):
        shapes = {n: t.shape for n, t in canonical_parameters(build_model(config)).items()}
    value_of = random_values(seed, shape.init)
    files = save_weights(
        config, shapes, value_of, directory, layout, shape.dtype, shape.max_shard_bytes
    )
    tokenizer_files = [
        p for p in directory.iterdir() if p.name.startswith(("tokenizer", "special"))
    ]
    parameters = sum(math.prod(s) for s in shapes.values())
    return TinyCheckpoint(config, parameters, files + sorted(tokenizer_files))
