"""Per-architecture export knowledge, declared once per architecture.

Generic export code (`export/bundle.py`, `export/reference.py`) asks the entry for its checkpoint's
layout and never branches on a name. The family's `ArchitectureSpec` (models/families/) declares
the prompt format stored in the manifest, the vision graph's outputs and which graph holds each
parameter; its `ExportHooks`, named by the spec, say:

- how to export the decoder (and, for cross-attention models, the cross_kv graph);
- how the PyTorch reference computes next-token logits for export validation and `verify`.

Both reference hooks feed the decoder through `prefill_in_chunks`, the one place that decides how
many tokens a reference decoder call takes (why: export/reference.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import Cache, DynamicCache, PretrainedConfig

from nvlm_export.export.decoder import LanguageExport, export_decoder_onnx
from nvlm_export.export.onnx_utils import GraphIO
from nvlm_export.models.families.spec import ArchitectureSpec, resolve
from nvlm_export.models.registry import architecture_of
from nvlm_export.runtime.manifest import DECODER_GRAPH
from nvlm_export.runtime.prompt import PromptFormat, PromptTokens

Tiles = list[torch.Tensor]  # the tiles of each image, [N, 3, S, S]
# (model, prompt, token ids so far [1, T], tiles, tokens per decoder call or None) -> logits [V]
ReferenceLogits = Callable[[nn.Module, PromptTokens, torch.Tensor, Tiles, int | None], torch.Tensor]
# (rows of the sequence, the cache holding every row before them) -> logits [V] of the last row
DecodeRows = Callable[[slice, Cache], torch.Tensor]


@dataclass(frozen=True)
class ExportHooks:
    """The PyTorch-side code a family's export needs, named by its `ArchitectureSpec.export`."""

    export_language: Callable[[LanguageExport], dict[str, GraphIO]]
    reference_logits: ReferenceLogits


@dataclass(frozen=True)
class ArchitectureExport:
    """One family's declared facts (`spec`) with its export code (`hooks`)."""

    spec: ArchitectureSpec
    hooks: ExportHooks

    @property
    def name(self) -> str:
        return self.spec.name  # the manifest's `architecture`

    @property
    def prompt_format(self) -> PromptFormat:
        return self.spec.prompt_format

    def vision_outputs(self, model: nn.Module) -> dict[str, nn.Module]:
        """Vision graph output name -> the projector that computes it from the tile tokens."""
        return {output: getattr(model.vision, name) for output, name in self.spec.vision_outputs}

    def graph_of(self, parameter: str) -> str:
        return self.spec.graph_of(parameter)


def _decoder_only_language(request: LanguageExport) -> dict[str, GraphIO]:
    io = export_decoder_onnx(
        request.model.language_model,
        request.bundle / "decoder.onnx",
        dtype=request.dtype,
        opset=request.opset,
        max_context=request.max_context,
        weights=request.weights,
    )
    return {DECODER_GRAPH: io}


def prefill_in_chunks(
    config: PretrainedConfig, length: int, decode_rows: DecodeRows, chunk_tokens: int | None
) -> torch.Tensor:
    """The logits [V] after `length` rows, decoded `chunk_tokens` rows at a time (None: in one
    call) into a new transformers cache. The cache lives for this call only: the reference never
    shares one with the bundle or with its next step."""
    step = chunk_tokens or length
    cache = DynamicCache(config=config)
    for start in range(0, length, step):
        logits = decode_rows(slice(start, start + step), cache)
    return logits


def _decoder_only_reference(
    model: nn.Module, prompt: PromptTokens, token_ids: Tensor, images: Tiles, chunk: int | None
) -> torch.Tensor:
    """NVLM-D / InternVL: image features overwrite the placeholder embeddings, in order."""
    pixel_values = torch.cat(images) if images else None
    embeds = model.input_embeddings(token_ids, pixel_values)  # (1, T, D)
    lm = model.language_model

    def decode_rows(rows: slice, cache: Cache) -> torch.Tensor:
        out = lm(inputs_embeds=embeds[:, rows], cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]

    return prefill_in_chunks(lm.config, embeds.shape[1], decode_rows, chunk)


DECODER_ONLY = ExportHooks(
    export_language=_decoder_only_language, reference_logits=_decoder_only_reference
)


def architecture_for_layout(layout: str) -> ArchitectureExport:
    """The export of the family a checkpoint layout belongs to."""
    spec = architecture_of(layout)
    return ArchitectureExport(spec, resolve(spec.export))
