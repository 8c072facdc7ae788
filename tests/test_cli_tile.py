"""`nvlm-export tile`: the README's first command, its JSON, its PNG dump and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from nvlm_export.assets import EXAMPLE_SIZE, example_image_path, make_example_image
from nvlm_export.cli import app

runner = CliRunner()
CLI = Path(sys.executable).parent / "nvlm-export"


def run_json(*args: str) -> dict:
    result = runner.invoke(app, ["tile", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def square(tmp_path: Path) -> Path:
    path = tmp_path / "square.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (1000, 1000, 3), dtype=np.uint8)).save(path)
    return path


def test_no_argument_tiles_the_builtin_example() -> None:
    result = runner.invoke(app, ["tile"])
    assert result.exit_code == 0, result.output
    assert "2 x 1" in result.stdout
    assert "768" in result.stdout  # 3 tiles x 256 tokens


def test_example_asset_is_small_and_the_documented_shape() -> None:
    path = example_image_path()
    assert path.stat().st_size < 100_000
    with Image.open(path) as image:
        assert image.size == EXAMPLE_SIZE == (1280, 720)
    assert np.array_equal(np.asarray(make_example_image()), np.asarray(make_example_image()))


def test_json_fields(square: Path) -> None:
    report = run_json(str(square))
    assert report["grid"] == {"cols": 2, "rows": 2}
    assert report["num_tiles"] == 5
    assert report["has_thumbnail"] is True
    assert report["tile_kinds"] == ["tile"] * 4 + ["thumbnail"]
    assert report["tokens_per_tile"] == 256
    assert report["image_tokens"] == 1280
    assert (report["width"], report["height"]) == (1000, 1000)
    assert report["pixel_values_shape"] == [5, 3, 448, 448]
    assert report["config"] == {"tile_size": 448, "min_tiles": 1, "max_tiles": 6,
                                "use_thumbnail": True}  # fmt: skip


def test_options_change_the_tiling(square: Path, tmp_path: Path) -> None:
    assert run_json(str(square), "--no-thumbnail")["num_tiles"] == 4
    assert run_json(str(square), "--max-tiles", "1")["num_tiles"] == 1
    wide = tmp_path / "wide.png"
    Image.new("RGB", (1920, 1080)).save(wide)
    assert run_json(str(wide))["grid"] == {"cols": 2, "rows": 1}
    assert run_json(str(wide), "--max-tiles", "12")["grid"] == {"cols": 4, "rows": 2}
    assert run_json(str(wide), "--min-tiles", "3")["grid"] == {"cols": 3, "rows": 2}
    assert run_json(str(wide), "--tile-size", "224")["tokens_per_tile"] == 64


def test_save_dir_writes_one_png_per_tile(square: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiles"
    report = run_json(str(square), "--save-dir", str(out))
    names = sorted(p.name for p in out.iterdir())
    assert names == ["thumbnail.png", "tile_01.png", "tile_02.png", "tile_03.png", "tile_04.png"]
    assert len(report["saved"]) == report["num_tiles"]
    # tile_02 is the top-right quarter of the image resized to 896x896.
    resized = np.asarray(Image.open(square).resize((896, 896), Image.BICUBIC)).astype(int)
    tile = np.asarray(Image.open(out / "tile_02.png")).astype(int)
    assert tile.shape == (448, 448, 3)
    assert np.abs(tile - resized[:448, 448:]).max() <= 1


def test_bad_option_values_are_one_line_errors(square: Path) -> None:
    result = runner.invoke(app, ["tile", str(square), "--min-tiles", "7"])
    assert result.exit_code == 2
    assert "min_tiles" in result.stderr
    result = runner.invoke(app, ["tile", str(square), "--tile-size", "100"])
    assert result.exit_code == 2
    assert "multiple of 28" in result.stderr


def test_missing_file_via_cli_runner(tmp_path: Path) -> None:
    result = runner.invoke(app, ["tile", str(tmp_path / "absent.png")])
    assert result.exit_code == 2
    assert "does not exist" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("kind", ["corrupt", "text"])
def test_installed_command_fails_in_one_line(tmp_path: Path, kind: str) -> None:
    if kind == "corrupt":
        data = example_image_path().read_bytes()
        path = tmp_path / "corrupt.png"
        path.write_bytes(data[: len(data) // 2])
    else:
        path = tmp_path / "notes.txt"
        path.write_text("hello, I am text\n")
    result = subprocess.run([str(CLI), "tile", str(path)], capture_output=True, text=True)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert path.name in lines[0]
    assert ("truncated" if kind == "corrupt" else "not an image") in lines[0]
