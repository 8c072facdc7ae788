"""Memory of a decoder served with tensor parallelism, from its config alone (docs/scale-out.md).

Both vLLM and TensorRT-LLM split a Qwen2 / Llama decoder the same way (Megatron style): the
attention heads, the MLP's inner width and the vocabulary of the embedding and output layers are
divided across the TP ranks; the norms are copied. Key/value heads are divided too, or copied when
there are fewer of them than ranks. So per GPU: weights ~ total / TP, and the KV cache holds
`max(1, kv_heads / TP)` heads per layer per token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nvlm_export.models.config import AttentionHeads, decoder_architecture


@dataclass(frozen=True)
class DecoderMemory:
    parameters: int
    replicated_parameters: int  # norms: on every rank
    tensor_parallel_size: int
    kv_heads_per_gpu: int
    num_layers: int
    head_dim: int

    def weight_bytes_per_gpu(self, bytes_per_weight: float) -> float:
        split = self.parameters - self.replicated_parameters
        return (split / self.tensor_parallel_size + self.replicated_parameters) * bytes_per_weight

    def kv_bytes_per_token_per_gpu(self, bytes_per_value: float) -> float:
        return 2 * self.num_layers * self.kv_heads_per_gpu * self.head_dim * bytes_per_value


def decoder_memory(llm_config: Mapping[str, Any], tensor_parallel_size: int) -> DecoderMemory:
    """Parameter count and per-GPU shares of the decoder `llm_config` describes."""
    hidden = int(llm_config["hidden_size"])
    layers = int(llm_config["num_hidden_layers"])
    geometry = AttentionHeads.of(llm_config)
    heads, kv_heads, head_dim = geometry.heads, geometry.kv_heads, geometry.head_dim
    inner = int(llm_config["intermediate_size"])
    vocab = int(llm_config["vocab_size"])
    # Qwen2 always has q/k/v biases; Llama only with attention_bias (then on o_proj too).
    qwen2 = decoder_architecture(llm_config) == "Qwen2ForCausalLM"
    qkv_bias = qwen2 or bool(llm_config.get("attention_bias"))
    o_bias = not qwen2 and bool(llm_config.get("attention_bias"))
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    attention += (heads + 2 * kv_heads) * head_dim * qkv_bias + hidden * o_bias
    mlp = 3 * hidden * inner
    norms = 2 * hidden * layers + hidden
    embeddings = vocab * hidden * (1 if llm_config.get("tie_word_embeddings") else 2)
    return DecoderMemory(
        parameters=embeddings + layers * (attention + mlp) + norms,
        replicated_parameters=norms,
        tensor_parallel_size=tensor_parallel_size,
        kv_heads_per_gpu=max(1, kv_heads // tensor_parallel_size),
        num_layers=layers,
        head_dim=head_dim,
    )
