"""Dynamic high-resolution (DHR) tiling, bit for bit with the InternVL / NVLM reference.

An image of any size becomes a stack of S×S tiles (S = 448) the vision encoder can take:

1. candidate grids (cols i, rows j) with min_tiles <= i·j <= max_tiles, in the reference's order;
2. the grid whose aspect ratio i/j is closest to the image's w/h (reference tie rule);
3. the whole image resized to (S·i, S·j) and cut row-major into i·j tiles;
4. a thumbnail (the original image resized to S×S) appended last when there is more than one tile;
5. each tile resized to S×S again, scaled to [0, 1] and normalised with the ImageNet mean and std.

The result is float32 [N, 3, S, S]. `choose_grid` runs steps 1–2 only, without touching pixels, so a
prompt-length check can know the tile count before any image is decoded.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from nvlm_export.errors import InputError
from nvlm_export.runtime.limits import MAX_TILE_SIZE, MAX_TILES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The vision side every supported model shares: InternViT patches of 14 px and a pixel shuffle that
# folds 2×2 patches into one token (ratio 0.5), so a 448 tile gives (448/14)² · 0.5² = 256 tokens.
PATCH_SIZE = 14
DOWNSAMPLE_RATIO = 0.5

# PIL's `Image.resize` default for RGB images is BICUBIC, and the reference relies on that default.
# We name it explicitly so a change of Pillow's default can never silently change our pixels.
RESAMPLE = Image.Resampling.BICUBIC

TileKind = Literal["tile", "thumbnail"]


@dataclass(frozen=True)
class TilingConfig:
    """How images are tiled. Defaults are NVLM-D-72B's; InternVL2 uses `max_tiles=12`.

    Written into the bundle manifest with `to_dict()`; runtime/manifest.py reads it back.
    """

    tile_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 6
    use_thumbnail: bool = True

    def __post_init__(self) -> None:
        for name in ("tile_size", "min_tiles", "max_tiles"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(
                    f"Tiling {name} must be a positive integer, got {value!r}",
                    fix=f"Pass a whole number >= 1 for {name}",
                )
        limits = {"tile_size": MAX_TILE_SIZE, "max_tiles": MAX_TILES, "min_tiles": MAX_TILES}
        for name, limit in limits.items():
            if getattr(self, name) > limit:
                raise InputError(
                    f"Tiling {name} {getattr(self, name)} is above the maximum {limit}",
                    why="larger values would make tiling take unbounded time and memory",
                    fix=f"Use {name} <= {limit}",
                )
        if self.min_tiles > self.max_tiles:
            raise InputError(
                f"Tiling min_tiles ({self.min_tiles}) is larger than max_tiles ({self.max_tiles})",
                fix="Choose min_tiles <= max_tiles",
            )
        if not isinstance(self.use_thumbnail, bool):
            raise InputError(f"Tiling use_thumbnail must be a bool, got {self.use_thumbnail!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, eq=False)  # eq=False: compared by identity, like the image it holds
class Tiling:
    """One image cut into tiles, ready for the vision encoder.

    `grid` is (cols, rows); `tile_kinds[k]` says whether row k of `pixel_values` is a regular tile
    or the thumbnail (always last), so the prompt builder can emit `<tile_k>` /
    `<tile_global_thumbnail>` tags.

    The pixels are cut and normalised on first use: the prompt needs only the grid, and a request
    whose image features are cached never encodes its tiles, so it never pays for them.
    """

    image: Image.Image = dataclasses.field(repr=False)  # the RGB source
    config: TilingConfig
    grid: tuple[int, int]
    num_tiles: int
    has_thumbnail: bool
    image_size: tuple[int, int]  # (width, height) of the source image
    tile_kinds: tuple[TileKind, ...]

    @functools.cached_property
    def pixel_values(self) -> np.ndarray:
        """float32 (N, 3, S, S)."""
        tiles = split_into_tiles(self.image, self.grid, self.config)
        return np.stack([normalize_tile(tile, self.config.tile_size) for tile in tiles])

    def release_pixels(self) -> None:
        """Forget the cut tiles; the next use cuts them again. A long-lived holder, such as a
        conversation, then keeps the source image alone (9.4 MB for a 2048×1536 photo, where
        its seven normalised tiles take 16.9 MB)."""
        self.__dict__.pop("pixel_values", None)

    @property
    def tile_size(self) -> int:
        return self.config.tile_size


@functools.lru_cache(maxsize=64)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (cols, rows) grids with min_tiles <= cols·rows <= max_tiles, in the reference's order.

    Sorting is stable and keyed on the tile count only, so grids with the same count keep the
    iteration order of the set. The set is built exactly as the reference builds it (same element
    insertion sequence), which makes that order the reference's order too.
    """
    grids = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def closest_grid(
    width: int, height: int, grids: tuple[tuple[int, int], ...], tile_size: int
) -> tuple[int, int]:
    """The grid whose cols/rows is nearest the image's width/height (the reference's rule).

    On an exact tie of the ratio difference the later (larger) grid wins only if the image has
    more than half the pixels that grid would hold, so small images are not blown up.
    """
    aspect_ratio = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in grids:
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def tile_budget(config: TilingConfig, max_tiles: int | None) -> int:
    """The largest tile count allowed for one call: the per-call budget clamped to the config."""
    if max_tiles is None:
        return config.max_tiles
    whole = isinstance(max_tiles, int) and not isinstance(max_tiles, bool)
    if not whole or max_tiles < config.min_tiles:
        raise InputError(
            f"Tile budget max_tiles={max_tiles!r} is not usable",
            why=f"it must be a whole number >= min_tiles ({config.min_tiles})",
            fix=f"Pass a value of at least {config.min_tiles} (larger ones stop at the bundle's "
            f"{config.max_tiles})",
        )
    return min(max_tiles, config.max_tiles)


