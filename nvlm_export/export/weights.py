"""Streamed export: graphs traced without weights, initializers written from the checkpoint.

    config.json ──▶ model skeleton (FakeTensor parameters: shapes and dtypes, no memory)
                        └──trace──▶ ONNX graph whose parameter initializers have no values yet
    safetensors shards ──one tensor at a time, cast to the export dtype──▶ <graph>.onnx(.data)

`CheckpointWeights` gives each parameter initializer a lazy value (`StreamedWeight`) that reads
its stored tensor(s) through the checkpoint's key map when the file is written, and forgets it
again. The exporter's optimizer folds every `Transpose` of a weight into a transposed copy of it
(MatMul weights are stored [in, out] in the graph, [out, in] in the checkpoint), which would hold
all of them in memory at once; `fold_weight_transposes` makes that fold lazy too, before the
optimizer runs, with the same result (same names, same bytes).

What is resident while a graph is written: the graph structure, and one weight in flight: a
block of rows for a weight written as stored, the whole tensor (stored and converted copies)
for a transposed one. docs/export.md has the whole picture.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from nvlm_export.errors import ExportError
from nvlm_export.models.checkpoint import (
    StoredTensors,
    canonical_parameters,
    default_dtype,
    read_parameter,
    stored_names,
)
from nvlm_export.models.config import ModelConfig
from nvlm_export.models.model import AnyVisionLanguageModel, build_model

# Bytes of one block of rows converted and written at a time (tensors written as stored).
BLOCK_BYTES = 64 * 2**20


def model_skeleton(config: ModelConfig, dtype: torch.dtype) -> AnyVisionLanguageModel:
    """The model `config` describes, with FakeTensor parameters in `dtype`: traceable, and no
    bigger in memory than its Python objects."""
    with default_dtype(dtype), FakeTensorMode():
        return build_model(config)


class CheckpointWeights:
    """The stored values of a skeleton model's parameters, read on demand in the export dtype."""

    def __init__(
        self, model: nn.Module, stored: StoredTensors, layout: str, dtype: torch.dtype
    ) -> None:
        self.stored, self.layout, self.dtype = stored, layout, dtype
        # Parameters are identified by object: a graph's wrapper module names them differently.
        self._keys = {id(t): key for key, t in canonical_parameters(model).items()}

    def key_of(self, tensor: torch.Tensor) -> str:
        key = self._keys.get(id(tensor))
        if key is None:
            raise ExportError(
                f"A traced weight of shape {list(tensor.shape)} is not a checkpoint parameter",
                why="streamed export reads every weight from the checkpoint",
                fix="Report this with the model config",
            )
        return key

    def read(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The whole parameter, in the export dtype."""
        return read_parameter(self.stored, self.layout, key, shape).to(self.dtype)

    def row_blocks(self, key: str, shape: tuple[int, ...]) -> Iterator[torch.Tensor]:
        """The parameter in blocks of rows (about BLOCK_BYTES each), in the export dtype.

        Rows are sliced from the file when the parameter is one stored tensor; a fused one
        (several stored tensors) is read whole and then split.
        """
        names = stored_names(self.layout, key)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
        rows = max(1, BLOCK_BYTES // max(row_bytes, 1))
        if len(names) > 1 or len(shape) < 2:
            whole = self.read(key, shape)
            yield from whole.split(rows)
            return
        for start in range(0, shape[0], rows):
            block = self.stored.get_rows(names[0], start, min(start + rows, shape[0]))
            yield block.reshape(-1, *shape[1:]).to(self.dtype)

    def streamed(self, tensor: torch.Tensor, name: str) -> StreamedWeight:
        return StreamedWeight(self, self.key_of(tensor), tuple(tensor.shape), name)

    def attach(self, model: ir.Model, module: nn.Module) -> None:
        """Give every initializer traced from a FakeTensor parameter of `module` its streamed
        value (the exporter names initializers after the module's parameter names)."""
        tensors = {  # every alias: the exporter may name a shared parameter by any of them
            **dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False)),
        }
        for name, value in model.graph.initializers.items():
            tensor = tensors.get(name)
            if isinstance(tensor, FakeTensor):
                value.const_value = self.streamed(tensor, name)
        require_values(model)


