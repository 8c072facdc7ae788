"""Synthetic inputs of a chosen size: an image that tiles into N tiles, a question of N tokens."""

from __future__ import annotations

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from nvlm_export.errors import InputError
from nvlm_export.runtime.tiling import TilingConfig, candidate_grids, choose_grid, tile_count

FILLER = " and what else can be seen here"  # words appended until the question is long enough
BASE_QUESTION = "Describe the picture in detail"


def image_size_for_tiles(tiles: int, config: TilingConfig) -> tuple[int, int]:
    """A (width, height) that the bundle's tiling cuts into exactly `tiles` tiles (thumbnail
    included), e.g. 1 -> 448x448, 3 -> 896x448, 7 -> 1344x896 with 448 px tiles.

    An image of exactly the grid's pixel size has the grid's aspect ratio, and is too small for
    a larger grid of the same ratio to win the reference's tie rule.
    """
    size = config.tile_size
    for grid in candidate_grids(config.min_tiles, config.max_tiles):
        width, height = size * grid[0], size * grid[1]
        if tile_count(grid, config) == tiles and choose_grid(width, height, config) == grid:
            return width, height
    possible = sorted(
        {tile_count(g, config) for g in candidate_grids(config.min_tiles, config.max_tiles)}
    )
    raise InputError(
        f"No image tiles into exactly {tiles} tiles with this bundle",
        why=f"its tiling ({config.min_tiles}..{config.max_tiles} tiles, thumbnail "
        f"{'on' if config.use_thumbnail else 'off'}) gives {possible}",
        fix=f"Choose tile counts from {possible}",
    )


def synthetic_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: decodes and resizes like a photo, not like flat colour."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    noise = rng.normal(0, 20, size=(height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def question_with_tokens(tokenizer: Tokenizer, tokens: int, base: str = BASE_QUESTION) -> str:
    """A question starting with `base` that the tokenizer turns into exactly `tokens` tokens
    (no special tokens)."""
    if tokens < 1:
        raise InputError(f"A question of {tokens} tokens is impossible", fix="Use >= 1 token")

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    text = base
    while count(text) < tokens:
        text += FILLER
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    # Cut at the token level; decoding and re-encoding can merge differently at the cut, so step
    # the cut until the round trip holds exactly `tokens` tokens.
    for cut in range(tokens, len(ids) + 1):
        candidate = tokenizer.decode(ids[:cut])
        if count(candidate) == tokens:
            return candidate
    raise InputError(
        f"Cannot build a question of exactly {tokens} tokens with this tokenizer",
        fix="Try a neighbouring --prompt-tokens value",
    )
