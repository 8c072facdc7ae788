"""Small ONNX helpers shared by every graph export: I/O description, saving, checking.

Plain data leaves this module (`GraphIO.to_dict()`), so the bundle manifest never needs onnx to
read it back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nvlm_export.errors import ExportError

if TYPE_CHECKING:
    import onnx
    import torch

    from nvlm_export.export.weights import CheckpointWeights

# ONNX protobuf files cannot exceed 2 GiB.
PROTOBUF_LIMIT_BYTES = 2**31 - 1
# Graphs with more weight bytes than this keep them in a side file. Well below the protobuf
# limit: an inline graph is serialised whole in memory (about twice its size at once), while a
# side file is written one streamed weight at a time (export/weights.py).
EXTERNAL_DATA_THRESHOLD_BYTES = 256 * 2**20

# Domains TensorRT's ONNX parser and every ONNX Runtime execution provider understand.
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})

Dim = int | str  # a fixed size, or the name of a dynamic axis ("batch", "seq", "past")


@dataclass(frozen=True)
class TensorIO:
    """One graph input or output: name, element type and symbolic shape (manifest-ready)."""

    name: str
    dtype: str  # numpy-style name: "float32", "float16", "int64"
    shape: tuple[Dim, ...]


@dataclass(frozen=True)
class GraphIO:
    """What a written graph looks like from outside: files, opset and its inputs/outputs."""

    file: str
    external_data: str | None
    opset: int
    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def input(self, name: str) -> TensorIO:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorIO:
        return next(t for t in self.outputs if t.name == name)


def stamp_graph_io(program: Any, io: GraphIO) -> None:
    """Write the declared names and symbolic shapes onto an ONNXProgram's graph inputs/outputs.

    The exporter names derived axes after its own expressions ("seq + past"); stamping makes the
    file say exactly what the manifest says.
    """
    import onnx_ir as ir

    graph = program.model.graph
    for values, specs in ((graph.inputs, io.inputs), (graph.outputs, io.outputs)):
        if len(values) != len(specs):
            raise ExportError(
                f"The traced graph has {len(values)} inputs/outputs, the declaration {len(specs)}",
                fix="Report this with the model config",
            )
        for value, spec in zip(values, specs, strict=True):
            value.name = spec.name
            value.shape = ir.Shape(list(spec.shape))


def read_graph_io(model: onnx.ModelProto) -> tuple[tuple[TensorIO, ...], tuple[TensorIO, ...]]:
    """The inputs and outputs a written graph really has (names, dtypes, symbolic shapes)."""
    import onnx

    def describe(value: onnx.ValueInfoProto) -> TensorIO:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        shape = tuple(d.dim_param or d.dim_value for d in tensor.shape.dim)
        return TensorIO(value.name, dtype, shape)

    return tuple(map(describe, model.graph.input)), tuple(map(describe, model.graph.output))


def require_graph_io(model: onnx.ModelProto, io: GraphIO, path: Path) -> None:
    """Fail if the written graph's interface differs from the declared one."""
    inputs, outputs = read_graph_io(model)
    for kind, found, declared in (("inputs", inputs, io.inputs), ("outputs", outputs, io.outputs)):
        if found != declared:
            diff = next(
                (f"{d} vs {f}" for f, d in zip(found, declared, strict=False) if f != d),
                f"{len(found)} vs {len(declared)} tensors",
            )
            raise ExportError(
                f"The exported graph {path} has different {kind} than declared",
                why=diff,
                fix="Report this with the model config",
            )


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers: what the ONNX file will hold as initializers."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def needs_external_data(module: torch.nn.Module) -> bool:
    return parameter_bytes(module) > EXTERNAL_DATA_THRESHOLD_BYTES


def external_data_name(path: Path) -> str:
    """The side file for weights: `model.onnx` -> `model.onnx.data` (torch's convention)."""
    return path.name + ".data"


def check_onnx_file(path: Path) -> onnx.ModelProto:
    """Run the ONNX checker on a written file and return the graph structure (no weights)."""
    import onnx

    try:
        # By path, so models with external data (> 2 GB) are checked too.
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as error:
        raise ExportError(
            f"The exported graph {path} is not valid ONNX",
            why=str(error).splitlines()[0],
            fix="Report this with the model config; re-run with --verbose for the full trace",
        ) from error
    return onnx.load(str(path), load_external_data=False)


def non_standard_ops(model: onnx.ModelProto) -> list[str]:
    """`domain::op` of every node outside the standard ONNX domain (e.g. com.microsoft)."""
    found = {
        f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in STANDARD_DOMAINS
    }
    return sorted(found)


def default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS)


def require_standard_graph(model: onnx.ModelProto, path: Path, opset: int) -> None:
    """Fail if the graph uses contrib ops or landed on a different opset than asked for."""
    extra = non_standard_ops(model)
    if extra:
        raise ExportError(
            f"The exported graph {path} uses non-standard ops {extra}",
            why="TensorRT and portable ONNX Runtime builds accept only standard ONNX ops",
            fix="Report this with the model config",
        )
    actual = default_opset(model)
    if actual != opset:
        raise ExportError(
            f"The exported graph {path} has opset {actual}, not the requested {opset}",
            fix="Pick an opset the exporter supports (18 is the default)",
        )


