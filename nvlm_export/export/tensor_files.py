"""One initializer at a time: read from an ONNX graph on disk, write into a new graph's data file.

Quantization rewrites graphs that can be far larger than memory (a 72B decoder is ~290 GB in
fp32). `SourceGraph` loads a graph's structure without its weights and reads one initializer on
request; `TensorSink` writes each new initializer as soon as it is made, straight into the
output's external-data file, keeping only the (data-less) TensorProto. Peak memory is then the
largest tensor being converted plus the graph's structure, whatever the depth of the model.

onnx's own `save_model(..., save_as_external_data=True)` needs every tensor in memory at once,
and `onnx_ir`'s lazy tensors still serialise a whole model in one call, hence these two small
classes (the file layout is onnx's: `location`, `offset`, `length` per tensor).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

if TYPE_CHECKING:
    import onnx

# Tensors below this stay inside the .onnx file (onnx's default `size_threshold`): scales and zero
# points remain readable without the data file.
INLINE_BYTES = 1024
# Large tensors start on a page boundary in the data file, as onnx aligns them, so a runtime can
# memory-map them.
ALIGN_BYTES = 4096
ALIGN_ABOVE_BYTES = 1 << 20
# onnx.TensorProto FLOAT, FLOAT16, DOUBLE: element types read as plain bytes, row by row.
FLOAT_TYPES = (1, 10, 11)


class SourceGraph:
    """An ONNX graph's structure (nodes, I/O, initializer headers) without its weight data."""

    def __init__(self, path: Path) -> None:
        import onnx

        self.path = Path(path)
        self.model = onnx.load(str(self.path), load_external_data=False)
        self.initializers: dict[str, onnx.TensorProto] = {
            t.name: t for t in self.model.graph.initializer
        }

    def tensor(self, name: str) -> onnx.TensorProto:
        """A copy of initializer `name` with its data loaded (the source proto stays data-less)."""
        import onnx
        from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

        tensor = onnx.TensorProto()
        tensor.CopyFrom(self.initializers[name])
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, str(self.path.parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
        return tensor

    def array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.tensor(name))

    def row_blocks(self, name: str, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Initializer `name` as (first row, rows) blocks of at most `block_rows` along axis 0.

        A float tensor in a data file beside the graph is read block by block, so a
        vocabulary-sized weight never sits in memory whole (`tensor` holds it twice: the bytes
        read and the proto they are copied into). Anything else (inline data, another file
        layout) is read whole through onnx and sliced.
        """
        raw = self._raw_external(name)
        if raw is None:
            array = self.array(name)
            for start in range(0, array.shape[0], block_rows):
                yield start, array[start : start + block_rows]
            return
        file, offset, dtype = raw
        shape = self.shape(name)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        with open(file, "rb") as data:
            for start in range(0, shape[0], block_rows):
                rows = min(block_rows, shape[0] - start)
                block = np.empty((rows, *shape[1:]), dtype)
                data.seek(offset + start * row_bytes)
                if data.readinto(memoryview(block).cast("B")) != block.nbytes:
                    raise ValueError(f"external data of {name!r} ends early in {file}")
                yield start, block

    def _raw_external(self, name: str) -> tuple[Path, int, np.dtype] | None:
        """(file, offset, dtype) of a float initializer stored as plain bytes in a data file in
        the graph's own directory (what `TensorSink` and the exporter write), else None.

        Checked as strictly as onnx's loader: a bare file name (no directory, no '..'), a
        regular file that is not a link, the tensor's bytes inside it.
        """
        from onnx.external_data_helper import ExternalDataInfo, uses_external_data
        from onnx.helper import tensor_dtype_to_np_dtype

        tensor = self.initializers[name]
        if not uses_external_data(tensor) or tensor.data_type not in FLOAT_TYPES:
            return None
        info = ExternalDataInfo(tensor)
        file = self.path.parent / info.location
        if Path(info.location).name != info.location or info.location in ("", ".", ".."):
            return None
        if file.is_symlink() or not file.is_file() or file.stat().st_nlink != 1:
            return None
        dtype = np.dtype(tensor_dtype_to_np_dtype(tensor.data_type))
        offset = int(info.offset or 0)
        length = math.prod(self.shape(name)) * dtype.itemsize
        if info.length is not None and int(info.length) != length:
            return None
        if offset + length > file.stat().st_size:
            raise ValueError(f"external data of {name!r} lies beyond the end of {file}")
        return file, offset, dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.initializers[name].dims)

    def elem_types(self) -> dict[str, int]:
        """Element type of every tensor the graph declares (inputs, outputs, value_info)."""
        graph = self.model.graph
        infos = [*graph.input, *graph.output, *graph.value_info]
        types = {v.name: v.type.tensor_type.elem_type for v in infos if v.type.tensor_type}
        types.update({t.name: t.data_type for t in graph.initializer})
        return types


class TensorSink:
    """Writes the initializers of a new graph one at a time.

    External (`external=True`): each tensor's bytes are appended to `<output>.data` at once and
    only a reference stays in memory; otherwise tensors stay inline (small graphs).
    """

    def __init__(self, output: Path, *, external: bool) -> None:
        self.output = Path(output)
        self.external = external
        self.location = self.output.name + ".data"
        self.tensors: list[onnx.TensorProto] = []
        self._file: BinaryIO | None = None
        if external:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.output.parent / self.location, "wb")  # noqa: SIM115

    def add(self, tensor: onnx.TensorProto) -> None:
        """Keep `tensor` (with its data) in the new graph; its data leaves memory if external
        (and `tensor` itself is left without it)."""
        import onnx

        data = tensor.raw_data if tensor.HasField("raw_data") else None
        if self._file is None or data is None or len(data) < INLINE_BYTES:
            self.tensors.append(tensor)
            return
        offset = self._file.tell()
        if len(data) > ALIGN_ABOVE_BYTES and offset % ALIGN_BYTES:
            offset += ALIGN_BYTES - offset % ALIGN_BYTES
            self._file.seek(offset)
        self._file.write(data)
        # The header is copied from the tensor without its data: a copied then cleared
        # raw_data stays allocated in the header's protobuf arena for as long as the header
        # lives, i.e. every tensor written would stay in memory until the graph is saved.
        tensor.ClearField("raw_data")
        header = onnx.TensorProto()
        header.CopyFrom(tensor)
        header.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", offset), ("length", len(data))):
            entry = header.external_data.add()
            entry.key, entry.value = key, str(value)
        self.tensors.append(header)

    def add_array(self, array: np.ndarray, name: str) -> None:
        from onnx import numpy_helper

        self.add(numpy_helper.from_array(np.ascontiguousarray(array), name))

    def save(self, model: onnx.ModelProto, nodes: Iterable[Any]) -> None:
        """Write `model` with `nodes` and the initializers added so far to the output path."""
        import onnx

        if self._file is not None:
            self._file.close()
            self._file = None
        graph = model.graph
        del graph.node[:]
        graph.node.extend(nodes)
        del graph.initializer[:]
        graph.initializer.extend(self.tensors)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(self.output))

    def __enter__(self) -> TensorSink:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