def choose_grid(
    width: int, height: int, config: TilingConfig = TilingConfig(), max_tiles: int | None = None
) -> tuple[int, int]:
    """The (cols, rows) grid `tile_image` would use for a width×height image; no pixels needed."""
    if width < 1 or height < 1:
        raise InputError(f"Image size {width}x{height} has no pixels", fix="Use a non-empty image")
    grids = candidate_grids(config.min_tiles, tile_budget(config, max_tiles))
    return closest_grid(width, height, grids, config.tile_size)


def tile_count(grid: tuple[int, int], config: TilingConfig) -> int:
    """Tiles for a grid, thumbnail included (a thumbnail is added only to multi-tile grids)."""
    cols, rows = grid
    regular = cols * rows
    return regular + 1 if config.use_thumbnail and regular > 1 else regular


def tokens_per_tile(
    tile_size: int = 448, patch_size: int = PATCH_SIZE, downsample_ratio: float = DOWNSAMPLE_RATIO
) -> int:
    """Image tokens one tile becomes after the ViT and pixel shuffle: (S/patch)² · ratio²."""
    side = tile_size / patch_size * downsample_ratio
    if tile_size % patch_size or side != int(side):
        raise InputError(
            f"Tile size {tile_size} does not split into whole image tokens",
            why=f"patch {patch_size} and pixel-shuffle ratio {downsample_ratio} need a multiple of "
            f"{int(patch_size / downsample_ratio)}",
            fix="Use the model's tile size (448)",
        )
    return int(side) ** 2


def split_into_tiles(
    image: Image.Image, grid: tuple[int, int], config: TilingConfig
) -> list[Image.Image]:
    """Resize the whole image to the grid, crop row-major, then append the thumbnail if any."""
    size = config.tile_size
    cols, rows = grid
    resized = image.resize((size * cols, size * rows), RESAMPLE)
    tiles = []
    for k in range(cols * rows):
        x, y = (k % cols) * size, (k // cols) * size
        tiles.append(resized.crop((x, y, x + size, y + size)))
    if config.use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((size, size), RESAMPLE))
    return tiles


def normalize_tile(tile: Image.Image, tile_size: int) -> np.ndarray:
    """One tile to float32 (3, S, S): the reference's resize, ÷255 and ImageNet normalisation.

    The arithmetic is float32 throughout, in the reference's order (divide, subtract, divide), so
    the values are the same bits the torchvision transform produces.
    """
    # A no-op size-wise, but it is part of the reference transform, so keep it.
    tile = tile.resize((tile_size, tile_size), RESAMPLE)
    pixels = np.asarray(tile, dtype=np.uint8).astype(np.float32) / np.float32(255)  # (S, S, 3)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    return ((pixels - mean) / std).transpose(2, 0, 1)  # (3, S, S)


def denormalize(pixel_values: np.ndarray) -> np.ndarray:
    """Undo the normalisation for viewing: float32 (N, 3, S, S) -> uint8 (N, S, S, 3)."""
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
    pixels = (pixel_values * std + mean) * 255
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def tile_image(
    image: Image.Image, config: TilingConfig = TilingConfig(), max_tiles: int | None = None
) -> Tiling:
    """Tile an RGB image for the vision encoder (see the module docstring for the steps).

    `max_tiles` is a per-call budget, e.g. to fit a context window: it is clamped to
    `config.max_tiles` and must be at least `config.min_tiles`. Load images with
    `nvlm_export.runtime.images.load_image`, which returns RGB.
    """
    if image.mode != "RGB":
        raise InputError(
            f"tile_image needs an RGB image, got mode {image.mode}",
            fix="Load it with nvlm_export.runtime.images.load_image",
        )
    grid = choose_grid(image.width, image.height, config, max_tiles)
    regular = grid[0] * grid[1]
    has_thumbnail = tile_count(grid, config) > regular
    kinds: tuple[TileKind, ...] = ("tile",) * regular + (("thumbnail",) if has_thumbnail else ())
    return Tiling(
        image=image,
        config=config,
        grid=grid,
        num_tiles=len(kinds),
        has_thumbnail=has_thumbnail,
        image_size=image.size,
        tile_kinds=kinds,
    )
