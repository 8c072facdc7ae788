"""One comparator for every "are these two the same" question.

Export validation (ONNX Runtime vs PyTorch), `verify`, quantization accuracy and ONNX Runtime vs
TensorRT parity all compare arrays the same way, Polygraphy style: per output, with a tolerance,
reporting every output before deciding. Numpy only, so the runtime side can use it too.
(Polygraphy's comparator works on its own RunResults containers; ours compares the arrays our
pipeline already holds, and adds the cosine and top-1 measures quantization needs.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Comparison:
    """How far `actual` is from `expected`, and whether that is within tolerance."""

    name: str
    shape_ok: bool
    max_abs: float
    mean_abs: float
    max_rel: float  # max abs error relative to the expected values' largest magnitude
    cosine: float
    tolerance: float
    passed: bool
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(name: str, expected: np.ndarray, actual: np.ndarray, *, atol: float) -> Comparison:
    """Compare two arrays: shapes must match exactly; values within `atol` (max abs diff)."""
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if expected.shape != actual.shape:
        detail = f"shape {list(actual.shape)} != expected {list(expected.shape)}"
        nan = float("nan")
        return Comparison(name, False, nan, nan, nan, nan, atol, False, detail)
    diff = np.abs(expected - actual)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    return Comparison(
        name=name,
        shape_ok=True,
        max_abs=max_abs,
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        max_rel=max_abs / scale if scale > 0 else max_abs,
        cosine=cosine_similarity(expected, actual),
        tolerance=atol,
        passed=bool(np.isfinite(max_abs) and max_abs <= atol),
    )


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norms == 0.0:
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(np.dot(a, b) / norms)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the identical prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
