"""DHR tiling must match the InternVL / NVLM reference bit for bit.

The reference is re-stated plainly below (`reference_*`), written from the published algorithm and
independent of nvlm_export.runtime.tiling, so a bug shared by both is unlikely; the documented
examples and tie cases are also asserted by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from nvlm_export.errors import InputError
from nvlm_export.runtime.manifest import record_from_json
from nvlm_export.runtime.tiling import (
    Tiling,
    TilingConfig,
    candidate_grids,
    choose_grid,
    denormalize,
    tile_count,
    tile_image,
    tokens_per_tile,
)

S = 448


# --- the reference, re-stated plainly -------------------------------------------------------------
def reference_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    ratios = set()
    for n in range(min_num, max_num + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if i * j <= max_num and i * j >= min_num:
                    ratios.add((i, j))
    return sorted(ratios, key=lambda x: x[0] * x[1])


def reference_closest(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * image_size**2 * ratio[0] * ratio[1]:
            best_ratio = ratio
    return best_ratio


def reference_pixel_values(image: Image.Image, max_num: int = 6) -> np.ndarray:
    w, h = image.size
    grid = reference_closest(w / h, reference_grids(1, max_num), w, h, S)
    resized = image.resize((S * grid[0], S * grid[1]), Image.BICUBIC)
    crops = []
    for k in range(grid[0] * grid[1]):
        col, row = k % grid[0], k // grid[0]
        crops.append(resized.crop((col * S, row * S, (col + 1) * S, (row + 1) * S)))
    if len(crops) != 1:
        crops.append(image.resize((S, S), Image.BICUBIC))
    out = []
    for crop in crops:
        x = np.array(crop.resize((S, S), Image.BICUBIC), dtype=np.float64) / 255.0
        x = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
        out.append(x.transpose(2, 0, 1))
    return np.stack(out)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# --- candidate grids and grid choice -------------------------------------------------------------
def test_candidate_order_for_nvlm_d_is_the_reference_order() -> None:
    expected = [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5), (5, 1),
                (6, 1), (2, 3), (1, 6), (3, 2)]  # fmt: skip
    assert list(candidate_grids(1, 6)) == expected


@pytest.mark.parametrize(("min_num", "max_num"), [(1, 6), (1, 12), (2, 9), (1, 1), (4, 4)])
def test_candidate_order_matches_reference_for_other_budgets(min_num: int, max_num: int) -> None:
    assert list(candidate_grids(min_num, max_num)) == reference_grids(min_num, max_num)


@pytest.mark.parametrize(
    ("size", "grid", "num_tiles"),
    [((1920, 1080), (2, 1), 3), ((1000, 1000), (2, 2), 5), ((500, 400), (1, 1), 1)],
)
def test_documented_examples(size: tuple[int, int], grid: tuple[int, int], num_tiles: int) -> None:
    tiling = tile_image(Image.new("RGB", size, (90, 120, 200)))
    assert tiling.grid == grid
    assert tiling.num_tiles == num_tiles
    assert tiling.pixel_values.shape == (num_tiles, 3, S, S)
    assert tiling.pixel_values.dtype == np.float32
    assert tiling.has_thumbnail == (num_tiles > 1)
    assert tiling.image_size == size


@pytest.mark.parametrize(
    ("size", "grid"),
    [
        ((500, 500), (1, 1)),  # ratio 1 ties (2,2) but 250000 px <= 0.5·448²·4: stay small
        ((700, 700), (2, 2)),  # 490000 px > 401408: move to the later (2,2)
        ((300, 200), (1, 1)),  # 1.5: (2,1) and (2,2) tie (1,1) at 0.5; 60000 px is too few
    ],
)
def test_exact_tie_rule(size: tuple[int, int], grid: tuple[int, int]) -> None:
    w, h = size
    assert choose_grid(w, h, TilingConfig(max_tiles=4)) == grid


def test_exact_tie_moves_only_past_half_the_grid_area() -> None:
    # 3:2 with max 2 tiles: (1,1) and (2,1) are both 0.5 away; (2,1) needs > 200704 pixels.
    config = TilingConfig(max_tiles=2)
    assert choose_grid(546, 364, config) == (1, 1)  # 198744 px
    assert choose_grid(552, 368, config) == (2, 1)  # 203136 px


@pytest.mark.parametrize(("size", "grid"), [((1008, 896), (2, 2)), ((2048, 588), (3, 1))])
def test_exact_tie_at_exactly_half_the_area_stays(
    size: tuple[int, int], grid: tuple[int, int]
) -> None:
    # w·h == 0.5·448²·i·j for the later tied grid ((3,3) and (6,2)): "more than" means stay.
    assert choose_grid(*size, TilingConfig(max_tiles=12)) == grid


def _sweep_sizes() -> list[tuple[int, int]]:
    sizes = [(w, h) for w in (1, 2, 7, 100, 224, 448, 449, 640, 896, 1344, 5000)
             for h in (1, 3, 100, 300, 448, 720, 1080, 4000)]  # fmt: skip
    # Exact ratios of every candidate grid at several scales: these hit the tie branch.
    for cols, rows in candidate_grids(1, 12):
        sizes += [(cols * k, rows * k) for k in (10, 150, 224, 300, 448, 1000)]
    return sizes


@pytest.mark.parametrize("max_num", [1, 2, 4, 6, 12])
def test_grid_choice_matches_reference_over_aspect_ratio_sweep(max_num: int) -> None:
    config = TilingConfig(max_tiles=max_num)
    grids = reference_grids(1, max_num)
    for w, h in _sweep_sizes():
        assert choose_grid(w, h, config) == reference_closest(w / h, grids, w, h, S), (w, h)


# --- pixels -------------------------------------------------------------------------------------
# Tiny, wide, tall and square images, and sizes one pixel off a tile.
PIXEL_SIZES = [(1, 1), (2, 1), (1, 3), (37, 29), (500, 400), (1920, 1080), (300, 2000)]
PIXEL_SIZES += [(1000, 1000), (4000, 30), (449, 448)]


@pytest.mark.parametrize("size", PIXEL_SIZES)
def test_pixel_values_match_reference_transform(size: tuple[int, int]) -> None:
    image = noise_image(*size, seed=sum(size))
    expected = reference_pixel_values(image)
    tiling = tile_image(image)
    assert tiling.pixel_values.shape == expected.shape
    assert np.abs(tiling.pixel_values - expected).max() <= 1e-6


def test_normalisation_is_bitwise_torchvision_float32() -> None:
    """torchvision's ToTensor + Normalize: float32 x/255, then (x - mean) / std."""
    torch = pytest.importorskip("torch")
    image = noise_image(448, 448, seed=3)
    tiling = tile_image(image)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    expected = x.sub(mean).div(std).numpy()
    assert np.array_equal(tiling.pixel_values[0], expected)