def require_values(model: ir.Model) -> None:
    """Every initializer must have a value the writer can produce."""
    for name, value in model.graph.initializers.items():
        raw = getattr(value.const_value, "raw", None)
        if value.const_value is None or isinstance(raw, FakeTensor):
            raise ExportError(
                f"The traced graph's initializer {name!r} has no value",
                why="it is neither a checkpoint parameter nor a constant of the export code",
                fix="Report this with the model config",
            )


class StreamedWeight(ir.LazyTensor):
    """One parameter as the graph stores it, read from the checkpoint when written.

    Written as stored, it goes to the file a block of rows at a time; `permuted` gives the lazy
    result of a Transpose on it, converted and permuted in one copy.
    """

    def __init__(
        self,
        source: CheckpointWeights,
        key: str,
        shape: tuple[int, ...],
        name: str,
        perm: tuple[int, ...] | None = None,
    ) -> None:
        self.source, self.key, self.stored_shape, self.perm = source, key, shape, perm
        out_shape = shape if perm is None else tuple(shape[p] for p in perm)
        dtype = ir.DataType.from_numpy(np.dtype(str(source.dtype).removeprefix("torch.")))
        super().__init__(self._materialize, dtype=dtype, shape=ir.Shape(out_shape), name=name)

    def _materialize(self) -> ir.TensorProtocol:
        if self.perm is None:
            return ir.tensor(self.source.read(self.key, self.stored_shape).numpy(), name=self.name)
        stored = read_parameter(self.source.stored, self.source.layout, self.key, self.stored_shape)
        out = torch.empty(tuple(self.shape), dtype=self.source.dtype)
        out.copy_(stored.permute(self.perm))  # cast and permute in one pass
        return ir.tensor(out.numpy(), name=self.name)

    def tofile(self, file: Any) -> None:
        if self.perm is not None:
            super().tofile(file)
            return
        for block in self.source.row_blocks(self.key, self.stored_shape):
            file.write(memoryview(block.contiguous().numpy()).cast("B"))

    def permuted(self, perm: tuple[int, ...], name: str) -> StreamedWeight:
        if self.perm is not None:
            perm = tuple(self.perm[p] for p in perm)
        return StreamedWeight(self.source, self.key, self.stored_shape, name, perm)


def fold_weight_transposes(graph: ir.Graph) -> None:
    """Replace each Transpose of an initializer that nothing else reads by a lazily transposed
    initializer named like the Transpose's output: what the optimizer's constant folding makes
    of it (it folds Transpose whatever the size when the input has no other consumer), without
    materialising the result."""
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        source = node.inputs[0]
        if source is None or source.const_value is None or not source.is_initializer():
            continue
        if len(source.uses()) != 1:
            continue
        rank = len(source.shape or ())
        attribute = node.attributes.get("perm")
        perm = tuple(attribute.as_ints()) if attribute is not None else tuple(reversed(range(rank)))
        output = node.outputs[0]
        folded = ir.Value(
            name=output.name,
            shape=ir.Shape([source.shape[p] for p in perm]),
            type=source.type,
            const_value=_transposed(source.const_value, perm, output.name),
        )
        output.replace_all_uses_with(folded, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        graph.initializers.pop(source.name)
        graph.register_initializer(folded)


def _transposed(tensor: ir.TensorProtocol, perm: tuple[int, ...], name: str) -> ir.TensorProtocol:
    if isinstance(tensor, StreamedWeight):
        return tensor.permuted(perm, name)
    shape = ir.Shape([tensor.shape[p] for p in perm])

    def transpose() -> ir.TensorProtocol:
        return ir.tensor(np.ascontiguousarray(tensor.numpy().transpose(perm)), name=name)

    return ir.LazyTensor(transpose, dtype=tensor.dtype, shape=shape, name=name)
