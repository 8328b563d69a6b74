"""What a Dataloop item is, for embedding: an image, a text, or a prompt item's text.

Pure functions over item JSON and bytes, so they run and are tested without dtlpy.
The adapter downloads; this module decides what the bytes mean.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

IMAGE, TEXT, PROMPT, UNSUPPORTED = "image", "text", "prompt", "unsupported"


@dataclass
class ItemInput:
    """One item prepared for `embed`/`predict`: its kind and payload, or why it has none."""

    item_id: str
    kind: str                      # IMAGE | TEXT | PROMPT | UNSUPPORTED
    data: Any = None               # bytes for images, str for texts and prompt items
    error: Optional[str] = None
    item: Any = None               # the platform item, passed through untouched

    @property
    def ok(self) -> bool:
        return self.error is None and self.data is not None


def item_kind(mimetype: Optional[str], system_metadata: Optional[dict]) -> str:
    """Classify by the prompt shebang first (prompt items are JSON files), then by mimetype."""
    shebang = (system_metadata or {}).get("shebang") or {}
    if isinstance(shebang, dict) and shebang.get("dltype") == "prompt":
        return PROMPT
    mimetype = (mimetype or "").lower()
    if mimetype.startswith("image/"):
        return IMAGE
    if mimetype.startswith("text/"):
        return TEXT
    return UNSUPPORTED


def prompt_texts(prompt: dict) -> list[str]:
    """The text parts of a prompt item's JSON, in prompt order.

    `{"prompts": {"1": [{"mimetype": "application/text", "value": "..."}, ...]}}`
    """
    prompts = prompt.get("prompts") if isinstance(prompt, dict) else None
    if not isinstance(prompts, dict):
        return []
    texts = []
    for key in sorted(prompts, key=prompt_order):
        for part in prompts[key] or []:
            if not isinstance(part, dict):
                continue
            mimetype = str(part.get("mimetype", "")).lower()
            value = part.get("value")
            if isinstance(value, str) and value.strip() and (mimetype.startswith("application/text")
                                                              or mimetype.startswith("text/")):
                texts.append(value.strip())
    return texts


def prompt_order(key: str) -> tuple[int, str]:
    """Prompts are keyed "1", "2", ...: numeric order, other keys last."""
    return (int(key), key) if str(key).isdigit() else (1 << 30, str(key))


def decode_payload(kind: str, raw: bytes) -> tuple[Any, Optional[str]]:
    """Bytes of a downloaded item -> (payload, error)."""
    if kind == IMAGE:
        return (raw, None) if raw else (None, "empty image file (0 bytes)")
    if kind == TEXT:
        text = raw.decode("utf-8", errors="replace")
        return (text, None) if text.strip() else (None, "empty text file")
    if kind == PROMPT:
        try:
            texts = prompt_texts(json.loads(raw.decode("utf-8")))
        except (ValueError, UnicodeDecodeError) as exc:
            return None, f"prompt item is not valid JSON ({exc})"
        return (" ".join(texts), None) if texts else (None, "prompt item has no text prompt")
    return None, "unsupported item type (CLIP embeds images, texts and prompt items)"
