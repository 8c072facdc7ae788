"""The language model: transformers' own decoder classes, built from a checkpoint's llm_config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from nvlm_export.models.config import decoder_architecture

# architectures[0] -> (config class, model class). The config's own model_type is ignored, as in
# the NVLM-D remote code (its llm_config says "llama" but is a Qwen2 model with q/k/v biases).
DECODERS: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "Qwen2ForCausalLM": (Qwen2Config, Qwen2ForCausalLM),
    "LlamaForCausalLM": (LlamaConfig, LlamaForCausalLM),
}

# Eager attention everywhere: plain matmul + softmax is deterministic on CPU, identical across
# runs and what the ONNX exporter traces.
ATTENTION_IMPLEMENTATION = "eager"


def decoder_config(llm_config: Mapping[str, Any]) -> PretrainedConfig:
    config_class, _ = DECODERS[decoder_architecture(llm_config)]
    kwargs = {k: v for k, v in llm_config.items() if k != "model_type"}
    config = config_class(**kwargs)
    config._attn_implementation = ATTENTION_IMPLEMENTATION
    return config


def build_decoder(llm_config: Mapping[str, Any]) -> PreTrainedModel:
    """A randomly initialised decoder (Qwen2ForCausalLM or LlamaForCausalLM) in eval mode."""
    _, model_class = DECODERS[decoder_architecture(llm_config)]
    return model_class(decoder_config(llm_config)).eval()
