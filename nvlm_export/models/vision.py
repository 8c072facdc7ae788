"""InternViT, the vision encoder of NVLM-D and InternVL, and the pixel shuffle after it.

One definition covers both published styles, selected by `VisionConfig`:
- 6B style (NVLM-D): RMSNorm, qkv without bias, QK-normalisation, 25 real heads padded with 7
  dummy heads to 32 (all of them computed exactly as stored), layer scale.
- 300M style (InternVL2/2.5/3): LayerNorm with bias, qkv bias, no QK-normalisation, layer scale.

Per tile (448x448, patch 14): 1024 patch tokens + 1 CLS token flow through pre-norm blocks
    x = x + ls1 * Attn(norm1(x))
    x = x + ls2 * MLP(norm2(x))
with no final norm. The CLS token is dropped by the caller.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nvlm_export.errors import CheckpointError
from nvlm_export.models.config import VisionConfig


class RealChannelRMSNorm(nn.Module):
    """RMSNorm whose mean square is taken over the first `real_channels` channels only.

    NVLM-D's QK-norm normalises all padded channels (real + dummy heads) but divides the sum of
    squares of the REAL channels by their count: rms = sqrt(sum(x[:real]^2) / real). With
    real_channels == channels this is the ordinary RMSNorm. Computed in float32 like the reference.
    """

    def __init__(self, channels: int, real_channels: int | None = None, eps: float = 1e-6) -> None:
        super().__init__()
        self.real_channels = real_channels or channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        real = x[..., : self.real_channels]
        mean_square = real.pow(2).sum(-1, keepdim=True) / self.real_channels  # (..., 1)
        return self.weight * (x * torch.rsqrt(mean_square + self.eps)).to(dtype)


def _layer_norm(channels: int, eps: float) -> nn.Module:
    return nn.LayerNorm(channels, eps=eps)


def _rms_norm(channels: int, eps: float) -> nn.Module:
    return RealChannelRMSNorm(channels, eps=eps)


NORMS: dict[str, Callable[[int, float], nn.Module]] = {
    "layer_norm": _layer_norm,
    "rms_norm": _rms_norm,
}

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
}


def _lookup(table: dict, key: str, what: str):  # type: ignore[type-arg]
    if key not in table:
        raise CheckpointError(
            f"Unsupported vision {what} {key!r}", why=f"supported: {', '.join(table)}"
        )
    return table[key]


class InternVitEmbeddings(nn.Module):
    """CLS token + 14x14 conv patch embedding (with bias) + learned absolute positions."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        c, p = config.hidden_size, config.patch_size
        self.grid_size = config.grid_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, c))
        self.patch_embedding = nn.Conv2d(config.num_channels, c, kernel_size=p, stride=p)
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_positions, c))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))  # (N, C, gh, gw)
        n, c, gh, gw = patches.shape
        patches = patches.flatten(2).transpose(1, 2)  # (N, gh*gw, C), row-major
        cls = self.class_embedding.expand(n, 1, c).to(dtype)  # (N, 1, C)
        tokens = torch.cat([cls, patches], dim=1)  # (N, 1 + gh*gw, C)
        return tokens + self.positions(gh, gw).to(dtype)

    def positions(self, gh: int, gw: int) -> torch.Tensor:
        """(1, 1 + gh*gw, C); bicubic-resized like the reference when the grid is not 32x32."""
        if (gh, gw) == (self.grid_size, self.grid_size):
            return self.position_embedding
        cls, grid = self.position_embedding[:, :1], self.position_embedding[:, 1:]
        c = grid.shape[-1]
        grid = grid.float().reshape(1, self.grid_size, self.grid_size, c).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        grid = grid.reshape(1, c, gh * gw).permute(0, 2, 1).to(cls.dtype)  # (1, gh*gw, C)
        return torch.cat([cls, grid], dim=1)


class InternVitAttention(nn.Module):
    """Multi-head self-attention over all stored heads (real + dummy), scale head_dim^-0.5."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.heads = config.padded_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        width = config.attention_dim  # heads * head_dim, dummies included
        self.qkv = nn.Linear(config.hidden_size, 3 * width, bias=config.qkv_bias)
        self.q_norm: nn.Module = nn.Identity()
        self.k_norm: nn.Module = nn.Identity()
        if config.qk_normalization:
            self.q_norm = RealChannelRMSNorm(width, config.hidden_size, config.eps)
            self.k_norm = RealChannelRMSNorm(width, config.hidden_size, config.eps)
        self.proj = nn.Linear(width, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each (N, T, heads*head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (y.view(n, t, self.heads, self.head_dim).transpose(1, 2) for y in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) * self.scale  # (N, heads, T, T)
        weights = scores.softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(n, t, -1)  # (N, T, heads*head_dim)
        return self.proj(out)  # (N, T, C)


class InternVitMlp(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _lookup(ACTIVATIONS, config.hidden_act, "activation")()
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class InternVitLayer(nn.Module):
    """Pre-norm block with layer scale on both residual branches."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        norm = _lookup(NORMS, config.norm_type, "norm type")
        c = config.hidden_size
        self.norm1 = norm(c, config.eps)
        self.attn = InternVitAttention(config)
        self.norm2 = norm(c, config.eps)
        self.mlp = InternVitMlp(config)
        self.ls1 = nn.Parameter(torch.ones(c)) if config.layer_scale else None
        self.ls2 = nn.Parameter(torch.ones(c)) if config.layer_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + _scaled(self.attn(self.norm1(x)), self.ls1)
        return x + _scaled(self.mlp(self.norm2(x)), self.ls2)


def _scaled(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return x if scale is None else x * scale


class InternViT(nn.Module):
    """pixel_values (N, 3, 448, 448) -> hidden states (N, 1025, C), CLS first."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = InternVitEmbeddings(config)
        self.layers = nn.ModuleList(InternVitLayer(config) for _ in range(config.num_layers))

    def forward(self, pixel_values: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        """Run the embeddings and the first `num_layers` blocks (default: all)."""
        x = self.embeddings(pixel_values)  # (N, 1 + gh*gw, C)
        for layer in self.layers[: len(self.layers) if num_layers is None else num_layers]:
            x = layer(x)
        return x


def layers_for_select_layer(select_layer: int, num_layers: int) -> int:
    """How many blocks produce `hidden_states[select_layer]` in the reference.

    The reference indexes (embeddings, block 1 output, ..., block L output), so -1 is the last
    block's output and 0 the embeddings.
    """
    index = select_layer if select_layer >= 0 else num_layers + 1 + select_layer
    if not 0 <= index <= num_layers:
        raise CheckpointError(
            f"select_layer {select_layer} is out of range",
            why=f"the vision encoder has {num_layers} layers",
        )
    return index


def pixel_shuffle(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """InternVL's pixel shuffle v2: (N, H, W, C) -> (N, H*r, W*r, C/r^2).

    With r = 0.5 output (i, j) is the concatenation of inputs (2i, 2j), (2i, 2j+1), (2i+1, 2j),
    (2i+1, 2j+1): 32x32 patches of C channels become 16x16 tokens of 4C channels.
    """
    n, h, w, c = x.shape
    x = x.reshape(n, h, int(w * ratio), int(c / ratio))  # merge column pairs: (N, H, W/2, 2C)
    x = x.permute(0, 2, 1, 3)  # (N, W/2, H, 2C)
    x = x.reshape(n, int(w * ratio), int(h * ratio), int(c / ratio**2))  # rows: (N, W/2, H/2, 4C)
    return x.permute(0, 2, 1, 3).contiguous()  # (N, H/2, W/2, 4C)
