"""Contact sheets: rows of thumbnails with a caption each, written as one PNG.

People judge search results and zero-shot labels faster by looking than by reading paths.
Drawn with PIL alone (no figure machinery), so a sheet of a hundred images takes a fraction
of a second. An image that cannot be read gets a grey tile saying so; the sheet still comes out.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional, Sequence, Union

from PIL import Image, ImageDraw, ImageFont, ImageOps

from .errors import InputError
from .files import atomic_path
from .images import ImageSource, load_image

# One tile: (image, caption) or (image, caption, correct) where correct frames it green/red.
Tile = Union[tuple[ImageSource, str], tuple[ImageSource, str, Optional[bool]]]
Row = tuple[str, Sequence[Tile]]

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (110, 110, 110)
PLACEHOLDER = (215, 215, 215)
FRAME = {True: (40, 160, 60), False: (200, 50, 40)}


def contact_sheet(rows: Sequence[Row], out: str | os.PathLike, *, thumb: int = 160, title: Optional[str] = None,
                  title_width: int = 220, max_tiles: Optional[int] = None) -> Path:
    """Write `rows` — each (row title, [(image, caption[, correct]), ...]) — as a PNG at `out`."""
    if not rows:
        raise InputError("a contact sheet needs at least one row")
    small, regular, large = _font(12), _font(14), _font(18)
    pad, caption_lines = 8, 2
    line_height = _line_height(small)
    tile_height = thumb + pad + caption_lines * line_height
    columns = max(1, max(len(tiles) for _, tiles in rows))
    if max_tiles:
        columns = min(columns, max_tiles)
    header = (_line_height(large) + 2 * pad) if title else 0
    width = pad + title_width + columns * (thumb + pad)
    height = header + pad + len(rows) * (tile_height + pad)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, pad), _fit(draw, title, large, width - 2 * pad), fill=INK, font=large)
    for r, (row_title, tiles) in enumerate(rows):
        top = header + pad + r * (tile_height + pad)
        _draw_lines(draw, (pad, top), _wrap(draw, row_title, regular, title_width - pad, 6), regular, INK)
        for c, tile in enumerate(list(tiles)[:columns]):
            left = pad + title_width + c * (thumb + pad)
            _draw_tile(sheet, draw, tile, (left, top), thumb, small, caption_lines)
    out = Path(out)
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out


def query_sheet(queries: Sequence[str], results: Sequence[Sequence[ImageSource]], path: str | os.PathLike, *,
                correct: Optional[Sequence[Sequence[bool]]] = None, title: str = "",
                captions: Optional[Sequence[Sequence[str]]] = None) -> Path:
    """One row per text query with its top images; `correct` frames matches green, misses red."""
    rows = []
    for q, (query, images) in enumerate(zip(queries, results)):
        tiles = []
        for i, image in enumerate(images):
            caption = captions[q][i] if captions else f"#{i + 1}"
            flag = correct[q][i] if correct is not None else None
            tiles.append((image, caption, flag))
        rows.append((query, tiles))
    return contact_sheet(rows, path, title=title or None)


# ---- drawing --------------------------------------------------------------------------------
def _draw_tile(sheet: Image.Image, draw: ImageDraw.ImageDraw, tile: Tile, origin: tuple[int, int], thumb: int,
               font, caption_lines: int) -> None:
    image_source, caption = tile[0], tile[1]
    correct = tile[2] if len(tile) > 2 else None
    left, top = origin
    try:
        image = ImageOps.contain(load_image(image_source), (thumb, thumb))  # up or down, aspect kept
        sheet.paste(image, (left + (thumb - image.width) // 2, top + (thumb - image.height) // 2))
    except Exception as exc:  # noqa: BLE001 - one unreadable image must not lose the sheet
        draw.rectangle((left, top, left + thumb - 1, top + thumb - 1), fill=PLACEHOLDER)
        reason = str(exc) if isinstance(exc, InputError) else type(exc).__name__
        _draw_lines(draw, (left + 6, top + 6), _wrap(draw, "unreadable: " + reason, font, thumb - 12, 6), font, MUTED)
    if correct is not None:
        for inset in range(3):
            draw.rectangle((left + inset, top + inset, left + thumb - 1 - inset, top + thumb - 1 - inset),
                           outline=FRAME[bool(correct)])
    lines = _wrap(draw, str(caption), font, thumb, caption_lines)
    _draw_lines(draw, (left, top + thumb + 4), lines, font, INK)


@functools.lru_cache(maxsize=None)
def _font(size: int):
    """DejaVu Sans from matplotlib (accents, Greek, Cyrillic), else PIL's default font."""
    try:
        import matplotlib
        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    except (ImportError, OSError):
        pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _line_height(font) -> int:
    box = font.getbbox("Ag")
    return int(box[3] - box[1]) + 4


def _draw_lines(draw: ImageDraw.ImageDraw, origin: tuple[int, int], lines: list[str], font, fill) -> None:
    left, top = origin
    step = _line_height(font)
    for i, line in enumerate(lines):
        draw.text((left, top + i * step), line, fill=fill, font=font)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy wrap by measured width; the last line ends in an ellipsis if text is left over."""
    lines: list[str] = []
    words = text.split()
    current = ""
    for word in words:
        candidate = f"{current} {word}".strip()
        if draw.textlength(candidate, font=font) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word if draw.textlength(word, font=font) <= width else _fit(draw, word, font, width)
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _fit(draw, lines[-1] + " …", font, width, force_ellipsis=True)
    return lines or [""]


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int, force_ellipsis: bool = False) -> str:
    if draw.textlength(text, font=font) <= width and not force_ellipsis:
        return text
    text = text.rstrip(" …")
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"

