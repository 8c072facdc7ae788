"""Small random checkpoints at real geometry, for tests (`tiny`) and performance work (`bench`).

Each layout declares the sizes it can be generated at (`LayoutSpec.shapes`, in its family module;
the shared geometry is in `families/tiny_shapes.py`). All keep everything the pipeline depends on:
448x448 tiles, patch 14, 1025 ViT positions, pixel shuffle 0.5 (256 tokens per tile),
grouped-query attention in the decoder, and for NVLM-D/X/H the 6B style ViT with 7 dummy heads
whose weights are NOT zero, so the padding is really exercised. NVLM-X/H get a gated
cross-attention block after every decoder layer, with NON-zero gates.
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
from nvlm_export.models.checkpoint import DTYPES, canonical_parameters, default_dtype, save_weights
from nvlm_export.models.config import ModelConfig, cross_attention_config
from nvlm_export.models.families.spec import TinyShape
from nvlm_export.models.model import build_model
from nvlm_export.models.registry import LAYOUTS, architecture_of, layout_spec

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
    shape = layout_spec(layout).shapes.get(size)
    if shape is None:
        having = [spec.name for spec in LAYOUTS.values() if size in spec.shapes]
        raise InputError(
            f"No {size} checkpoint for the {layout} layout",
            why=f"the {size} size exists for: " + ", ".join(having),
            fix="Pick one of those layouts",
        )
    return shape


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
    cross = spec.family == "cross-attention"
    return spec.model_config(
        shape.vision,
        llm,
        ModelConfig.downsample_ratio,
        template=shape.template,
        max_dynamic_patch=shape.max_dynamic_patch,
        image_token_id=image_token_id,
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
    image_token_id = tokenizer.token_to_id(architecture_of(layout).prompt_format.placeholder_token)
    eos_id = tokenizer.token_to_id("<|im_end|>")
    vocab = tokenizer.get_vocab_size()
    config = tiny_config(size, layout, vocab, image_token_id, eos_id, layers)
    dtype = DTYPES[shape.dtype]
    with torch.device("meta"), default_dtype(dtype):
        shapes = {n: t.shape for n, t in canonical_parameters(build_model(config)).items()}
    value_of = random_values(seed, shape.init)
    files = save_weights(config, shapes, value_of, directory, layout, dtype, shape.max_shard_bytes)
    tokenizer_files = [
        p for p in directory.iterdir() if p.name.startswith(("tokenizer", "special"))
    ]
    parameters = sum(math.prod(s) for s in shapes.values())
    return TinyCheckpoint(config, parameters, files + sorted(tokenizer_files))
