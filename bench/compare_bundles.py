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
from nvlm_export.runtime.manifest import load_manifest


def bundle_differences(first: Path, second: Path) -> list[str]:
    ours, theirs = load_manifest(first), load_manifest(second)
    if set(ours.graphs) != set(theirs.graphs):
        return [f"graphs differ: {sorted(ours.graphs)} vs {sorted(theirs.graphs)}"]
    lines = []
    for name, graph in ours.graphs.items():
        files = first / graph.file, second / theirs.graphs[name].file
        lines += [f"{name}: {line}" for line in initializer_differences(*files)]
        print(f"{name}: compared", file=sys.stderr)
    embeddings = first / ours.embedding.file, second / theirs.embedding.file
    if not filecmp.cmp(*embeddings, shallow=False):
        lines.append("embedding table: different bytes")
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