def save_embedding_table(
    weight: torch.Tensor, path: str | Path, *, dtype: str = "float32"
) -> tuple[int, int]:
    """Write the token-embedding table [vocab, hidden] as a .npy the runtime can np.load(mmap_mode).

    Written row block by row block so a 152064 x 8192 table never needs a second full copy in
    memory. Returns (vocab_size, hidden_size).
    """
    if weight.dim() != 2:
        raise ExportError(
            f"The embedding table has shape {tuple(weight.shape)}, not [vocab, hidden]"
        )
    blocks = (weight[start : start + 4096].detach() for start in range(0, weight.shape[0], 4096))
    return write_embedding_table(blocks, tuple(weight.shape), path, dtype=dtype)


def write_embedding_table(
    blocks: Iterable[torch.Tensor], shape: tuple[int, ...], path: str | Path, *, dtype: str
) -> tuple[int, int]:
    """Write an embedding table of `shape` [vocab, hidden], given as consecutive row blocks, to
    a .npy file in `dtype`; only one block is in memory at a time. Returns (vocab, hidden)."""
    import torch

    torch_dtypes = {"float32": torch.float32, "float16": torch.float16}
    if dtype not in torch_dtypes:
        raise ExportError(
            f"Cannot write the embedding table as '{dtype}'",
            why=f"supported dtypes are {sorted(torch_dtypes)}",
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    # Plain writes, not a memory map: every page written through a map stays in the process's
    # resident set until it is unmapped, which would count the whole table.
    with path.open("wb") as file, torch.no_grad():
        header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": tuple(shape)}
        np.lib.format.write_array_header_1_0(file, header)
        for block in blocks:
            file.write(memoryview(block.to("cpu", torch_dtypes[dtype]).contiguous().numpy()))
            rows += block.shape[0]
    if rows != shape[0]:
        raise ExportError(f"The embedding table has {rows} rows, expected {shape[0]}")
    return int(shape[0]), int(shape[1])


def trace_to_onnx(
    module: torch.nn.Module,
    example_args: tuple[Any, ...],
    path: Path,
    *,
    io: GraphIO,
    dynamic_shapes: Any,
    what: str,
    weights: CheckpointWeights | None = None,
) -> GraphIO:
    """Trace `module` with the dynamo exporter, stamp the declared interface, save and check.

    The one place every graph (vision, decoder, cross_kv) goes through, so they share the opset,
    the external-data rule and the checks. `io` is the declared interface; the written file must
    match it exactly. docs/decoder-graph.md says why the dynamo exporter rather than TorchScript.

    A module with FakeTensor parameters (a skeleton, `export/weights.py`) is traced without
    weights; `weights` then writes each one from the checkpoint as the file is saved. The
    exporter's optimizer runs after the values are attached, so both ways give the same file.
    """
    import logging
    import warnings

    import torch

    from nvlm_export.export.weights import fold_weight_transposes

    # The exporter logs that it skips torchvision's ops when torchvision is absent: not our concern.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # One Dim object per axis on purpose; the exporter warns that it deduplicates them.
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
            warnings.filterwarnings("ignore", category=FutureWarning)  # torch-internal notices
            program = torch.onnx.export(
                module,
                example_args,
                dynamo=True,
                opset_version=io.opset,
                input_names=[t.name for t in io.inputs],
                output_names=[t.name for t in io.outputs],
                dynamic_shapes=dynamic_shapes,
                optimize=False,  # below, once the weights have values
                verbose=False,
            )
            if weights is not None:
                weights.attach(program.model, module)
            fold_weight_transposes(program.model.graph)
            program.optimize()
    except ExportError:
        raise
    except Exception as error:  # the exporter raises many unrelated types; keep the cause
        raise ExportError(
            f"Tracing the {what} to ONNX failed",
            why=f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
            fix="Re-run with --verbose for the exporter's trace",
        ) from error
    stamp_graph_io(program, io)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=io.external_data is not None)
    model = check_onnx_file(path)
    require_standard_graph(model, path, io.opset)
    require_graph_io(model, io, path)
    return io


def initializer_differences(first: Path, second: Path) -> list[str]:
    """How the weights of two ONNX files differ, by initializer name: one line per initializer
    missing on one side or differing in dtype, shape or any byte. Empty when bit-identical.

    Reads one initializer pair at a time (external data is memory-mapped), so large graphs are
    compared without loading them.
    """
    import onnx_ir as ir

    ours, theirs = (ir.load(str(path)).graph.initializers for path in (first, second))
    lines = [f"{name}: only in {first}" for name in ours if name not in theirs]
    lines += [f"{name}: only in {second}" for name in theirs if name not in ours]
    for name, value in ours.items():
        other = theirs.get(name)
        if other is None:
            continue
        a, b = value.const_value, other.const_value
        if a is None or b is None:
            lines.append(f"{name}: no value")
        elif (a.dtype, tuple(a.shape)) != (b.dtype, tuple(b.shape)):
            lines.append(f"{name}: {a.dtype} {list(a.shape)} vs {b.dtype} {list(b.shape)}")
        elif a.tobytes() != b.tobytes():
            lines.append(f"{name}: different values")
    return lines
