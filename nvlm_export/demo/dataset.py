"""Synthetic visual questions for the demo model: coloured shapes and one small rendered digit.

Every sample is a pure function of (split seed, index), so the train and held-out splits are
reproducible on any machine and never overlap (different seeds). Drawing uses PIL primitives and a
built-in 5x7 dot-matrix font, so no system font can change the pixels.

Image sizes are chosen so dynamic high-resolution tiling picks a known grid:

    kind      image size                   grid    tiles (with thumbnail)
    single    ~400-520 px, near square     (1, 1)  1
    wide      448*2s x 448*s               (2, 1)  3
    square    448*2s x 448*2s              (2, 2)  5
    large     448*3s x 448*2s (or 2s x 3s) (3, 2)  7

with s in [1, 1.25]. The digit is drawn with dots of `DOT_PX` pixels *at tile resolution* (a
10x14 px glyph) and placed, at tile resolution, inside one 14 px ViT patch of one tile: the patch
grid is where a tile's pixels meet the model, and a glyph that straddles up to four patches at any
offset was more than the demo's 2-layer, 64-wide ViT learnt to read in an hour (docs/demo.md). The
thumbnail shrinks it by the grid's columns across and rows down: to 1 px per dot column or less
(5x14 px for the wide grid, 5x7 px or smaller for the others), a sliver inside one patch: reading
it needs the tiles. On single-tile images the digit is legible at tile resolution, which is where
reading is learnt cheaply.

Torch-free (numpy + pillow), so a runtime-only install can build the evaluation set.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from nvlm_export.runtime.tiling import TilingConfig, choose_grid

TRAIN_SEED = 0
HELD_OUT_SEED = 1
EXAMPLE_SEED = 2

TILE = 448
DOT_PX = 2  # glyph dot size at tile resolution
GLYPH_COLS, GLYPH_ROWS = 5, 7
PATCH = 14  # the ViT's patch size: the glyph (10x14 px at tile resolution) sits inside one patch
GLYPH_X_IN_PATCH = 2  # the glyph's left edge inside its patch (it is 10 px wide, the patch 14)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (35, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 195, 25),
}
SHAPES = ("circle", "square", "triangle")

# The question templates, one per kind. Answers are one word or one digit.
QUESTIONS = {
    "color": "What color is the {shape}?",
    "shape": "Which shape is {color}?",
    "count": "How many shapes are there?",
    "position": "Which shape is furthest to the {side}?",
    "read": "What digit is written in the picture?",
}
KINDS = tuple(QUESTIONS)
POSITION_GAP_PX = 40
# Shape size range at tile resolution: one to two pixel-shuffled tokens (28 px) across, so a
# shape's identity sits in a few neighbouring image tokens, like the digit's.
SHAPE_PX = (36.0, 64.0)

# 5x7 dot-matrix digits, one string of 5 dots per row ('#' = ink).
DIGIT_GLYPHS: dict[str, tuple[str, ...]] = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
}


@dataclass(frozen=True)
class ImageKind:
    """One family of image sizes and the DHR grid it must produce."""

    name: str
    grid: tuple[int, int]  # (cols, rows) DHR picks for this image
    weight: float  # share of the training mix

    @property
    def tiles(self) -> int:
        cols, rows = self.grid
        return cols * rows + (1 if cols * rows > 1 else 0)


IMAGE_KINDS = (
    ImageKind("single", (1, 1), 0.55),
    ImageKind("wide", (2, 1), 0.30),
    ImageKind("square", (2, 2), 0.09),
    ImageKind("large", (3, 2), 0.03),
    ImageKind("tall", (2, 3), 0.03),
)


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in image pixels

    @property
    def center_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass(frozen=True)
class Question:
    kind: str  # a key of QUESTIONS
    text: str
    answer: str


@dataclass(frozen=True)
class Sample:
    """One image and every question it supports, with its ground truth."""

    image: Image.Image
    image_kind: ImageKind
    shapes: tuple[Shape, ...]
    digit: str
    digit_box: tuple[float, float, float, float]  # in image pixels
    questions: tuple[Question, ...]
    seed: int
    index: int


def make_sample(seed: int, index: int, kind: ImageKind | None = None) -> Sample:
    """The `index`-th sample of split `seed` (optionally forcing its image kind)."""
    rng = np.random.default_rng([seed, index])
    kind = kind or _pick_kind(rng)
    size = _image_size(kind, rng)
    scale_xy = _tile_scale(kind, size)
    scale = max(scale_xy)
    background = tuple(int(v) for v in rng.integers(222, 250, size=3))
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    shapes = _place_shapes(rng, size, scale)
    for shape in shapes:
        _draw_shape(draw, shape, _jitter(rng, COLORS[shape.color]))
    digit = str(rng.integers(0, 10))
    digit_box = _place_digit(rng, kind, scale_xy, [s.box for s in shapes])
    ink = int(rng.integers(0, 60))
    dot = (DOT_PX * scale_xy[0], DOT_PX * scale_xy[1])
    _draw_digit(draw, digit, digit_box[:2], dot, (ink, ink, ink))
    _check_grid(image, kind)
    return Sample(
        image=image,
        image_kind=kind,
        shapes=tuple(shapes),
        digit=digit,
        digit_box=digit_box,
        questions=tuple(_questions(rng, shapes, digit)),
        seed=seed,
        index=index,
    )


def samples(seed: int, count: int, start: int = 0) -> Iterator[Sample]:
    """`count` consecutive samples of split `seed`."""
    for index in range(start, start + count):
        yield make_sample(seed, index)


# Dense per-pixel classes, for an auxiliary training loss on the image tokens (training only).
LABELS = (
    "background",
    *(f"{color} {shape}" for shape in SHAPES for color in COLORS),
    *(f"digit {d}" for d in DIGIT_GLYPHS),
)


def label_image(sample: Sample) -> Image.Image:
    """A mode "L" image of the sample's size: each pixel the LABELS index of what is drawn there
    (the digit's whole box counts as the digit)."""
    mask = Image.new("L", sample.image.size, 0)
    draw = ImageDraw.Draw(mask)
    for shape in sample.shapes:
        _draw_shape(draw, shape, LABELS.index(f"{shape.color} {shape.kind}"))
    draw.rectangle(sample.digit_box, fill=LABELS.index(f"digit {sample.digit}"))
    return mask


def example_sample(index: int, kind: str) -> Sample:
    """A sample of the example split (the shipped example.png is one of them)."""
    return make_sample(EXAMPLE_SEED, index, next(k for k in IMAGE_KINDS if k.name == kind))


def held_out(count: int) -> list[Sample]:
    """The evaluation split: never seen in training (a different seed)."""
    return list(samples(HELD_OUT_SEED, count))


# --- scene layout --------------------------------------------------------------------------------


def _pick_kind(rng: np.random.Generator) -> ImageKind:
    weights = np.asarray([k.weight for k in IMAGE_KINDS])
    return IMAGE_KINDS[int(rng.choice(len(IMAGE_KINDS), p=weights / weights.sum()))]


def _image_size(kind: ImageKind, rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) of an image that tiles into `kind.grid`."""
    if kind.grid == (1, 1):
        side = float(rng.uniform(400, 520))
        aspect = float(rng.uniform(0.85, 1.18))
        return round(side * aspect**0.5), round(side / aspect**0.5)
    scale = float(rng.uniform(1.0, 1.25))
    cols, rows = kind.grid
    return round(TILE * cols * scale), round(TILE * rows * scale)


def _tile_scale(kind: ImageKind, size: tuple[int, int]) -> tuple[float, float]:
    """Image pixels per tile pixel, across and down: tiling resizes the image to the grid's
    (cols * 448, rows * 448), so a single-tile image is stretched to a square."""
    cols, rows = kind.grid
    return size[0] / (TILE * cols), size[1] / (TILE * rows)


def _place_shapes(rng: np.random.Generator, size: tuple[int, int], scale: float) -> list[Shape]:
    """1-3 shapes of different types and colours that do not overlap."""
    count = int(rng.integers(1, 4))
    kinds = rng.choice(SHAPES, size=count, replace=False)
    colors = rng.choice(list(COLORS), size=count, replace=False)
    boxes: list[tuple[float, float, float, float]] = []
    width, height = size
    for _ in range(count):
        for _attempt in range(100):
            side = float(rng.uniform(*SHAPE_PX)) * scale
            x0 = float(rng.uniform(8, width - side - 8))
            y0 = float(rng.uniform(8, height - side - 8))
            box = (x0, y0, x0 + side, y0 + side)
            if not any(_overlaps(box, other, margin=12 * scale) for other in boxes):
                boxes.append(box)
                break
        else:
            break  # a crowded image keeps the shapes placed so far
    return [Shape(str(k), str(c), b) for k, c, b in zip(kinds, colors, boxes, strict=False)]


def _place_digit(
    rng: np.random.Generator,
    kind: ImageKind,
    scale_xy: tuple[float, float],
    taken: list[tuple[float, float, float, float]],
) -> tuple[float, float, float, float]:
    """A free spot for the digit: at tile resolution, inside one ViT patch of one tile (never on
    the tile's border patches), in image pixels."""
    sx, sy = scale_xy
    glyph_w, glyph_h = GLYPH_COLS * DOT_PX, GLYPH_ROWS * DOT_PX  # at tile resolution
    cols, rows = kind.grid
    patches = TILE // PATCH
    box = (0.0, 0.0, 0.0, 0.0)
    for _ in range(200):
        col, row = int(rng.integers(0, cols)), int(rng.integers(0, rows))
        px, py = (int(v) for v in rng.integers(1, patches - 1, size=2))
        x0 = col * TILE + px * PATCH + GLYPH_X_IN_PATCH
        y0 = row * TILE + py * PATCH
        box = (x0 * sx, y0 * sy, (x0 + glyph_w) * sx, (y0 + glyph_h) * sy)
        # A full token cell (28 px) of room, so the digit's token shows the digit alone.
        if not any(_overlaps(box, other, margin=2 * PATCH * max(sx, sy)) for other in taken):
            return box
    return box


def _overlaps(
    a: tuple[float, float, float, float], b: tuple[float, float, float, float], margin: float
) -> bool:
    return not (
        a[2] + margin <= b[0]
        or b[2] + margin <= a[0]
        or a[3] + margin <= b[1]
        or b[3] + margin <= a[1]
    )


def _check_grid(image: Image.Image, kind: ImageKind) -> None:
    grid = choose_grid(image.width, image.height, TilingConfig())
    if grid != kind.grid:  # a generator bug, not a user error
        raise AssertionError(f"{image.size} tiles as {grid}, expected {kind.grid}")


# --- drawing -------------------------------------------------------------------------------------


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = (int(np.clip(v + rng.integers(-18, 19), 0, 255)) for v in rgb)
    return (r, g, b)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, fill: int | tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = shape.box
    if shape.kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _draw_digit(
    draw: ImageDraw.ImageDraw,
    digit: str,
    origin: tuple[float, float],
    dot: tuple[float, float],
    ink: tuple[int, int, int],
) -> None:
    x0, y0 = origin
    dx, dy = dot
    for r, row in enumerate(DIGIT_GLYPHS[digit]):
        for c, cell in enumerate(row):
            if cell == "#":
                left, top = round(x0 + c * dx), round(y0 + r * dy)
                right, bottom = round(x0 + (c + 1) * dx) - 1, round(y0 + (r + 1) * dy) - 1
                draw.rectangle((left, top, right, bottom), fill=ink)


# --- questions -----------------------------------------------------------------------------------


def _questions(rng: np.random.Generator, shapes: list[Shape], digit: str) -> list[Question]:
    """Every question the scene supports: colour and shape of each shape, count, position, read."""
    out = [Question("color", QUESTIONS["color"].format(shape=s.kind), s.color) for s in shapes]
    out += [Question("shape", QUESTIONS["shape"].format(color=s.color), s.kind) for s in shapes]
    out.append(Question("count", QUESTIONS["count"], str(len(shapes))))
    side = "left" if rng.random() < 0.5 else "right"
    ordered = sorted(shapes, key=lambda s: s.center_x, reverse=side == "right")
    # Asked only when the answer is clear: the extreme shape stands well apart from the next.
    if len(shapes) >= 2 and abs(ordered[0].center_x - ordered[1].center_x) > POSITION_GAP_PX:
        out.append(
            Question(
                "position",
                QUESTIONS["position"].format(side=side),
                ordered[0].kind,
            )
        )
    out.append(Question("read", QUESTIONS["read"], digit))
    return out
