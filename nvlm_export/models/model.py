"""NVLM-D and InternVL: a LLaVA-style decoder-only vision-language model.

    features = Projector(PixelShuffle(InternViT(tiles)[:, 1:]))     (N, 256, D_llm)
    embeds   = Embed(input_ids); embeds[input_ids == image_token] = features, in order
    logits   = Decoder(embeds)

The same module serves NVLM-D (6B-style ViT, bias-free projector with the LLM's intermediate width)
and InternVL (300M-style ViT, projector with biases); the differences live in `ModelConfig`.
NVLM-X / NVLM-H (`cross_model.py`) share `VisionLanguageBase` and its `VisionTower`, which then
also carries their 1-layer tile projector; `build_model` builds the class the layout's family
names (`ArchitectureSpec.model`).
"""

from __future__ import annotations

from typing import TypeAlias

import torch
from torch import nn
from transformers import PreTrainedModel

from nvlm_export.errors import PromptError
from nvlm_export.models.config import ModelConfig
from nvlm_export.models.families.spec import resolve
from nvlm_export.models.language import build_decoder
from nvlm_export.models.projector import LinearProjector, MlpProjector
from nvlm_export.models.registry import architecture_of
from nvlm_export.models.vision import InternViT, layers_for_select_layer, pixel_shuffle


class VisionTower(nn.Module):
    """Tiles -> LLM-width image tokens: InternViT, drop CLS, pixel shuffle, projector.

    pixel_values (N, 3, 448, 448) -> (N, 256, D_llm). This is the exporter's vision graph.
    `projector` (the 2-layer MLP into the decoder sequence) is None for NVLM-X; `cross_projector`
    (the 1-layer MLP into the cross-attention sequence) exists for NVLM-X/H only.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.downsample_ratio = config.downsample_ratio
        self.num_layers = layers_for_select_layer(config.select_layer, config.vision.num_layers)
        self.vit = InternViT(config.vision)
        self.projector = MlpProjector(config.projector) if config.projector else None
        cross = config.cross_projector
        self.cross_projector = (
            LinearProjector(cross.in_features, cross.out_features, cross.bias) if cross else None
        )

    def tile_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, 448, 448) -> pixel-shuffled ViT tokens (N, 256, 4Dv), before any projector."""
        hidden = self.vit(pixel_values, num_layers=self.num_layers)  # (N, 1 + 1024, Dv)
        patches = hidden[:, 1:]  # drop CLS: (N, 1024, Dv)
        n, t, c = patches.shape
        side = int(t**0.5)
        grid = pixel_shuffle(patches.reshape(n, side, side, c), self.downsample_ratio)
        return grid.reshape(n, -1, grid.shape[-1])  # (N, 256, 4Dv), row-major over 16x16

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.projector is None:
            raise PromptError(
                "This model has no projector into the decoder sequence",
                why="NVLM-X image tokens reach the decoder only through cross-attention",
            )
        return self.projector(self.tile_tokens(pixel_values))  # (N, 256, D_llm)


class VisionLanguageBase(nn.Module):
    """What every family's model has: the vision tower, the transformers decoder, the config."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = VisionTower(config)
        self.language_model: PreTrainedModel = build_decoder(config.llm_config)

    @property
    def image_token_id(self) -> int:
        if self.config.image_token_id is None:
            raise PromptError(
                "The model does not know its image placeholder token id",
                fix="Load it with load_checkpoint (it reads the tokenizer) or set image_token_id",
            )
        return int(self.config.image_token_id)

    @property
    def embed_tokens(self) -> nn.Embedding:
        """The token embedding table (kept outside the decoder graph by the exporter)."""
        return self.language_model.get_input_embeddings()


class VisionLanguageModel(VisionLanguageBase):
    """NVLM-D / InternVL for conditional generation, on token ids and image tiles."""

    @property
    def decoder(self) -> PreTrainedModel:
        """The transformers decoder (Qwen2ForCausalLM / LlamaForCausalLM), fed inputs_embeds."""
        return self.language_model

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, 448, 448) tiles -> (N, 256, D_llm) image tokens."""
        return self.vision(pixel_values)

    def input_embeddings(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings (B, T, D) with image placeholders overwritten by image features."""
        embeds = self.embed_tokens(input_ids)  # (B, T, D)
        if pixel_values is None:
            return embeds
        features = self.image_features(pixel_values).to(embeds.dtype)  # (N, 256, D)
        slots = input_ids == self.image_token_id  # (B, T)
        wanted, given = int(slots.sum()), features.shape[0] * features.shape[1]
        if wanted != given:
            raise PromptError(
                f"The prompt has {wanted} image placeholder tokens but the tiles give {given}",
                why=f"each tile fills {features.shape[1]} placeholders, in order",
                fix="Build the prompt from the same tiling as the pixel values",
            )
        return embeds.masked_scatter(slots.unsqueeze(-1), features.reshape(-1, embeds.shape[-1]))

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """input_ids (B, T) [+ tiles (N, 3, 448, 448)] -> logits (B, T, vocab), or of the last
        `logits_to_keep` positions (0: all; T x vocab floats are over 1 GB for a 2k-token
        prompt and a 150k vocabulary)."""
        embeds = self.input_embeddings(input_ids, pixel_values)
        output = self.language_model(
            inputs_embeds=embeds, use_cache=False, logits_to_keep=logits_to_keep
        )
        return output.logits


# Any model `build_model` makes: decoder-only (NVLM-D, InternVL) or cross-attention (NVLM-X/H).
AnyVisionLanguageModel: TypeAlias = VisionLanguageBase


def build_model(config: ModelConfig) -> AnyVisionLanguageModel:
    """A randomly initialised model for `config`, in eval mode (build under torch.device('meta')
    to get shapes without memory). The class is the one the layout's family names."""
    model_class: type[VisionLanguageBase] = resolve(architecture_of(config.layout).model)
    return model_class(config).eval()
