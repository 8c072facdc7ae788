"""Projectors from pixel-shuffled vision features (4*Dv channels) to the LLM's embedding width."""

from __future__ import annotations

import torch
from torch import nn

from nvlm_export.models.config import ProjectorConfig


class MlpProjector(nn.Module):
    """NVLM-D / InternVL 2-layer MLP: LayerNorm(4Dv) -> Linear -> GELU -> Linear(-> D_llm).

    NVLM-D-72B: no biases, middle width = the LLM's intermediate size. InternVL: biases, middle
    width = D_llm. The reference stores it as an nn.Sequential (keys mlp1.0, mlp1.1, mlp1.3).
    """

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.in_features, eps=config.norm_eps)
        self.fc1 = nn.Linear(config.in_features, config.hidden_features, bias=config.bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.hidden_features, config.out_features, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., 4Dv) -> (..., D_llm)
        return self.fc2(self.act(self.fc1(self.norm(x))))


class LinearProjector(nn.Module):
    """NVLM-X / NVLM-H tile projector: the paper's 1-layer MLP, 4Dv -> D_llm."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., 4Dv) -> (..., D_llm)
        return self.fc(x)
