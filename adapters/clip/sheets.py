"""Contact sheets: thumbnails with a caption each, in titled rows or a grid, written as one image
in the format the file's extension names (.png, .jpg, .webp, ...).

People judge search results and zero-shot labels faster by looking than by reading paths.
Drawn with PIL alone (no figure machinery), so a sheet of a hundred images takes a fraction
of a second. An image that cannot be read gets a grey tile saying so; the sheet still comes out.
"""
from __future__ import annotations

import functools
import math
import os
import re
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
MAX_COLUMNS = 8
# format -> the extension messages suggest for it
SHEET_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif", "GIF": ".gif"}


def contact_sheet(rows: Sequence[Row], out: str | os.PathLike, *, thumb: int = 160, title: Optional[str] = None,
                  title_width: int = 220, max_tiles: Optional[int] = None, caption_lines: int = 2) -> Path:
    """Write `rows` — each (row title, [(image, caption[, correct]), ...]) — as an image at `out`
    (format from its extension).

    A caption's newlines start new lines; each line wraps, and all of them share `caption_lines`.
    """
    if not rows:
        raise InputError("a contact sheet needs at least one row")
    image_format = sheet_format(out)
    small, regular, large = _font(12), _font(14), _font(18)
    pad = 8
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
        if title_width > pad:
            _draw_lines(draw, (pad, top), _wrap(draw, row_title, regular, title_width - pad, 6), regular, INK)
        for c, tile in enumerate(list(tiles)[:columns]):
            left = pad + title_width + c * (thumb + pad)
            _draw_tile(sheet, draw, tile, (left, top), thumb, small, caption_lines)
    out = Path(out)
    with atomic_path(out) as tmp:
        sheet.save(tmp, format=image_format)
    return out


def sheet_format(out: str | os.PathLike) -> str:
    """The format a sheet's file name asks for ('hits.jpg' -> 'JPEG'); InputError when it names none."""
    suffix = Path(out).suffix.lower()
    image_format = Image.registered_extensions().get(suffix)
    if image_format is None or image_format not in SHEET_FORMATS:
        raise InputError(f"{out}: a contact sheet is written as the image type its extension names; use one of "
                         f"{', '.join(sorted(SHEET_FORMATS.values()))}")
    return image_format


def grid_sheet(tiles: Sequence[Tile], out: str | os.PathLike, *, title: Optional[str] = None,
               columns: Optional[int] = None, thumb: int = 160) -> Path:
    """Tiles wrapped into a grid (about as wide as tall, at most MAX_COLUMNS across) under `title`.

    Search hits and zero-shot labels share this layout; captions get four lines (score or label,
    then the path that tells the file apart, `distinct_names`, wrapped at its slashes, never cut).
    """
    if not tiles:
        raise InputError("a contact sheet needs at least one image")
    columns = columns or min(MAX_COLUMNS, max(1, math.ceil(math.sqrt(len(tiles)))))
    rows = [("", list(tiles[start:start + columns])) for start in range(0, len(tiles), columns)]
    return contact_sheet(rows, out, thumb=thumb, title=title, title_width=0, caption_lines=4)


def distinct_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Each path's shortest tail of folders that no other path here shares ("b/china.jpg").

    File names alone cannot tell `a/china.jpg` from `b/china.jpg`; whole paths do not fit a tile.
    """
    parts = [Path(p).parts for p in paths]
    depth = [1] * len(parts)
    while True:
        tails: dict[tuple[str, ...], list[int]] = {}
        for i, p in enumerate(parts):
            tails.setdefault(p[-depth[i]:], []).append(i)
        clashing = [i for group in tails.values() if len(group) > 1 for i in group if depth[i] < len(parts[i])]
        if not clashing:
            return [str(Path(*p[-d:])) if p else "" for p, d in zip(parts, depth)]
        for i in clashing:
            depth[i] += 1


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
    _draw_lines(draw, (left, top + thumb + 4), tile_lines(str(caption), thumb, caption_lines, font), font, INK)


def tile_lines(caption: str, width: int = 160, max_lines: int = 4, font=None) -> list[str]:
    """The lines a tile's caption is drawn as: wrapped to `width` pixels, paths broken at slashes."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return _wrap(draw, caption, font or _font(12), width, max_lines)


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
    """Greedy wrap by measured width, newlines kept; the last line ends in an ellipsis if text is left over."""
    lines = [line for paragraph in text.split("\n") for line in _wrap_paragraph(draw, paragraph, font, width)]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _fit(draw, lines[-1] + " …", font, width, force_ellipsis=True)
    return lines or [""]


def _wrap_paragraph(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
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
        if draw.textlength(word, font=font) <= width:
            current = word
            continue
        pieces = _split_path(draw, word, font, width)  # a path: its folders on their own lines, whole
        lines.extend(pieces[:-1])
        current = pieces[-1]
    if current:
        lines.append(current)
    return lines


def _split_path(draw: ImageDraw.ImageDraw, word: str, font, width: int) -> list[str]:
    """A word too long for a line, broken after its slashes ('backup/', 'drawings/', 'IMG_0003.png');
    a piece that still does not fit keeps its end (the file name is what tells)."""
    parts = re.findall(r"[^/]*/|[^/]+$", word)
    lines: list[str] = []
    current = ""
    for part in parts:
        if current and draw.textlength(current + part, font=font) > width:
            lines.append(current)
            current = ""
        current += part
    lines.append(current)
    return [line if draw.textlength(line, font=font) <= width else _fit_tail(draw, line, font, width)
            for line in lines]


def _fit_tail(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """A word too long for a line (a path, mostly) keeps its end: the file name is what tells."""
    while len(text) > 1 and draw.textlength("…" + text, font=font) > width:
        text = text[1:]
    return "…" + text


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int, force_ellipsis: bool = False) -> str:
    if draw.textlength(text, font=font) <= width and not force_ellipsis:
        return text
    text = text.rstrip(" …")
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"

