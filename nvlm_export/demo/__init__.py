"""A small NVLM-D model trained on synthetic visual questions, shipped as the built-in default.

No real NVLM weights can be downloaded in every environment, so the package carries a tiny model
at real geometry trained to answer questions about coloured shapes and a small rendered digit,
so a first run shows sensible text, tiling can matter (the digit is only legible in the
high-resolution tiles) and quantization has a task metric. The checkpoint shipped now answers
colour, shape, count and reading questions (docs/demo.md, Results).

    from nvlm_export.demo import default_checkpoint, example_image
    # nvlm-export export $(default_checkpoint) -o bundle/
    # nvlm-export run bundle/ -i $(example_image) -p "What digit is written in the picture?"

Torch-free: only paths and the example's questions live here.
"""

from __future__ import annotations

from pathlib import Path

from nvlm_export.errors import CheckpointError

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKPOINT_DIR = PACKAGE_DIR / "checkpoint"
EXAMPLE_IMAGE = PACKAGE_DIR / "example.png"

# The shipped example.png is sample EXAMPLE_INDEX of the example split (seed 2), a 3-tile image
# with three shapes. It is the first wide sample of that split whose every question the shipped
# model answers right and whose digit `max_tiles=1` misreads (sample 0, the example before, now
# gets a colour wrong; held-out colour accuracy is 93%). tests/test_demo.py checks it through a
# bundle.
EXAMPLE_INDEX = 7
EXAMPLE_KIND = "wide"


def default_checkpoint() -> Path:
    """The shipped demo checkpoint directory (NVLM-D layout, bf16, with its tokenizer)."""
    if not (CHECKPOINT_DIR / "config.json").is_file():
        raise CheckpointError(
            f"The demo checkpoint is missing from {CHECKPOINT_DIR}",
            why="the package was installed without its data files",
            fix="Reinstall nvlm-export, or train it: python -m nvlm_export.demo.train -o DIR",
        )
    return CHECKPOINT_DIR


def example_image() -> Path:
    """A synthetic image the demo model answers `example_questions()` about correctly, the digit
    only from its high-resolution tiles."""
    return EXAMPLE_IMAGE


def example_questions() -> tuple[tuple[str, str], ...]:
    """(question, true answer) pairs for the example image."""
    from nvlm_export.demo.dataset import example_sample

    return tuple((q.text, q.answer) for q in example_sample(EXAMPLE_INDEX, EXAMPLE_KIND).questions)
