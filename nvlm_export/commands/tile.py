"""`nvlm-export tile`: show how an image is split into tiles for the vision encoder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from nvlm_export.commands.options import in_panel
from nvlm_export.runtime.limits import MAX_TILE_SIZE, MAX_TILES

if TYPE_CHECKING:
    from nvlm_export.runtime.tiling import Tiling

Tiling = in_panel("Tiling")
Output = in_panel("Output")


def tile(
    image: Annotated[
        Path | None,
        typer.Argument(
            metavar="IMAGE",
            help="Image file to tile (PNG, JPEG, WebP, ...). Default: the built-in example image.",
            show_default=False,
        ),
    ] = None,
    max_tiles: Annotated[
        int, Tiling(min=1, max=MAX_TILES, help="Most regular tiles (NVLM-D: 6, InternVL2: 12).")
    ] = 6,
    tile_size: Annotated[int, Tiling(min=1, max=MAX_TILE_SIZE, help="Tile side in pixels.")] = 448,
    min_tiles: Annotated[int, Tiling(min=1, max=MAX_TILES, help="Fewest regular tiles.")] = 1,
    no_thumbnail: Annotated[
        bool,
        Tiling(
            "--no-thumbnail", help="Do not append the whole-image thumbnail to multi-tile grids."
        ),
    ] = False,
    as_json: Annotated[bool, Output("--json", help="Print the result as JSON.")] = False,
    save_dir: Annotated[
        Path | None,
        Output(
            help="Write each tile as a PNG here (tile_01.png, ..., thumbnail.png) to look at.",
            file_okay=False,
        ),
    ] = None,
) -> None:
    """Split an image into tiles the way NVLM / InternVL do (dynamic high resolution).

    The grid (cols x rows) is the one closest to the image's aspect ratio, with at most --max-tiles.
    The image is resized to fill the grid exactly and cut into tile-size squares.
    A multi-tile image also gets a thumbnail of the whole picture, placed last.
    Each 448-pixel tile becomes 256 image tokens, so tiles drive prompt length and ViT time.

    Example: a 1920x1080 photo gives a 2x1 grid plus a thumbnail (3 tiles, 768 image tokens):

        nvlm-export tile photo.jpg --save-dir tiles/
    """
    from nvlm_export.assets import example_image_path
    from nvlm_export.runtime.images import load_image
    from nvlm_export.runtime.tiling import TilingConfig, tile_image, tokens_per_tile

    config = TilingConfig(
        tile_size=tile_size,
        min_tiles=min_tiles,
        max_tiles=max_tiles,
        use_thumbnail=not no_thumbnail,
    )
    per_tile = tokens_per_tile(tile_size)
    source = image if image is not None else example_image_path()
    tiling = tile_image(load_image(source), config)
    saved = _save_tiles(tiling, save_dir) if save_dir is not None else []
    report = {
        "image": str(source),
        "width": tiling.image_size[0],
        "height": tiling.image_size[1],
        "grid": {"cols": tiling.grid[0], "rows": tiling.grid[1]},
        "num_tiles": tiling.num_tiles,
        "has_thumbnail": tiling.has_thumbnail,
        "tile_kinds": list(tiling.tile_kinds),
        "tokens_per_tile": per_tile,
        "image_tokens": per_tile * tiling.num_tiles,
        "pixel_values_shape": list(tiling.pixel_values.shape),
        "config": config.to_dict(),
        "saved": [str(path) for path in saved],
    }
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_table(report)


def _save_tiles(tiling: Tiling, save_dir: Path) -> list[Path]:
    from PIL import Image

    from nvlm_export.errors import InputError
    from nvlm_export.runtime.tiling import denormalize

    try:
        save_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"Cannot create {save_dir}", why=str(error).splitlines()[0]) from error
    paths = []
    regular = 0
    for pixels, kind in zip(denormalize(tiling.pixel_values), tiling.tile_kinds, strict=True):
        if kind == "thumbnail":
            name = "thumbnail.png"
        else:
            regular += 1
            name = f"tile_{regular:02d}.png"
        path = save_dir / name
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    grid = report["grid"]
    tiles = report["num_tiles"]
    thumbnail = " (incl. thumbnail)" if report["has_thumbnail"] else ""
    table = Table(title="Dynamic high-resolution tiling", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("image", report["image"])
    table.add_row("size", f"{report['width']} x {report['height']}")
    table.add_row("grid (cols x rows)", f"{grid['cols']} x {grid['rows']}")
    table.add_row("tiles", f"{tiles}{thumbnail}")
    table.add_row("tile size", f"{report['config']['tile_size']} px")
    table.add_row(
        "image tokens", f"{report['image_tokens']} ({tiles} x {report['tokens_per_tile']})"
    )
    if report["saved"]:
        table.add_row("saved", f"{len(report['saved'])} PNGs in {Path(report['saved'][0]).parent}")
    Console(soft_wrap=True).print(table)
