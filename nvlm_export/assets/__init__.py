"""Files shipped with the package: the example image `nvlm-export tile` uses when given none.

`example.png` is synthetic and deterministic (1280×720, a few coloured shapes and a line of text in
Pillow's default font). It is 16:9 on purpose: it tiles into a 2×1 grid plus a thumbnail, the
common case for camera frames. Regenerate it with:

    python -m nvlm_export.assets
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

EXAMPLE_IMAGE = "example.png"
EXAMPLE_SIZE = (1280, 720)


def example_image_path() -> Path:
    """Path of the shipped example image."""
    return Path(str(resources.files(__package__) / EXAMPLE_IMAGE))


def make_example_image() -> Image.Image:
    """Draw the example image; the same pixels every call for a given Pillow version."""
    image = Image.new("RGB", EXAMPLE_SIZE, (236, 240, 244))
    draw = ImageDraw.Draw(image)
    draw.rectangle((60, 80, 420, 400), fill=(118, 185, 0))  # NVIDIA green, left tile
    draw.ellipse((700, 120, 1020, 440), fill=(30, 110, 220))  # blue disc, right tile
    draw.polygon([(520, 640), (640, 440), (760, 640)], fill=(235, 90, 40))  # straddles the seam
    draw.line((0, 700, 1280, 500), fill=(40, 40, 40), width=6)
    font = ImageFont.load_default(size=48)
    draw.text((60, 14), "NVLM tiling: 2x1 grid + thumbnail", fill=(20, 20, 20), font=font)
    return image


def write_example_image(path: Path | None = None) -> Path:
    """Write the example image (optimised PNG) and return its path."""
    path = path or example_image_path()
    make_example_image().save(path, optimize=True)
    return path