def test_tiles_are_row_major_crops_and_thumbnail_is_last() -> None:
    # 2x3 grid of solid colours exactly matching the grid: each tile must be one colour.
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    image = Image.new("RGB", (2 * S, 3 * S))
    for k, colour in enumerate(colours):
        col, row = k % 2, k // 2
        image.paste(colour, (col * S, row * S, (col + 1) * S, (row + 1) * S))
    tiling = tile_image(image)
    assert tiling.grid == (2, 3)
    assert tiling.tile_kinds == ("tile",) * 6 + ("thumbnail",)
    tiles = denormalize(tiling.pixel_values)
    for k, colour in enumerate(colours):
        assert np.abs(tiles[k][S // 2, S // 2].astype(int) - colour).max() <= 1, k
    thumbnail_expected = np.asarray(image.resize((S, S), Image.BICUBIC))
    assert np.abs(tiles[-1].astype(int) - thumbnail_expected).max() <= 1


def test_denormalize_round_trips_uint8() -> None:
    image = noise_image(448, 448, seed=5)
    assert np.array_equal(denormalize(tile_image(image).pixel_values)[0], np.asarray(image))


# --- budget and config ----------------------------------------------------------------------------
def test_per_call_budget_limits_tiles_and_is_clamped_to_config() -> None:
    image = Image.new("RGB", (1920, 1080))
    assert tile_image(image, max_tiles=1).num_tiles == 1
    assert tile_image(image, max_tiles=100).grid == tile_image(image).grid == (2, 1)
    internvl = TilingConfig(max_tiles=12)
    assert tile_image(image, internvl).grid == (4, 2)
    assert tile_image(image, internvl, max_tiles=6).grid == (2, 1)


@pytest.mark.parametrize("budget", [0, -1, 1.5, True])
def test_bad_budget_raises_input_error(budget: object) -> None:
    with pytest.raises(InputError, match="max_tiles"):
        choose_grid(100, 100, TilingConfig(), max_tiles=budget)  # type: ignore[arg-type]


def test_budget_below_min_tiles_raises() -> None:
    with pytest.raises(InputError, match="min_tiles"):
        choose_grid(100, 100, TilingConfig(min_tiles=2), max_tiles=1)


def test_no_thumbnail_and_min_tiles() -> None:
    image = Image.new("RGB", (1000, 1000))
    tiling = tile_image(image, TilingConfig(use_thumbnail=False))
    assert (tiling.num_tiles, tiling.has_thumbnail) == (4, False)
    assert tiling.tile_kinds == ("tile",) * 4
    # min_tiles=2 rules out (1,1): 5:4 is nearest the square (2,2) grid.
    assert tile_image(Image.new("RGB", (500, 400)), TilingConfig(min_tiles=2)).grid == (2, 2)


def test_tile_count_agrees_with_tile_image() -> None:
    cases = [
        ((1920, 1080), TilingConfig()),
        ((640, 480), TilingConfig(max_tiles=12)),
        ((100, 100), TilingConfig()),
        ((1000, 1000), TilingConfig(use_thumbnail=False)),
    ]
    for size, config in cases:
        tiling = tile_image(Image.new("RGB", size), config)
        assert tile_count(choose_grid(*size, config), config) == tiling.num_tiles


def test_config_round_trips_through_a_dict() -> None:
    config = TilingConfig(tile_size=448, min_tiles=1, max_tiles=12, use_thumbnail=False)
    data = config.to_dict()
    assert data == {"tile_size": 448, "min_tiles": 1, "max_tiles": 12, "use_thumbnail": False}
    assert record_from_json(TilingConfig, data, "tiling") == config


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(InputError, match="max_num"):
        record_from_json(TilingConfig, {"max_num": 6}, "tiling")
    with pytest.raises(InputError, match="min_tiles"):
        TilingConfig(min_tiles=7, max_tiles=6)
    with pytest.raises(InputError, match="tile_size"):
        TilingConfig(tile_size=0)


def test_tokens_per_tile() -> None:
    assert tokens_per_tile(448) == 256
    assert tokens_per_tile(224) == 64
    with pytest.raises(InputError, match="multiple of 28"):
        tokens_per_tile(100)


def test_tile_image_refuses_non_rgb() -> None:
    with pytest.raises(InputError, match="RGB"):
        tile_image(Image.new("RGBA", (10, 10)))


def test_tiling_result_exposes_what_the_prompt_builder_needs() -> None:
    tiling = tile_image(Image.new("RGB", (1920, 1080)))
    assert isinstance(tiling, Tiling)
    assert (tiling.num_tiles, tiling.has_thumbnail, tiling.tile_size) == (3, True, 448)


def test_tiling_knows_its_grid_before_it_cuts_the_pixels() -> None:
    """The prompt needs only the grid; the pixels are cut on first use, once."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (448, 1344, 3), np.uint8))
    tiling = tile_image(image, TilingConfig(max_tiles=6))
    assert (tiling.grid, tiling.num_tiles, tiling.tile_kinds[-1]) == ((3, 1), 4, "thumbnail")
    assert "pixel_values" not in vars(tiling)
    pixels = tiling.pixel_values
    assert pixels.shape == (4, 3, 448, 448) and tiling.pixel_values is pixels
