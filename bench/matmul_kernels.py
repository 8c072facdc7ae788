"""One weight GEMM at prefill size on ONNX Runtime's CPU kernels: fp32, int8 Q/DQ (what INT8
bundles hold) and INT4 (DequantizeLinear(int4, block) -> MatMul, what INT4 bundles hold and ONNX
Runtime fuses into MatMulNBits at load) at each block size, plus MatMulNBits nodes written
directly at each accuracy level. Shows which kernels use the CPU's matrix units.

    .venv/bin/python bench/matmul_kernels.py --rows 459     # a 1-tile prompt's tokens
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import ModelProto, TensorProto, helper, numpy_helper


def time_model(model: ModelProto, x: np.ndarray, threads: int, repeats: int) -> float:
    """Mean time of `repeats` calls after one warm-up, in ms."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    session.run(None, {"x": x})
    start = time.perf_counter()
    for _ in range(repeats):
        session.run(None, {"x": x})
    return (time.perf_counter() - start) / repeats * 1000


def model(nodes: list, initializers: list, m: int, k: int, n: int) -> ModelProto:
    graph = helper.make_graph(
        nodes,
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        initializers,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def int8_qdq(w: np.ndarray, x: np.ndarray) -> tuple[list, list]:
    """Per-channel symmetric int8 weight, per-tensor int8 activation (the INT8 bundles' rule)."""
    w_scale = np.abs(w).max(0) / 127
    x_scale = np.float32(np.abs(x).max() / 127)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(x_scale, np.float32), "xs"),
        numpy_helper.from_array(np.array(0, np.int8), "xz"),
        numpy_helper.from_array(np.round(w / w_scale).astype(np.int8), "wq"),
        numpy_helper.from_array(w_scale.astype(np.float32), "ws"),
        numpy_helper.from_array(np.zeros(w.shape[1], np.int8), "wz"),
    ]
    return nodes, inits


def int4_qdq(w: np.ndarray, block: int) -> tuple[list, list]:
    """Symmetric int4 blocks along K (the INT4 bundles' layout)."""
    k, n = w.shape
    blocks = w.reshape(k // block, block, n)
    scales = np.abs(blocks).max(1) / 7
    values = np.clip(np.round(blocks / scales[:, None, :]), -8, 7).astype(np.int8).reshape(k, n)
    nodes = [
        helper.make_node("DequantizeLinear", ["w4", "s4"], ["wd"], axis=0, block_size=block),
        helper.make_node("MatMul", ["x", "wd"], ["y"]),
    ]
    weight = helper.make_tensor("w4", TensorProto.INT4, [k, n], values.flatten().tolist())
    return nodes, [weight, numpy_helper.from_array(scales.astype(np.float32), "s4")]


def matmul_nbits(w: np.ndarray, block: int, level: int) -> tuple[list, list]:
    """com.microsoft MatMulNBits: uint4 packed [N, K/block, block/2], scales [N * K/block]."""
    k, n = w.shape
    blocks = w.T.reshape(n, k // block, block)
    scales = (np.abs(blocks).max(2) / 7).astype(np.float32)
    values = (np.clip(np.round(blocks / scales[..., None]), -8, 7) + 8).astype(np.uint8)
    packed = values[..., 0::2] | (values[..., 1::2] << 4)
    node = helper.make_node(
        "MatMulNBits",
        ["x", "b", "scales"],
        ["y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=4,
        block_size=block,
        accuracy_level=level,
    )
    inits = [
        numpy_helper.from_array(packed, "b"),
        numpy_helper.from_array(scales.ravel(), "scales"),
    ]
    return [node], inits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=459, help="M: prompt tokens")
    parser.add_argument("--k", type=int, default=896, help="input channels (bench: hidden)")
    parser.add_argument("--n", type=int, default=4864, help="output channels (bench: MLP)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    m, k, n = args.rows, args.k, args.n
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    cases = {
        "fp32 MatMul": (
            [helper.make_node("MatMul", ["x", "w"], ["y"])],
            [numpy_helper.from_array(w, "w")],
        )
    }
    cases["int8 Q/DQ MatMul"] = int8_qdq(w, x)
    for block in (32, 64, 128):
        cases[f"int4 DQ(block {block}) -> MatMul"] = int4_qdq(w, block)
        for level in (0, 4):
            cases[f"MatMulNBits block {block}, accuracy level {level}"] = matmul_nbits(
                w, block, level
            )
    print(f"M {m}, K {k}, N {n}, {args.threads} threads, onnxruntime {ort.__version__}")
    for label, (nodes, inits) in cases.items():
        ms = time_model(model(nodes, inits, m, k, n), x, args.threads, args.repeats)
        print(f"{label:44s} {ms:7.2f} ms", flush=True)


if __name__ == "__main__":
    main()
