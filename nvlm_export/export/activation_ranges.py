"""Activation ranges for static quantization: a running amax per tensor, never the activations.

The graph is run on each recorded sample with two extra outputs per tensor to calibrate,
its ReduceMin and ReduceMax: scalars, so ONNX Runtime frees `x` as soon as its readers have
run, and the Python side keeps one float per tensor. The running maximum over samples is MinMax
calibration in its symmetric form (|min| and |max| folded into amax), which is what the INT8 and
FP8 scales use (docs/quantization.md). Percentile or entropy calibration would need a histogram
per tensor instead; they clip outliers that TensorRT's and ModelOpt's amax scaling keeps, and are
not used.

The session reads the source graph's weights from its own directory (the augmented structure is
passed as bytes), so the weights are loaded once, by ONNX Runtime, and never copied in Python.
Graph optimisations are off, as in onnxruntime.quantization's calibrator: the measured tensors
are the ones the unoptimised graph computes, and no fusion needs a second copy of a weight.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from nvlm_export.export.tensor_files import SourceGraph

AMAX_SUFFIX = "__amax"


def augmented_graph(graph: SourceGraph, tensors: Sequence[str]) -> bytes:
    """The source graph with scalar min and max outputs per tensor, serialised.

    Reduce{Min,Max} read `x` in place (an `Abs` first would allocate a copy of every tensor). The
    extra nodes are appended to the loaded structure, serialised and removed again: an inline
    graph's weights are not copied a second time.
    """
    from onnx import TensorProto, helper

    graph_proto = graph.model.graph
    nodes, outputs = len(graph_proto.node), len(graph_proto.output)
    for index, name in enumerate(tensors):
        for op in ("ReduceMin", "ReduceMax"):
            reduced = f"{name}{AMAX_SUFFIX}_{op}"
            out = f"{reduced}_float"
            graph_proto.node.extend(
                [
                    helper.make_node(op, [name], [reduced], keepdims=0, name=f"{op}_{index}"),
                    helper.make_node("Cast", [reduced], [out], to=TensorProto.FLOAT),
                ]
            )
            graph_proto.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, []))
    try:
        return graph.model.SerializeToString()
    finally:
        del graph_proto.node[nodes:]
        del graph_proto.output[outputs:]


def activation_amax(
    graph: SourceGraph, tensors: Iterable[str], samples: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, np.float32]:
    """The largest |value| each of `tensors` takes over all `samples` (graph feeds)."""
    import onnxruntime as ort

    names = list(dict.fromkeys(tensors))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_cpu_mem_arena = False  # activation peaks go back to the OS after each call
    options.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", str(Path(graph.path).parent)
    )
    session = ort.InferenceSession(
        augmented_graph(graph, names), options, providers=["CPUExecutionProvider"]
    )
    outputs = [
        f"{name}{AMAX_SUFFIX}_{op}_float" for name in names for op in ("ReduceMin", "ReduceMax")
    ]
    amax = np.zeros(len(names), dtype=np.float32)
    count = 0
    for feeds in samples:
        low_high = np.abs(np.array(session.run(outputs, dict(feeds)), dtype=np.float32))
        amax = np.fmax(amax, low_high.reshape(-1, 2).max(axis=1))  # fmax: NaN never wins
        count += 1
    if count == 0:
        raise ValueError("no calibration samples")
    return dict(zip(names, (np.float32(v) for v in amax), strict=True))
