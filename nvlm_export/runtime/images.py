"""Load any image a user is likely to hand us as an 8-bit RGB PIL image, or fail in one line.

Accepted sources: a path (str or Path), encoded bytes, a PIL image, or a numpy array (H×W×3 camera
frames; H×W×4 and H×W too). Every mode becomes RGB:

- grayscale (1, L, I;16, I, F) and CMYK / YCbCr / LAB / HSV: converted to RGB, 16-bit and float
  data rescaled to 0..255 rather than clipped;
- anything with transparency (RGBA, LA, PA, P with a transparent colour): composited on WHITE.
  The InternVL / NVLM reference calls `.convert("RGB")`, which drops alpha and exposes whatever
  colour hides under transparent pixels (often black); white is what a viewer shows and what a
  document or a logo on a page looks like, so transparent regions do not become black blocks.

A path is opened without blocking and checked before a byte is read: only regular files are
accepted (a FIFO, a device such as /dev/zero or a socket is refused), and files and encoded bytes
larger than `max_bytes` (default `limits.DEFAULT_MAX_IMAGE_BYTES`, 64 MiB) are refused.
Files and bytes are fully decoded (`.load()`), so a truncated file fails here, not later. A
decompression-bomb guard uses Pillow's own MAX_IMAGE_PIXELS check with its warning turned into an
error; the limit applies to encoded input (paths and bytes), which is where the risk lies.
EXIF orientation is ignored by default, like the reference; pass `exif_transpose=True` to apply it.
"""

from __future__ import annotations

import io
import os
import re
import stat
import threading
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from nvlm_export.errors import ImageError
from nvlm_export.runtime.limits import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS

_URL_SCHEME = re.compile(r"^(https?|ftp|s3|gs):/", re.IGNORECASE)

ImageSource = Union[str, Path, bytes, bytearray, Image.Image, np.ndarray]  # noqa: UP007

# Image.MAX_IMAGE_PIXELS is a process-wide setting; serialise our temporary changes to it.
_PIXEL_LIMIT_LOCK = threading.Lock()


def load_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    exif_transpose: bool = False,
) -> Image.Image:
    """Return `source` as an RGB image (transparency composited on white).

    Raises ImageError with a one-line message for a missing file, a directory or other non-regular
    file, a file or bytes above `max_bytes`, data that is not an image, a truncated file, an empty
    image, or an encoded image with more than `max_pixels` pixels.
    """
    if isinstance(source, Image.Image):
        image = _loaded(source)
    elif isinstance(source, np.ndarray):
        image = _image_from_array(source)
    elif isinstance(source, (bytes, bytearray)):
        check_encoded_size(len(source), max_bytes, "The image data")
        image = _decode(io.BytesIO(bytes(source)), "the image bytes", max_pixels)
    elif isinstance(source, (str, Path)):
        data = _read_file(Path(source), max_bytes)
        image = _decode(io.BytesIO(data), str(source), max_pixels)
    else:
        raise ImageError(
            f"Cannot read an image from a {type(source).__name__}",
            fix="Pass a file path, encoded bytes, a PIL image or an HxWx3 uint8 numpy array",
        )
    if image.width < 1 or image.height < 1:
        raise ImageError(f"The image is empty ({image.width}x{image.height} pixels)")
    if exif_transpose:
        image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def _read_file(path: Path, max_bytes: int) -> bytes:
    """The whole file, refused unless it is a regular file of at most `max_bytes`.

    It is opened non-blocking (opening a FIFO for reading would otherwise wait for a writer) and
    checked with fstat on the open descriptor, so the file checked is the file read.
    """
    # Reading the bytes up front leaves no file handle open behind a lazily loaded image.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        if _URL_SCHEME.match(str(path)):  # a Path has folded its "//" into "/"
            raise ImageError(
                f"Image {path} looks like a URL",
                why="images are read from files or bytes; nothing is downloaded",
                fix="Download the image and pass the file",
            ) from None
        raise ImageError(f"Image file {path} does not exist", fix="Check the path") from None
    except OSError as error:
        raise ImageError(f"Cannot read {path}", why=_first_line(error)) from error
    try:
        _check_regular_file(path, os.fstat(fd), max_bytes)
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(max_bytes + 1)  # the file may grow after the check
    except OSError as error:
        raise ImageError(f"Cannot read {path}", why=_first_line(error)) from error
    finally:
        os.close(fd)
    check_encoded_size(len(data), max_bytes, str(path))
    return data


