"""The gated cross-attention block of NVLM-X and NVLM-H (Flamingo / Llama-3.2-Vision style).

Text hidden states x (B, T, D) attend to a cross key/value sequence c (B, K, D) — image tokens,
and for NVLM-H also tile-tag text embeddings:

    k, v = c·Wk, c·Wv                                   (no rotary; a pure function of c)
    a    = softmax(RMSNorm(x)·Wq · kᵀ / √d  masked by M) · v · Wo
    x    = x + tanh(g_attn) · r ⊙ a
    x    = x + tanh(g_mlp)  · r ⊙ W_down(silu(W_gate·RMSNorm(x)) ⊙ W_up·RMSNorm(x))

M (B, T, K) is the prompt's boolean cross-attention mask and r (B, T, 1) says whether a row sees
any entry at all. A row that sees nothing (text before the first image, or a text-only request)
passes through the block unchanged: its attention output and its MLP output are both zeroed, as
Llama-3.2-Vision's `full_text_row_masked_out_mask` does. This keeps a text-only request identical
to the plain language model and makes the empty (K = 0) and the one-masked-slot cross sequences
equivalent. The gates are learned scalars initialised to zero, so a fresh block is the identity.

Query heads, KV heads, head size and MLP width are the decoder's (grouped-query attention).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nvlm_export.models.config import AttentionHeads
from nvlm_export.models.vision import RealChannelRMSNorm


@dataclass(frozen=True)
class CrossBlockShape:
    """A cross-attention block's dimensions, all taken from the decoder's `llm_config`."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float

    @classmethod
    def from_llm_config(cls, llm: Mapping[str, Any]) -> CrossBlockShape:
        attention = AttentionHeads.of(llm)
        return cls(
            hidden_size=int(llm["hidden_size"]),
            num_heads=attention.heads,
            num_kv_heads=attention.kv_heads,
            head_dim=attention.head_dim,
            intermediate_size=int(llm["intermediate_size"]),
            rms_norm_eps=float(llm.get("rms_norm_eps", 1e-6)),
        )


class CrossAttention(nn.Module):
    """Grouped-query attention from text queries to a precomputed cross key/value sequence."""

    def __init__(self, shape: CrossBlockShape) -> None:
        super().__init__()
        d, hd = shape.hidden_size, shape.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = shape.num_heads, shape.num_kv_heads, hd
        self.q_proj = nn.Linear(d, shape.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, shape.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, shape.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(shape.num_heads * hd, d, bias=False)

    def key_value(self, cross: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cross (B, K, D) -> key, value (B, KV, K, head_dim): computed once per request."""
        batch, length, _ = cross.shape

        def heads(projection: nn.Linear) -> torch.Tensor:
            shape = (batch, length, self.num_kv_heads, self.head_dim)  # K may be 0: no -1
            return projection(cross).reshape(shape).transpose(1, 2)

        return heads(self.k_proj), heads(self.v_proj)

    def forward(
        self, x: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """x (B, T, D), key/value (B, KV, K, hd), mask bool (B, T, K) -> (B, T, D).

        Rows with no allowed entry come out as exactly zero (no NaN), also for K = 0.
        """
        batch, seq, _ = x.shape
        q = self.q_proj(x).reshape(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        group = self.num_heads // self.num_kv_heads
        key = key.repeat_interleave(group, dim=1)  # (B, H, K, hd)
        value = value.repeat_interleave(group, dim=1)
        scores = (q @ key.transpose(-1, -2)) * self.head_dim**-0.5  # (B, H, T, K)
        allowed = mask[:, None]  # (B, 1, T, K)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        out = scores.softmax(dim=-1) @ value  # (B, H, T, hd)
        out = out * allowed.any(dim=-1, keepdim=True)  # fully masked rows -> 0
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class SwiGLU(nn.Module):
    """The decoder's MLP form: W_down(silu(W_gate·x) ⊙ W_up·x), without biases."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class GatedCrossAttentionBlock(nn.Module):
    """One gated cross-attention block, inserted between two decoder layers."""

    def __init__(self, shape: CrossBlockShape) -> None:
        super().__init__()
        eps = shape.rms_norm_eps
        self.input_layernorm = RealChannelRMSNorm(shape.hidden_size, eps=eps)
        self.cross_attn = CrossAttention(shape)
        self.attn_gate = nn.Parameter(torch.zeros(1))  # tanh(0) = 0: identity at init
        self.post_attention_layernorm = RealChannelRMSNorm(shape.hidden_size, eps=eps)
        self.mlp = SwiGLU(shape.hidden_size, shape.intermediate_size)
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def key_value(self, cross: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cross_attn.key_value(cross)

    def forward(
        self, hidden: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """hidden (B, T, D), key/value (B, KV, K, hd), mask bool (B, T, K) -> (B, T, D)."""
        sees_image = mask.any(dim=-1, keepdim=True).to(hidden.dtype)  # (B, T, 1)
        attended = self.cross_attn(self.input_layernorm(hidden), key, value, mask)
        hidden = hidden + self.attn_gate.tanh() * attended
        mlp_out = self.mlp(self.post_attention_layernorm(hidden))
        return hidden + self.mlp_gate.tanh() * sees_image * mlp_out
