"""Are two bundles' weights bit-identical? Every graph's initializers (by name: dtype, shape,
bytes) and the embedding table, compared one tensor at a time.

    .venv/bin/python bench/compare_bundles.py BASELINE_BUNDLE NEW_BUNDLE

Used to check that the streamed export writes exactly the weights the in-memory export wrote
(docs/export.md); exits 1 and names the first differences otherwise.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
from pathlib import Path

from nvlm_export.export.onnx_utils import initializer_differences

EMBEDDING = "embed_tokens.npy"


def bundle_differences(first: Path, second: Path) -> list[str]:
    """By file name, so bundles of different manifest schema versions compare too: every graph
    of `first` against the same-named graph of `second`. Graphs only `second` has (the ONNX
    Runtime variants of schema 2.1, rewrites of the standard graphs over the same weights) are
    named on stderr, not compared."""
    graphs = sorted(p.name for p in first.glob("*.onnx"))
    missing = [graph for graph in graphs if not (second / graph).is_file()]
    if missing:
        return [f"graph files missing from {second}: {missing}"]
    extra = sorted({p.name for p in second.glob("*.onnx")} - set(graphs))
    if extra:
        print(f"only in {second}, not compared: {extra}", file=sys.stderr)
    lines = []
    for graph in graphs:
        lines += [
            f"{graph}: {line}" for line in initializer_differences(first / graph, second / graph)
        ]
        print(f"{graph}: compared", file=sys.stderr)
    if not filecmp.cmp(first / EMBEDDING, second / EMBEDDING, shallow=False):
        lines.append(f"{EMBEDDING}: different bytes")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=Path)
    parser.add_argument("new", type=Path)
    args = parser.parse_args()
    differences = bundle_differences(args.baseline, args.new)
    for line in differences[:20]:
        print(line)
    print("bit-identical" if not differences else f"{len(differences)} differences")
    sys.exit(1 if differences else 0)


if __name__ == "__main__":
    main()
