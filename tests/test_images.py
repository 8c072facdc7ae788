"""load_image turns every input a user is likely to have into RGB, or fails with one useful line."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nvlm_export.errors import ImageError
from nvlm_export.runtime.images import load_image
from nvlm_export.runtime.limits import DEFAULT_MAX_PIXELS


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


@pytest.fixture
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


# --- input kinds -------------------------------------------------------------------------------
def test_paths_bytes_pil_and_arrays_give_the_same_pixels(
    photo: Image.Image, tmp_path: Path
) -> None:
    path = tmp_path / "photo.png"
    photo.save(path)
    expected = pixels(photo)
    for source in (str(path), path, path.read_bytes(), bytearray(path.read_bytes()), photo,
                   np.asarray(photo)):  # fmt: skip
        assert np.array_equal(pixels(load_image(source)), expected), type(source)


def test_camera_frame_layouts() -> None:
    gray = np.full((4, 6), 77, dtype=np.uint8)
    assert pixels(load_image(gray)).tolist() == np.full((4, 6, 3), 77).tolist()
    assert pixels(load_image(gray[:, :, None]))[0, 0].tolist() == [77, 77, 77]
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, :3, 3] = 255  # left half opaque red, right half transparent
    out = pixels(load_image(rgba))
    assert out[0, 0].tolist() == [200, 0, 0]
    assert out[0, 5].tolist() == [255, 255, 255]


def test_non_contiguous_and_wide_arrays() -> None:
    frame = np.arange(5 * 8 * 3, dtype=np.uint8).reshape(5, 8, 3)
    flipped = frame[:, ::-1]  # a view with negative strides, as cv2/numpy flips produce
    assert np.array_equal(pixels(load_image(flipped)), flipped)
    white16 = np.full((2, 2, 3), 65535, dtype=np.uint16)
    assert pixels(load_image(white16))[0, 0].tolist() == [255] * 3
    assert pixels(load_image(np.full((2, 2, 3), 0.5)))[0, 0].tolist() == [128] * 3


# --- modes ---------------------------------------------------------------------------------------
def test_rgba_composites_on_white() -> None:
    image = Image.new("RGBA", (3, 1))
    image.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent: white
    image.putpixel((1, 0), (10, 20, 30, 255))  # opaque: unchanged
    image.putpixel((2, 0), (0, 0, 0, 128))  # half black over white: mid grey
    out = pixels(load_image(encode(image)))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [10, 20, 30]
    assert all(abs(v - 127) <= 1 for v in out[0, 2])


def test_la_and_palette_transparency_composite_on_white() -> None:
    la = Image.new("LA", (2, 1), (40, 0))
    la.putpixel((1, 0), (40, 255))
    assert pixels(load_image(la)).tolist() == [[[255] * 3, [40] * 3]]

    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # index 0 (black) is transparent
    out = pixels(load_image(encode(palette)))
    assert out.tolist() == [[[255, 255, 255], [250, 10, 10]]]


def test_palette_without_transparency_keeps_colours() -> None:
    palette = Image.new("P", (1, 1), 1)
    palette.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    assert pixels(load_image(encode(palette, "GIF"))).tolist() == [[[12, 34, 56]]]


@pytest.mark.parametrize(
    ("image", "value"),
    [
        (Image.new("L", (2, 2), 100), 100),
        (Image.new("1", (2, 2), 1), 255),
        (Image.new("I;16", (2, 2), 65535), 255),  # 16-bit is rescaled, not clipped
        (Image.new("I;16", (2, 2), 257 * 100), 100),
        (Image.new("I", (2, 2), 257 * 50), 50),  # Pillow also uses I for 16-bit files
        (Image.new("I", (2, 2), 200), 200),  # values already 8-bit stay as they are
        (Image.new("F", (2, 2), 0.5), 128),  # float in [0, 1]
        (Image.new("F", (2, 2), 300.0), 255),
    ],
)
def test_gray_modes_become_equal_rgb(image: Image.Image, value: int) -> None:
    assert pixels(load_image(image)).tolist() == np.full((2, 2, 3), value).tolist()


def test_sixteen_bit_png_file_is_rescaled(tmp_path: Path) -> None:
    ramp = (np.arange(4, dtype=np.uint16) * 20000).reshape(1, 4)  # 0, 20000, 40000, 60000
    path = tmp_path / "depth.png"
    Image.fromarray(ramp).save(path)
    out = pixels(load_image(path))[0, :, 0]
    assert out.tolist() == np.rint(ramp[0] / 257).astype(int).tolist()


def test_cmyk_and_ycbcr_convert() -> None:
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))  # pure red in CMYK
    assert pixels(load_image(encode(cmyk, "JPEG", quality=100)))[0, 0, 0] >= 250
    assert pixels(load_image(cmyk))[0, 0].tolist() == [255, 0, 0]
    ycbcr = Image.new("RGB", (1, 1), (0, 128, 255)).convert("YCbCr")
    assert np.abs(pixels(load_image(ycbcr))[0, 0] - [0, 128, 255]).max() <= 3


def test_exif_orientation_is_ignored_by_default_like_the_reference() -> None:
    image = Image.new("RGB", (4, 2), (1, 2, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    data = encode(image, "JPEG", exif=exif.tobytes())
    assert load_image(data).size == (4, 2)
    assert load_image(data, exif_transpose=True).size == (2, 4)


# --- bad input -----------------------------------------------------------------------------------
def assert_one_line(error: pytest.ExceptionInfo[ImageError], *needles: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("url", ["https://example.com/a.jpg", "HTTP://example.com/a.png"])
def test_a_url_is_said_to_be_one_not_a_missing_file(url: str) -> None:
    with pytest.raises(ImageError) as error:
        load_image(Path(url))  # as the CLI passes it: "//" already folded
    assert_one_line(error, "looks like a URL", "nothing is downloaded")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as error:
        load_image(tmp_path / "nope.jpg")
    assert_one_line(error, "nope.jpg", "does not exist")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as error:
        load_image(tmp_path)
    assert_one_line(error, str(tmp_path), "directory")


def test_text_file_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageError) as error:
        load_image(path)
    assert_one_line(error, "notes.png", "not an image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_fails_on_load(photo: Image.Image, tmp_path: Path, fmt: str) -> None:
    data = encode(photo.resize((256, 256)), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageError) as error:
        load_image(path)
    assert_one_line(error, "cut.", "truncated")


def test_truncated_lazy_pil_image(photo: Image.Image) -> None:
    data = encode(photo.resize((256, 256)))
    lazy = Image.open(io.BytesIO(data[: len(data) // 2]))
    with pytest.raises(ImageError, match="truncated"):
        load_image(lazy)


def test_empty_inputs() -> None:
    with pytest.raises(ImageError, match="empty"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="empty"):
        load_image(np.zeros((0, 4, 3), dtype=np.uint8))
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"")


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((2, 2, 2), np.uint8),  # two channels
        np.zeros((2, 2, 3, 1), np.uint8),  # a batch axis too many
        np.zeros((2, 2, 3), np.int64),
        np.full((2, 2, 3), 2.0),  # float outside [0, 1]
        np.full((2, 2, 3), np.nan),
    ],
)
def test_bad_arrays(array: np.ndarray) -> None:
    with pytest.raises(ImageError):
        load_image(array)


def test_unsupported_source_type() -> None:
    with pytest.raises(ImageError, match="int"):
        load_image(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("limit", [5_000, 1_000])  # Pillow warns above 1x and raises above 2x
def test_decompression_bomb_guard(photo: Image.Image, limit: int) -> None:
    data = encode(photo.resize((100, 60)))  # 6000 pixels
    saved = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError) as error:
        load_image(data, max_pixels=limit)
    assert_one_line(error, "too large", f"more than {limit} pixels", "max_pixels=")
    assert str(2 * limit) not in str(error.value)  # Pillow's own (doubled) limit is not shown
    assert saved == Image.MAX_IMAGE_PIXELS  # the process-wide setting is restored
    assert load_image(data, max_pixels=6_000).size == (100, 60)


def test_default_pixel_limit_is_generous_but_finite() -> None:
    assert 48_000_000 <= DEFAULT_MAX_PIXELS <= 100_000_000
