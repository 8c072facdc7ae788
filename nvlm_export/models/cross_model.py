"""NVLM-X and NVLM-H: a decoder with gated cross-attention blocks between its layers.

    tokens_i   = PixelShuffle(InternViT(tiles_i)[:, 1:])                       (n_i, 256, 4Dv)
    embeds     = Embed(input_ids); NVLM-H: embeds[decoder slots] = MLP2(tokens)  (1, T, D)
    cross      = Embed(cross_token_ids); cross[cross slots] = Linear(tokens)     (1, K, D)
    kᵢ, vᵢ     = block_i.key_value(cross)                        once per request, (1, KV, K, hd)
    h          = embeds
    for layer ℓ: h = DecoderLayer_ℓ(h);  after every k-th layer: h = CrossBlock_j(h, kⱼ, vⱼ, M)
    logits     = lm_head(norm(h))

NVLM-X: every tile (thumbnail included) goes through the 1-layer projector into the cross
sequence; the decoder text holds only the tile tags. NVLM-H: the thumbnail (or the only tile) goes
through the 2-layer MLP into the decoder sequence, the regular tiles through the 1-layer projector
into the cross sequence, after their tag tokens' embeddings. Where each tile goes is the prompt's
business (`PromptTokens` slots and positions); one model class serves both.

The decoder layers, rotary embedding and causal mask are transformers' own (Qwen2 / Llama), run in
our loop so the cross blocks can sit between them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from transformers import Cache
from transformers.masking_utils import create_causal_mask

from nvlm_export.errors import PromptError
from nvlm_export.models.config import CrossAttentionConfig, ModelConfig
from nvlm_export.models.cross_attention import CrossBlockShape, GatedCrossAttentionBlock
from nvlm_export.models.model import VisionLanguageBase
from nvlm_export.runtime.prompt import PromptTokens, Slot

CrossKV = list[tuple[torch.Tensor, torch.Tensor]]  # per block: key, value (B, KV, K, hd)


class CrossAttentionVisionLanguageModel(VisionLanguageBase):
    """NVLM-X / NVLM-H for conditional generation, on token ids, image tiles and the prompt."""

    def __init__(self, config: ModelConfig) -> None:
        if config.cross_attention is None:
            raise PromptError(  # a programming error: the layout declares cross-attention
                f"The {config.layout} config has no cross-attention settings"
            )
        super().__init__(config)
        shape = CrossBlockShape.from_llm_config(config.llm_config)
        self.cross_layers = nn.ModuleList(
            GatedCrossAttentionBlock(shape) for _ in range(config.cross_attention.num_blocks)
        )

    @property
    def cross_attention(self) -> CrossAttentionConfig:
        assert self.config.cross_attention is not None  # checked in __init__
        return self.config.cross_attention

    # --- inputs ---------------------------------------------------------------------------------

    def input_embeddings(
        self, input_ids: torch.Tensor, tokens: Sequence[torch.Tensor], prompt: PromptTokens
    ) -> torch.Tensor:
        """Token embeddings (1, T, D); NVLM-H: the 2-layer MLP's features at the decoder slots."""
        embeds = self.embed_tokens(input_ids)  # (1, T, D)
        if prompt.decoder_feature_slots:
            features = self._project(self.vision.projector, tokens, prompt.decoder_feature_slots)
            positions = torch.from_numpy(prompt.decoder_feature_positions)
            embeds[0, positions] = features.to(embeds.dtype)
        return embeds

    def cross_embeddings(
        self, tokens: Sequence[torch.Tensor], prompt: PromptTokens
    ) -> torch.Tensor:
        """The cross key/value sequence (1, K, D): tag embeddings and 1-layer-projected tiles."""
        cross = self.embed_tokens(torch.from_numpy(prompt.cross_token_ids)[None])  # (1, K, D)
        if prompt.cross_feature_slots:
            projector, slots = self.vision.cross_projector, prompt.cross_feature_slots
            features = self._project(projector, tokens, slots)
            positions = torch.from_numpy(prompt.cross_feature_positions)
            cross[0, positions] = features.to(cross.dtype)
        return cross

    def cross_key_values(self, cross: torch.Tensor) -> CrossKV:
        """Every block's key and value from the cross sequence (the export's cross_kv graph)."""
        return [block.key_value(cross) for block in self.cross_layers]

    @staticmethod
    def _project(
        projector: nn.Module | None, tokens: Sequence[torch.Tensor], slots: Sequence[Slot]
    ) -> torch.Tensor:
        if projector is None:
            raise PromptError(
                "The prompt places image features where this model has no projector",
                fix="Build the prompt with the model's own prompt format",
            )
        chosen = torch.stack([tokens[image][tile] for image, tile in slots])  # (S, 256, 4Dv)
        return projector(chosen).flatten(0, 1)  # (S·256, D)

    # --- the decoder ----------------------------------------------------------------------------

    def decode(
        self,
        embeds: torch.Tensor,
        cross_kv: CrossKV,
        mask: torch.Tensor,
        logits_to_keep: int = 0,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """embeds (B, T, D), per-block cross key/value, mask bool (B, T, K) -> logits (B, T, V),
        or of the last `logits_to_keep` positions (0: all). With a transformers `cache` holding
        the positions before `embeds`, the rows continue them and are added to it; the cross
        blocks need no cache (their keys and values are `cross_kv`, whole)."""
        lm = self.language_model.model
        past = cache.get_seq_length() if cache is not None else 0
        positions = torch.arange(past, past + embeds.shape[1])[None]  # (1, T)
        causal = create_causal_mask(
            config=lm.config,
            inputs_embeds=embeds,
            attention_mask=None,
            cache=cache,
            position_ids=positions,
        )
        rotary = lm.rotary_emb(embeds, positions)  # (cos, sin)
        hidden = embeds
        for index, layer in enumerate(lm.layers):
            hidden = layer(
                hidden,
                attention_mask=causal,
                position_ids=positions,
                position_embeddings=rotary,
                cache=cache,
                use_cache=cache is not None,
            )
            block = self.cross_attention.block_after(index)
            if block is not None:
                key, value = cross_kv[block]
                hidden = self.cross_layers[block](hidden, key, value, mask)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.language_model.lm_head(lm.norm(hidden))

    def encode_images(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each image's tiles (n_i, 3, 448, 448) -> pixel-shuffled ViT tokens (n_i, 256, 4Dv)."""
        return [self.vision.tile_tokens(tiles) for tiles in images]

    def decoder_inputs(
        self, input_ids: torch.Tensor, images: Sequence[torch.Tensor], prompt: PromptTokens
    ) -> tuple[torch.Tensor, CrossKV, torch.Tensor]:
        """What `decode` takes for input_ids (1, T), each image's tiles (n_i, 3, 448, 448) and
        the prompt: embeds (1, T, D), every block's cross key/value, the mask (1, T, K).

        `input_ids` starts with the prompt's ids and may continue with generated tokens; their
        cross-attention mask rows repeat the prompt's last row (they come after every image).
        """
        _check_prompt_prefix(input_ids, prompt)
        tokens = self.encode_images(images)
        embeds = self.input_embeddings(input_ids, tokens, prompt)
        cross_kv = self.cross_key_values(self.cross_embeddings(tokens, prompt))
        mask = extended_cross_mask(prompt, input_ids.shape[1])[None]  # (1, T, K)
        return embeds, cross_kv, mask

    def forward(
        self,
        input_ids: torch.Tensor,
        images: Sequence[torch.Tensor],
        prompt: PromptTokens,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """input_ids (1, T), each image's tiles (n_i, 3, 448, 448), the prompt -> (1, T, V), or
        (1, logits_to_keep, V) for the last positions (0: all); see `decoder_inputs`."""
        embeds, cross_kv, mask = self.decoder_inputs(input_ids, images, prompt)
        return self.decode(embeds, cross_kv, mask, logits_to_keep)


def extended_cross_mask(prompt: PromptTokens, length: int) -> torch.Tensor:
    """The prompt's mask (T0, K) grown to `length` rows by repeating its last row."""
    mask = prompt.cross_attention_mask
    extra = length - mask.shape[0]
    if extra > 0:
        mask = np.concatenate([mask, np.repeat(mask[-1:], extra, axis=0)])
    return torch.from_numpy(np.ascontiguousarray(mask[:length]))


def _check_prompt_prefix(input_ids: torch.Tensor, prompt: PromptTokens) -> None:
    prompt_ids = torch.from_numpy(prompt.input_ids)
    given = input_ids[0, : len(prompt_ids)]
    if input_ids.shape[0] != 1 or not torch.equal(given, prompt_ids):
        raise PromptError(
            "The token ids do not start with the prompt's ids",
            why="image slots and the cross-attention mask are positions in that prompt",
            fix="Pass input_ids = prompt.input_ids (+ generated tokens), batch size 1",
        )
