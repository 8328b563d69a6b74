"""Turn whatever users hand us (paths, bytes, PIL images, numpy arrays) into an RGB PIL image.

Each failure raises `InputError` with a reason a person can act on; callers record it
against that one item and go on with the rest. Conversions that PIL gets wrong by
default are done here on purpose:

- EXIF orientation is applied (phones store portrait photos sideways);
- transparency is composited on white (a transparent logo on black is a black square);
- 16-bit images are scaled to 8 bits (PIL's `convert('RGB')` clips them to white);
- large JPEGs are decoded at reduced scale (`draft`) close to the model's input size,
  so a 12-megapixel photo is not fully decoded to make a 224-pixel input.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import threading
import warnings
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

log = logging.getLogger(__name__)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

# File suffixes treated as images when walking folders.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Photos of kinds Pillow does not read here (phones' HEIC, cameras' RAW): never decoded, but counted
# and named when a folder holds them, so they are not skipped silently.
OTHER_IMAGE_SUFFIXES = frozenset({".heic", ".heif", ".avif", ".jxl", ".cr2", ".cr3", ".nef", ".arw", ".dng", ".raf",
                                  ".orf", ".rw2", ".psd"})


def supported_types() -> str:
    """'bmp, gif, jpeg, jpg, png, tif, tiff, webp' (for messages and --help)."""
    return ", ".join(sorted(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES))


# PIL's own bomb threshold (about 89 megapixels); anything larger is refused before decoding.
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
# Long side : short side. CLIP preprocessing scales the short side to the model's input size, so an
# 8000x1 strip (104 bytes of PNG) became a 1,792,000x224 intermediate: 2.4 GB. At 50:1 the
# intermediate stays under 50 input squares (2.5 MP at 224 px); wide panoramas are about 10:1.
MAX_ASPECT_RATIO = 50
WHITE = (255, 255, 255)


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               draft_size: int | None = None) -> Image.Image:
    """Decode `source` into an RGB image. `draft_size` lets JPEG decode at >= that many pixels a side."""
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels)
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        return to_rgb(array_to_image(source, max_pixels))
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise InputError("empty image data (0 bytes)")
        return _decode(io.BytesIO(bytes(source)), max_pixels, draft_size)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise InputError(f"file not found: {path}") from None
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
        if path.is_dir():
            raise InputError(f"is a directory, not an image: {path}")
        if size == 0:
            raise InputError(f"empty file (0 bytes): {path}")
        try:
            with open(path, "rb") as fh, exif_warnings(str(path)):
                return _decode(fh, max_pixels, draft_size)
        except PermissionError:
            raise InputError(f"permission denied: {path}") from None
    raise InputError(f"unsupported image source type {type(source).__name__}")


CHECK_DRAFT_SIZE = 64  # JPEGs are checked at reduced scale: every byte still read, far less decoded


def unreadable_images(paths: Sequence[str | os.PathLike], *, workers: int = 4) -> dict[str, str]:
    """{path: reason} for the files that do not decode: empty, not an image, truncated, corrupt.

    Decoding is the only check that catches a truncated file; threads overlap it (PIL releases the GIL).
    """
    def problem(path: str | os.PathLike) -> Optional[str]:
        try:
            load_image(path, draft_size=CHECK_DRAFT_SIZE)
        except InputError as exc:
            return str(exc)
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return {str(p): reason for p, reason in zip(paths, pool.map(problem, paths)) if reason}


def _decode(stream: Any, max_pixels: int, draft_size: int | None) -> Image.Image:
    try:
        image = Image.open(stream)
    except UnidentifiedImageError:
        raise InputError("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as exc:
        raise InputError(f"image over the pixel limit ({exc})") from None
    except OSError as exc:
        raise InputError(f"unreadable or corrupt image: {exc}") from None
    _check_pixels(image.size, max_pixels)
    try:
        if draft_size and image.format == "JPEG":
            image.draft(None, (draft_size, draft_size))
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"truncated or corrupt image: {exc}") from None
    return to_rgb(image)


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InputError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(f"image is {width}x{height} = {width * height / 1e6:.0f} MP, over the "
                         f"{max_pixels / 1e6:.0f} MP limit (decompression-bomb guard)")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise InputError(f"image is {width}x{height}, an aspect ratio over {MAX_ASPECT_RATIO}:1 (scaling its short "
                         f"side to the model's input would make a huge image); crop it first")


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright, 8-bit RGB, transparency on white."""
    image = _upright(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_depth_to_rgb(image)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    try:
        return image.convert("RGB")  # L, 1, CMYK (incl. Adobe-inverted), YCbCr, LAB, HSV
    except (ValueError, OSError) as exc:
        raise InputError(f"cannot convert image mode {mode} to RGB: {exc}") from None


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - broken EXIF must not lose the image; keep it as stored
        return image


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scaled = values * 255.0 if values.size and values.max() <= 1.0 else values
    else:
        # 16-bit samples (PNG 'I;16', or 'I' holding 16-bit data): full scale is 65535.
        scaled = values / 257.0
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def array_to_image(array: np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """HxW, HxWx1, HxWx3 or HxWx4 arrays: uint8, uint16 (full 16-bit range), bool, or floats in [0, 1]."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InputError(f"array of shape {array.shape} is not an image (expected HxW, HxWx3 or HxWx4)")
    _check_pixels((array.shape[1], array.shape[0]), max_pixels)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = np.rint(array / 257.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError("array contains NaN or infinite values")
        array = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise InputError(f"unsupported array dtype {array.dtype} (use uint8, uint16, bool or float)")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[array.ndim if array.ndim == 2 else array.shape[2]]
    return Image.fromarray(np.ascontiguousarray(array), mode=mode)


# ---- PIL's EXIF warnings, with the file's name ------------------------------------------------
# PIL reports a corrupt EXIF block through `warnings.warn` without naming the file, and the raw
# line lands in the middle of a progress bar. Images are decoded in several threads, and
# `warnings.catch_warnings` is process-wide, so a thread-local sink collects them instead.
EXIF_WARNING_PATTERN = r"(Possibly corrupt|Corrupt) EXIF data|Tag data larger than file|Tag offset too large"
_exif_sink = threading.local()
_hook_lock = threading.Lock()


@contextlib.contextmanager
def exif_warnings(name: str, *, report: bool = True) -> Iterator[None]:
    """While this thread reads `name`, PIL's EXIF warnings become one log line naming the file
    (or, with `report=False`, nothing: the caller knows the image is decoded, and reported, later)."""
    _install_exif_hook()
    caught: list[str] = []
    outer = getattr(_exif_sink, "messages", None)
    _exif_sink.messages = caught
    try:
        yield
    finally:
        _exif_sink.messages = outer
        if caught and report:
            log.warning("%s: corrupt EXIF data ignored (%s)", name, caught[0])


def _install_exif_hook() -> None:
    """Route EXIF warnings raised inside `exif_warnings` to its sink; pass everything else on."""
    if getattr(warnings.showwarning, "exif_hook", False) and _exif_filter_installed():
        return
    with _hook_lock:
        if not getattr(warnings.showwarning, "exif_hook", False):
            warnings.showwarning = _exif_hook(warnings.showwarning)
        if not _exif_filter_installed():  # "always": the once-per-message registry would hide repeats
            warnings.filterwarnings("always", message=EXIF_WARNING_PATTERN, category=UserWarning)


def _exif_filter_installed() -> bool:
    return any(f[1] is not None and f[1].pattern == EXIF_WARNING_PATTERN for f in warnings.filters)


def _exif_hook(show_next):
    def show(message, category, filename, lineno, file=None, line=None):
        sink = getattr(_exif_sink, "messages", None)
        if sink is not None and issubclass(category, UserWarning) and re.match(EXIF_WARNING_PATTERN, str(message)):
            sink.append(" ".join(str(message).split()))
            return
        show_next(message, category, filename, lineno, file, line)

    show.exif_hook = True
    return show
