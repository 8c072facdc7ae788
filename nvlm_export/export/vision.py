"""The vision graph: image tiles -> LLM-width image tokens, in one ONNX graph.

    pixel_values [tiles, 3, S, S] -> InternViT -> drop CLS -> pixel shuffle -> projector(s)
                                  -> image_features and/or cross_features [tiles, 256, D]

The tile count is the graph's one dynamic axis (TensorRT builds one optimisation profile over it).
Which outputs exist is the architecture's choice (see `export/architectures.py`): NVLM-D and
InternVL splice `image_features` into the decoder sequence, NVLM-X feeds `cross_features` to its
cross-attention, NVLM-H produces both (thumbnail -> decoder, regular tiles -> cross-attention).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from nvlm_export.export.decoder import NUMPY_DTYPE
from nvlm_export.export.onnx_utils import (
    GraphIO,
    TensorIO,
    external_data_name,
    needs_external_data,
    trace_to_onnx,
)
from nvlm_export.runtime.manifest import PIXEL_VALUES

if TYPE_CHECKING:
    from nvlm_export.export.weights import CheckpointWeights


class VisionGraph(nn.Module):
    """One shared vision trunk, then one projector head per declared output.

    `tower.tile_tokens` maps pixel_values to pixel-shuffled ViT tokens (tiles, 256, 4Dv) once;
    `heads` maps each graph output name to the projector that turns them into (tiles, 256, D).
    """

    def __init__(self, tower: nn.Module, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.tower = tower
        self.names = tuple(heads)
        self.heads = nn.ModuleList(heads.values())

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tokens = self.tower.tile_tokens(pixel_values)  # (tiles, 256, 4Dv)
        return tuple(head(tokens) for head in self.heads)


def export_vision_onnx(
    graph: VisionGraph,
    path: Path,
    *,
    tile_size: int,
    tokens_per_tile: int,
    hidden_size: int,
    opset: int,
    weights: CheckpointWeights | None = None,
) -> GraphIO:
    """Trace `graph` to `path` with a dynamic tile count; returns its interface for the manifest.
    `weights`: where a skeleton's weights come from (`trace_to_onnx`)."""
    dtype = next(graph.parameters()).dtype
    name = NUMPY_DTYPE[dtype]
    external = needs_external_data(graph)
    io = GraphIO(
        file=path.name,
        external_data=external_data_name(path) if external else None,
        opset=opset,
        inputs=(TensorIO(PIXEL_VALUES, name, ("tiles", 3, tile_size, tile_size)),),
        outputs=tuple(
            TensorIO(output, name, ("tiles", tokens_per_tile, hidden_size))
            for output in graph.names
        ),
    )
    from torch.export import Dim

    # Two tiles: torch.export specialises sizes 0 and 1, and the axis must stay symbolic.
    example = torch.randn(2, 3, tile_size, tile_size, dtype=dtype)
    return trace_to_onnx(
        graph.eval(),
        (example,),
        path,
        io=io,
        dynamic_shapes=({0: Dim("tiles", min=1)},),
        what="vision encoder",
        weights=weights,
    )
