"""`python -m nvlm_export.demo [checkpoint|example]`: print the shipped demo paths (for shells)."""

from __future__ import annotations

import sys

from nvlm_export.demo import default_checkpoint, example_image


def main(argv: list[str]) -> None:
    which = argv[0] if argv else "checkpoint"
    paths = {"checkpoint": default_checkpoint, "example": example_image}
    if which not in paths:
        sys.exit(f"usage: python -m nvlm_export.demo [{'|'.join(paths)}]")
    print(paths[which]())


if __name__ == "__main__":
    main(sys.argv[1:])
