"""Photo metadata people search by: when, which camera, how large, where.

Read from the file's header (EXIF) without decoding pixels, as typed values the store keeps as
JSON numbers and strings, so `--where "year>=2020"` compares numbers and `taken~2021-05*` globs
an ISO date:

- `taken`: ISO date-time (`2021-05-03T10:11:12`) from EXIF DateTimeOriginal, else the file's
  modification time (local time); `taken_from` says which ('exif' or 'file').
- `year`, `month`: integers from `taken`.
- `camera`: EXIF make and model ("Canon EOS 5D"), when present.
- `width`, `height`: pixels as the image is shown (EXIF rotation applied).
- `latitude`, `longitude`: decimal degrees (south and west negative), when the photo has GPS.

A file whose EXIF cannot be read still gets `taken` from its file time (corrupt EXIF is logged,
with the file's name, when the image is decoded: images.exif_warnings).
"""
from __future__ import annotations

import datetime as dt
import logging
import os
from typing import Any, Optional

from PIL import ExifTags, Image, UnidentifiedImageError

from .images import exif_warnings

log = logging.getLogger(__name__)

PHOTO_KEYS = ("taken", "taken_from", "year", "month", "camera", "width", "height", "latitude", "longitude")
ROTATED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations shown with width and height swapped
EXIF_TIME_FORMAT = "%Y:%m:%d %H:%M:%S"


def photo_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The typed fields above for one image file; never raises for an unreadable image."""
    fields: dict[str, Any] = {}
    exif_time: Optional[dt.datetime] = None
    try:
        with exif_warnings(os.fspath(path), report=False), Image.open(path) as image:
            exif = image.getexif()
            fields.update(_size(image, exif))
            exif_time = _exif_time(exif)
            fields.update(_camera(exif))
            fields.update(_gps(exif))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        log.debug("%s: no photo metadata (%s)", path, exc)
    fields.update(_when(path, exif_time))
    return fields


def _when(path: str | os.PathLike, exif_time: Optional[dt.datetime]) -> dict[str, Any]:
    if exif_time is not None:
        taken, source = exif_time, "exif"
    else:
        try:
            taken, source = dt.datetime.fromtimestamp(os.stat(path).st_mtime), "file"
        except OSError:
            return {}
    return {"taken": taken.replace(microsecond=0).isoformat(), "taken_from": source,
            "year": taken.year, "month": taken.month}


def _exif_time(exif: Image.Exif) -> Optional[dt.datetime]:
    raw = exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.DateTimeOriginal)
    text = _text(raw)
    if not text:
        return None
    try:
        return dt.datetime.strptime(text[:19], EXIF_TIME_FORMAT)
    except ValueError:  # "0000:00:00 00:00:00" and other placeholders cameras write
        return None


def _size(image: Image.Image, exif: Image.Exif) -> dict[str, int]:
    width, height = image.size
    if exif.get(ExifTags.Base.Orientation) in ROTATED_ORIENTATIONS:
        width, height = height, width
    return {"width": int(width), "height": int(height)}


def _camera(exif: Image.Exif) -> dict[str, str]:
    make, model = _text(exif.get(ExifTags.Base.Make)), _text(exif.get(ExifTags.Base.Model))
    if model and make and model.lower().startswith(make.split()[0].lower()):
        return {"camera": model}  # "Canon" + "Canon EOS 5D": the model already says it
    camera = " ".join(part for part in (make, model) if part)
    return {"camera": camera} if camera else {}


def _gps(exif: Image.Exif) -> dict[str, float]:
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    latitude = _degrees(gps.get(ExifTags.GPS.GPSLatitude), _text(gps.get(ExifTags.GPS.GPSLatitudeRef)), 90)
    longitude = _degrees(gps.get(ExifTags.GPS.GPSLongitude), _text(gps.get(ExifTags.GPS.GPSLongitudeRef)), 180)
    if latitude is None or longitude is None:
        return {}
    return {"latitude": latitude, "longitude": longitude}


def _degrees(value: Any, ref: str, limit: float) -> Optional[float]:
    """(degrees, minutes, seconds) rationals -> signed decimal degrees; None when unusable."""
    try:
        parts = [float(part) for part in value]
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not 1 <= len(parts) <= 3 or any(part != part for part in parts):  # NaN from a 0/0 rational
        return None
    degrees = sum(part / 60 ** i for i, part in enumerate(parts))
    if ref.upper() in ("S", "W"):
        degrees = -degrees
    return round(degrees, 6) if abs(degrees) <= limit else None


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value.replace("\x00", "").strip() if isinstance(value, str) else ""
