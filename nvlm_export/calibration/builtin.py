"""The built-in calibration set: images drawn by code and generic prompts, deterministic per seed.

Used when no `--images` are given. The images are synthetic (smooth gradients, shapes, texture and
noise, in the aspect ratios that exercise 1 to 7 tiles), so they calibrate activation ranges
roughly; real images from the deployment domain calibrate better, and `calibrate` says so.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# (width, height): 1, 3, 5, 7, 3 and 2 tiles under NVLM-D's 1..6 grid with thumbnail.
BUILTIN_SIZES = ((500, 400), (1920, 1080), (1000, 1000), (1344, 896), (640, 960), (800, 600))
BUILTIN_PROMPTS = (
    "Describe the image in detail.",
    "What is shown in the picture?",
    "What colours dominate this image?",
    "Is there any text in the image? If so, what does it say?",
    "How many distinct objects can you see?",
    "Write a short caption for this image.",
    "What is in the top-left corner of the image?",
    "Summarise the scene in one sentence.",
)


def builtin_image(index: int, seed: int) -> Image.Image:
    """Image `index` of the built-in set for `seed`: the same pixels on every machine."""
    rng = np.random.default_rng([seed, index])
    width, height = BUILTIN_SIZES[index % len(BUILTIN_SIZES)]
    image = Image.fromarray(_gradient(rng, width, height))
    _draw_shapes(ImageDraw.Draw(image), rng, width, height)
    image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 2.0))))
    noise = rng.normal(0.0, rng.uniform(2.0, 12.0), size=(height, width, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def builtin_prompt(index: int, seed: int) -> str:
    return BUILTIN_PROMPTS[(index + seed) % len(BUILTIN_PROMPTS)]


def _gradient(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth two-colour background along a random direction: (H, W, 3) uint8."""
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    t = xs / width * np.cos(angle) + ys / height * np.sin(angle)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-9)  # (H, W) in [0, 1]
    start, end = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
    return (start + t[..., None] * (end - start)).astype(np.uint8)


def _draw_shapes(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int
) -> None:
    for _ in range(int(rng.integers(4, 16))):
        x0, x1 = sorted(rng.uniform(0, width, size=2))
        y0, y1 = sorted(rng.uniform(0, height, size=2))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        shape = ("rectangle", "ellipse", "line")[int(rng.integers(0, 3))]
        if shape == "rectangle":
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif shape == "ellipse":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 12)))
