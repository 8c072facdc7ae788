"""Per-architecture export knowledge, declared once per architecture.

Generic export code (`export/bundle.py`, `export/reference.py`) asks the entry for its checkpoint's
layout and never branches on a name. An entry says:

- which prompt format the runtime uses (stored in the manifest);
- which vision outputs the vision graph has, and the modules that compute them;
- how to export the decoder (and, for cross-attention models, the cross_kv graph);
- how the PyTorch reference computes next-token logits for export validation and `verify`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nvlm_export.errors import CheckpointError
from nvlm_export.export.decoder import export_decoder_onnx
from nvlm_export.export.onnx_utils import GraphIO
from nvlm_export.runtime.manifest import DECODER_GRAPH, IMAGE_FEATURES, VISION_GRAPH
from nvlm_export.runtime.prompt import INTERNVL, NVLM_D, PromptFormat, PromptTokens

if TYPE_CHECKING:
    from nvlm_export.export.weights import CheckpointWeights

# (model, prompt, token ids so far [1, T], tiles of every image [N, 3, S, S] or None) -> logits [V]
ReferenceLogits = Callable[
    [nn.Module, PromptTokens, torch.Tensor, list[torch.Tensor]], torch.Tensor
]


@dataclass(frozen=True)
class ArchitectureExport:
    name: str  # the manifest's `architecture`
    prompt_format: PromptFormat
    # vision graph output name -> the projector that computes it from the tower's tile tokens
    vision_outputs: Callable[[nn.Module], dict[str, nn.Module]]
    # writes the decoder (and cross_kv) graphs into a bundle directory:
    # (model, bundle, dtype, opset, max_context, weights of a skeleton model or None)
    export_language: Callable[
        [nn.Module, Path, str, int, int, CheckpointWeights | None], dict[str, GraphIO]
    ]
    reference_logits: ReferenceLogits
    # facts the runtime strategy reads from manifest.extras (cross-attention layout)
    manifest_extras: Callable[[nn.Module], dict[str, Any]] = lambda model: {}
    # which bundle graph (or the "embedding" table) holds each state-dict entry: (name pattern,
    # graph), first match wins; the memory plan (export/memory_plan.py) sizes graphs from it
    graph_parameters: tuple[tuple[str, str], ...] = (
        (r"vision\..*", VISION_GRAPH),
        (r"language_model\.model\.embed_tokens\..*", "embedding"),
        (r".*", DECODER_GRAPH),
    )

    def graph_of(self, parameter: str) -> str:
        return next(g for pattern, g in self.graph_parameters if re.fullmatch(pattern, parameter))


def _decoder_only_language(
    model: nn.Module,
    bundle: Path,
    dtype: str,
    opset: int,
    max_context: int,
    weights: CheckpointWeights | None,
) -> dict[str, GraphIO]:
    io = export_decoder_onnx(
        model.language_model,
        bundle / "decoder.onnx",
        dtype=dtype,
        opset=opset,
        max_context=max_context,
        weights=weights,
    )
    return {"decoder": io}


def _decoder_only_reference(
    model: nn.Module,
    prompt: PromptTokens,
    token_ids: torch.Tensor,
    images: list[torch.Tensor],
) -> torch.Tensor:
    """NVLM-D / InternVL: image features overwrite the placeholder embeddings, in order."""
    pixel_values = torch.cat(images) if images else None
    return model(token_ids, pixel_values, logits_to_keep=1)[0, -1]


DECODER_ONLY = dict(
    vision_outputs=lambda model: {IMAGE_FEATURES: model.vision.projector},
    export_language=_decoder_only_language,
    reference_logits=_decoder_only_reference,
)

ARCHITECTURES: dict[str, ArchitectureExport] = {
    "nvlm-d": ArchitectureExport("nvlm-d", NVLM_D, **DECODER_ONLY),
    "internvl": ArchitectureExport("internvl", INTERNVL, **DECODER_ONLY),
}

# Checkpoint layout -> architecture. Both InternVL layouts are the same architecture.
LAYOUT_ARCHITECTURE = {
    "nvlm-d": "nvlm-d",
    "internvl": "internvl",
    "internvl-hf": "internvl",
    "nvlm-x": "nvlm-x",
    "nvlm-h": "nvlm-h",
}


def register_architecture(entry: ArchitectureExport) -> None:
    ARCHITECTURES[entry.name] = entry


def architecture_for_layout(layout: str) -> ArchitectureExport:
    name = LAYOUT_ARCHITECTURE.get(layout)
    if name is None or name not in ARCHITECTURES:
        raise CheckpointError(
            f"Checkpoint layout '{layout}' cannot be exported yet",
            why=f"exportable architectures are {sorted(ARCHITECTURES)}",
        )
    return ARCHITECTURES[name]


# NVLM-X / NVLM-H register themselves (imported last: that module builds on the names above).
import nvlm_export.export.cross  # noqa: E402, F401
