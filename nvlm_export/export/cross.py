"""NVLM-X and NVLM-H export: the cross_kv graph, the cross-attention decoder graph, their hooks.

A cross-attention bundle has three graphs:

    vision    pixel_values [tiles, 3, S, S] -> cross_features (1-layer projector)
                                               (+ NVLM-H: image_features, the 2-layer MLP)
    cross_kv  cross_embeds [batch, cross, D] -> cross_kv.{j}.key / .value [batch, KV, cross, hd]
              for every block j: run ONCE per request
    decoder   inputs_embeds, position_ids, past_key_values.*, cross_kv.{j}.*, cross_attention_mask
              [batch, seq, cross] bool -> logits, present.*

The decoder reads the cross keys/values as inputs on every step; it never recomputes them, so a
decode step costs the text KV cache plus one attention over K entries per block. Each gated block
is written with the decoder export's own building blocks (`rms_norm`, `attention`, `swiglu`) and
computes what `models/cross_attention.py` computes, independently (the PyTorch reference is what
validation compares against).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import Cache

from nvlm_export.errors import ExportError
from nvlm_export.export.architectures import ExportHooks, Tiles, prefill_in_chunks
from nvlm_export.export.decoder import (
    DTYPES,
    NUMPY_DTYPE,
    DecoderSpec,
    ExportableDecoder,
    LanguageExport,
    attention,
    check_weights_dtype,
    rms_norm,
    swiglu,
    trace_decoder,
)
from nvlm_export.export.onnx_utils import (
    GraphIO,
    TensorIO,
    external_data_name,
    needs_external_data,
    trace_to_onnx,
)
from nvlm_export.models.config import CrossAttentionConfig
from nvlm_export.runtime.manifest import (
    CROSS_ATTENTION_MASK,
    CROSS_EMBEDS,
    CROSS_KEY,
    CROSS_KV_GRAPH,
    CROSS_VALUE,
    DECODER_GRAPH,
)
from nvlm_export.runtime.prompt import PromptTokens

CROSS_AXIS = "cross"  # the cross key/value sequence length K (engine_plan.CROSS_AXES)
CrossKV = list[tuple[torch.Tensor, torch.Tensor]]  # per block: key, value (B, KV, K, hd)


def cross_kv_names(num_blocks: int) -> list[str]:
    """The cross_kv graph's outputs, which are also the decoder's inputs of the same name."""
    return [name.format(block=j) for j in range(num_blocks) for name in (CROSS_KEY, CROSS_VALUE)]


def _pairs(flat: tuple[torch.Tensor, ...]) -> CrossKV:
    return list(zip(flat[0::2], flat[1::2], strict=True))


# --------------------------------------------------------------------------------------------
# cross_kv: the cross sequence -> every block's keys and values
# --------------------------------------------------------------------------------------------


class CrossKVGraph(nn.Module):
    """cross_embeds (B, K, D) -> key₀, value₀, key₁, ... each (B, KV, K, hd), no rotary."""

    def __init__(self, blocks: nn.ModuleList, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.blocks = blocks  # shared, not copied
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim

    def forward(self, cross_embeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch, length, _ = cross_embeds.shape
        shape = (batch, length, self.num_kv_heads, self.head_dim)

        def heads(projection: nn.Module) -> torch.Tensor:  # (B, K, KV·hd) -> (B, KV, K, hd)
            return projection(cross_embeds).reshape(shape).transpose(1, 2)

        return tuple(
            heads(projection)
            for block in self.blocks
            for projection in (block.cross_attn.k_proj, block.cross_attn.v_proj)
        )

    def graph_io(self, file: str, external_data: str | None, opset: int, hidden: int) -> GraphIO:
        dtype = NUMPY_DTYPE[next(self.parameters()).dtype]
        kv_shape = ("batch", self.num_kv_heads, CROSS_AXIS, self.head_dim)
        return GraphIO(
            file,
            external_data,
            opset,
            inputs=(TensorIO(CROSS_EMBEDS, dtype, ("batch", CROSS_AXIS, hidden)),),
            outputs=tuple(
                TensorIO(name, dtype, kv_shape) for name in cross_kv_names(len(self.blocks))
            ),
        )


# --------------------------------------------------------------------------------------------
# The decoder with gated cross-attention blocks between its layers
# --------------------------------------------------------------------------------------------


def gated_cross_block(
    block: nn.Module,
    hidden: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """hidden (B, T, D), key/value (B, KV, K, hd), mask bool (B, T, K) -> (B, T, D).

        h = h + tanh(g_attn) · r ⊙ CrossAttn(RMSNorm(h));  h = h + tanh(g_mlp) · r ⊙ MLP(RMSNorm(h))
    with r = "row sees at least one entry": fully masked rows pass through unchanged.
    """
    batch, seq, _ = hidden.shape
    head_dim = key.shape[-1]
    sees_image = mask.any(dim=-1, keepdim=True).to(hidden.dtype)  # (B, T, 1)
    attn = block.cross_attn
    x = rms_norm(hidden, block.input_layernorm.weight, eps)
    q = attn.q_proj(x).reshape(batch, seq, -1, head_dim).transpose(1, 2)  # (B, H, T, hd)
    out = attention(q, key, value, mask[:, None, None])  # (B, H, T, hd)
    out = attn.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))  # (B, T, D)
    hidden = hidden + block.attn_gate.tanh() * sees_image * out
    mlp_out = swiglu(rms_norm(hidden, block.post_attention_layernorm.weight, eps), block.mlp)
    return hidden + block.mlp_gate.tanh() * sees_image * mlp_out


class CrossAttentionDecoder(ExportableDecoder):
    """`ExportableDecoder` plus cross K/V and mask inputs and the gated blocks between layers.

    forward(inputs_embeds, position_ids, *past, *cross_kv, cross_attention_mask)
        -> (logits, *present); the base class passes the inputs after `past` to `between_layers`.
    """

    def __init__(self, lm: nn.Module, blocks: nn.ModuleList, cross: CrossAttentionConfig) -> None:
        super().__init__(lm)
        if len(blocks) != cross.num_blocks:
            raise ExportError(
                f"The model has {len(blocks)} cross-attention blocks, its config implies "
                f"{cross.num_blocks}"
            )
        self.blocks = blocks  # shared, not copied
        self.cross = cross

    def between_layers(
        self, index: int, hidden: torch.Tensor, extra: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        """A gated cross block after every k-th decoder layer; `extra` = the graph's
        cross_kv.{j}.key/value inputs, then cross_attention_mask."""
        block = self.cross.block_after(index)
        if block is None:
            return hidden
        key, value = _pairs(extra[:-1])[block]
        return gated_cross_block(
            self.blocks[block], hidden, key, value, extra[-1], self.spec.rms_norm_eps
        )

    # ---- graph interface -------------------------------------------------------------------

    def graph_io(self, file: str, external_data: str | None, opset: int) -> GraphIO:
        base = super().graph_io(file, external_data, opset)
        spec, dtype = self.spec, NUMPY_DTYPE[self.dtype]
        kv_shape = ("batch", spec.num_kv_heads, CROSS_AXIS, spec.head_dim)
        cross_inputs = (
            *(TensorIO(name, dtype, kv_shape) for name in cross_kv_names(self.cross.num_blocks)),
            TensorIO(CROSS_ATTENTION_MASK, "bool", ("batch", "seq", CROSS_AXIS)),
        )
        return GraphIO(file, external_data, opset, base.inputs + cross_inputs, base.outputs)

    def example_inputs(
        self, batch: int = 2, seq: int = 3, past: int = 4, cross: int = 5
    ) -> tuple[torch.Tensor, ...]:
        """Base inputs plus distinct cross K/V tensors and a mask; sizes >= 2 stay symbolic."""
        spec, dtype = self.spec, self.dtype
        kv_shape = (batch, spec.num_kv_heads, cross, spec.head_dim)
        cross_kv = [torch.zeros(kv_shape, dtype=dtype) for _ in range(2 * self.cross.num_blocks)]
        mask = torch.ones(batch, seq, cross, dtype=torch.bool)
        return (*super().example_inputs(batch, seq, past), *cross_kv, mask)

    def dynamic_shapes(self) -> tuple[Any, ...]:
        """batch, seq, past and cross are symbolic; shared axes use one Dim object each."""
        from torch.export import Dim

        batch, seq, past = Dim("batch", min=1), Dim("seq", min=1), Dim("past", min=0)
        cross = Dim(CROSS_AXIS, min=1)
        kv_axes = {0: batch, 2: past}
        cross_axes = {0: batch, 2: cross}
        rest = (
            *[kv_axes] * (2 * self.spec.num_layers),
            *[cross_axes] * (2 * self.cross.num_blocks),
            {0: batch, 1: seq, 2: cross},
        )
        return ({0: batch, 1: seq}, {0: batch, 1: seq}, rest)


# --------------------------------------------------------------------------------------------
# Export entry points and the hooks the NVLM-X/H specs name
# --------------------------------------------------------------------------------------------


def export_cross_kv_onnx(request: LanguageExport) -> GraphIO:
    """Trace the cross_kv graph (dynamic batch and cross length) into the bundle."""
    from torch.export import Dim

    model, path = request.model, request.bundle / "cross_kv.onnx"
    spec = DecoderSpec.from_model(model.language_model)
    graph = CrossKVGraph(model.cross_layers, spec.num_kv_heads, spec.head_dim).eval()
    check_weights_dtype(graph, request.dtype)
    hidden = spec.hidden_size
    external = needs_external_data(graph)
    io = graph.graph_io(
        path.name, external_data_name(path) if external else None, request.opset, hidden
    )
    example = torch.zeros(2, 5, hidden, dtype=DTYPES[request.dtype])
    axes = ({0: Dim("batch", min=1), 1: Dim(CROSS_AXIS, min=1)},)
    return trace_to_onnx(
        graph,
        (example,),
        path,
        io=io,
        dynamic_shapes=axes,
        what="cross_kv graph",
        weights=request.weights,
    )


def export_cross_decoder_onnx(request: LanguageExport) -> GraphIO:
    """Trace the decoder with its gated cross-attention blocks into the bundle."""
    model = request.model
    decoder = CrossAttentionDecoder(
        model.language_model, model.cross_layers, model.cross_attention
    ).eval()
    path = request.bundle / "decoder.onnx"
    return trace_decoder(
        decoder,
        path,
        request.dtype,
        request.opset,
        request.max_context,
        request.weights,
        "cross-attention decoder",
    )


def _cross_language(request: LanguageExport) -> dict[str, GraphIO]:
    return {
        CROSS_KV_GRAPH: export_cross_kv_onnx(request),
        DECODER_GRAPH: export_cross_decoder_onnx(request),
    }


def _cross_reference(
    model: nn.Module, prompt: PromptTokens, token_ids: Tensor, images: Tiles, chunk: int | None
) -> torch.Tensor:
    """Next-token logits [V] from the PyTorch model: images and cross keys/values once, then the
    decoder over the text rows in chunks (`prefill_in_chunks`), each chunk with its mask rows."""
    embeds, cross_kv, mask = model.decoder_inputs(token_ids, images, prompt)

    def decode_rows(rows: slice, cache: Cache) -> torch.Tensor:
        return model.decode(embeds[:, rows], cross_kv, mask[:, rows], 1, cache)[0, -1]

    config = model.language_model.config
    return prefill_in_chunks(config, embeds.shape[1], decode_rows, chunk)


CROSS_ATTENTION = ExportHooks(
    export_language=_cross_language,
    reference_logits=_cross_reference,
)