def _check_regular_file(path: Path, info: os.stat_result, max_bytes: int) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"{path} is a directory, not an image file", fix="Pass an image file")
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(
            f"{path} is not a regular file",
            why="devices, FIFOs and sockets can block or never end",
            fix="Pass an image file, or read the data yourself and pass the bytes",
        )
    check_encoded_size(info.st_size, max_bytes, str(path))


def check_encoded_size(size: int, max_bytes: int, name: str) -> None:
    """Refuse encoded image data (a file's or a buffer's) above `max_bytes`."""
    if size > max_bytes:
        raise ImageError(
            f"{name} is {size} bytes, above the {max_bytes}-byte limit for encoded images",
            why="the limit bounds memory and decoding time for untrusted input",
            fix="Recompress or downscale the image, or raise the limit (max_bytes / "
            "max_image_bytes in Python, nvlm_request_set_max_image_bytes in C)",
        )


def _loaded(image: Image.Image) -> Image.Image:
    """A PIL image opened by the caller may still be lazy; decode it so errors surface here."""
    try:
        image.load()
    except OSError as error:
        raise ImageError("The image is truncated or corrupt", why=_first_line(error)) from error
    return image


def _decode(file: io.BytesIO, name: str, max_pixels: int) -> Image.Image:
    """Open and fully decode, turning every Pillow failure into one ImageError line."""
    with _PIXEL_LIMIT_LOCK, warnings.catch_warnings():
        # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; make both an error.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        saved_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            image = Image.open(file)
            image.load()  # decode every byte now, so a truncated file fails here
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
            raise ImageError(
                f"{name} is too large to decode safely",
                why=f"it has more than {max_pixels} pixels, the limit against decompression bombs",
                fix="Downscale it; from Python, load_image(max_pixels=...) raises the limit",
            ) from error
        except UnidentifiedImageError as error:
            raise ImageError(
                f"{name} is not an image Pillow can read", fix="Pass a PNG, JPEG, WebP, etc."
            ) from error
        except (OSError, SyntaxError, ValueError) as error:
            # Pillow reports truncated and corrupt data as OSError (some plugins: SyntaxError).
            raise ImageError(
                f"{name} is truncated or corrupt",
                why=_first_line(error),
                fix="Re-download or re-export the image",
            ) from error
        finally:
            Image.MAX_IMAGE_PIXELS = saved_limit
    return image


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _image_from_array(array: np.ndarray) -> Image.Image:
    """H×W (gray), H×W×3 (RGB) or H×W×4 (RGBA) arrays of uint8, uint16 or floats in [0, 1]."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageError(
            f"An image array must be HxW, HxWx3 or HxWx4, got shape {array.shape}",
            fix="Pass channels last (e.g. a camera frame as HxWx3)",
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"The image array is empty (shape {array.shape})")
    array = np.ascontiguousarray(_as_uint8(array))
    return Image.fromarray(array)  # uint8 HxW -> L, HxWx3 -> RGB, HxWx4 -> RGBA


def _as_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        return _rescale_16bit(array)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ImageError(
                "A float image array must hold values in [0, 1]",
                fix="Scale it to [0, 1] or pass uint8",
            )
        return np.rint(array * 255).astype(np.uint8)
    raise ImageError(
        f"Unsupported image array dtype {array.dtype}", fix="Pass uint8, uint16 or float in [0, 1]"
    )


def _rescale_16bit(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 with rounding (65535 / 257 = 255 exactly)."""
    return np.rint(np.clip(values, 0, 65535) / 257).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if _has_transparency(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        return _wide_gray_to_rgb(image)
    return image.convert("RGB")


def _has_transparency(image: Image.Image) -> bool:
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return True
    return image.mode in ("P", "L", "RGB") and "transparency" in image.info


def _wide_gray_to_rgb(image: Image.Image) -> Image.Image:
    """16/32-bit integer and float grayscale to 8-bit, rescaling instead of clipping at 255.

    Integer modes (I;16*, and I, which Pillow also uses for 16-bit files) are read as 16-bit data
    unless every value already fits in 0..255. Float images are read as [0, 1] if they fit there,
    otherwise as 0..255 and clipped.
    """
    values = np.asarray(image)
    if image.mode == "F":
        scale = 255.0 if np.nanmax(values) <= 1.0 else 1.0
        gray = np.rint(np.clip(np.nan_to_num(values) * scale, 0, 255)).astype(np.uint8)
    elif values.max() > 255 or image.mode.startswith("I;16"):
        gray = _rescale_16bit(values.astype(np.int64))
    else:
        gray = np.clip(values, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(gray)).convert("RGB")
