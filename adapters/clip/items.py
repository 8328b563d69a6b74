"""Dataloop items as JSON: what an item is and what its JSON says.

- for embedding: an image, a text, or a prompt item (its text, or the image its prompt points to
  when it has no text: `PromptImage`) (`item_kind`, `decode_payload`);
- in an export: its captions (human `free-text` annotations, text in `coordinates`; a model's
  annotations are never ground truth: `is_model_annotation`), description,
  class label and ML subset, and the image a prompt item references (`prompt_image_ref`);
- built offline (prepare_dataset, demos, tests): a prompt item's file, a caption annotation,
  the stream URL one item uses to reference another.

Pure functions over item JSON and bytes, so they run and are tested without dtlpy.
The adapter downloads; this module decides what the bytes mean.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
from PIL import Image

from .images import IMAGE_SUFFIXES, array_to_image

IMAGE, TEXT, PROMPT, UNSUPPORTED = "image", "text", "prompt", "unsupported"
CAPTION_LABEL = "free-text"
DATALOOP_STREAM_URL = "https://gate.dataloop.ai/api/v1/items/{}/stream"

# Bytes of a text item decoded: 4 bytes per character at most, so never fewer characters than the
# tokenizer is given (embed.MAX_TEXT_CHARS).
MAX_TEXT_BYTES = 4 * 16384
log = logging.getLogger(__name__)

_STREAM_ID = re.compile(r"/items/([0-9A-Za-z_-]+)/stream")
_ITEM_ID = re.compile(r"^[0-9a-f]{24}$")


@dataclass(frozen=True)
class PromptImage:
    """A prompt item without text embeds as its prompt's image: another item, referenced by URL
    (`.../items/<id>/stream`), which the platform side fetches."""

    ref: str


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
        if len(raw) > MAX_TEXT_BYTES:  # decoding 1 GB only to keep 77 tokens of it: no
            log.warning("a text item of %d bytes: only its first %d are read (the model reads only its first "
                        "tokens)", len(raw), MAX_TEXT_BYTES)
            raw = raw[:MAX_TEXT_BYTES]
        text = raw.decode("utf-8", errors="replace")  # (a character cut in two at the end becomes U+FFFD)
        return (text, None) if text.strip() else (None, "empty text file")
    if kind == PROMPT:
        try:
            prompt = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            return None, f"prompt item is not valid JSON ({exc})"
        texts = prompt_texts(prompt)
        if texts:
            return " ".join(texts), None
        ref = prompt_image_ref(prompt)
        return (PromptImage(ref), None) if ref else (None, "prompt item has neither a text nor an image prompt")
    return None, "unsupported item type (CLIP embeds images, texts and prompt items)"


def downloaded_bytes(downloaded: Any) -> tuple[Optional[bytes], Optional[str]]:
    """Whatever an item's `download(save_locally=False)` gave -> (its bytes, or why there are none).

    dtlpy returns a BytesIO; with `save_locally=True` a path; with `to_array=True` (and the earlier
    adapter's mock items) a numpy array, which is encoded as a lossless PNG. Never raises.
    """
    try:
        if downloaded is None:
            return None, "the platform returned no data"
        if isinstance(downloaded, (bytes, bytearray, memoryview)):
            return bytes(downloaded), None
        if hasattr(downloaded, "getvalue"):
            return bytes(downloaded.getvalue()), None
        if hasattr(downloaded, "read"):
            return bytes(downloaded.read()), None
        if isinstance(downloaded, (str, os.PathLike)):
            path = Path(downloaded)
            if not path.is_file():
                return None, f"download gave the path {str(path)!r}, which is not a file"
            return path.read_bytes(), None
        if isinstance(downloaded, (np.ndarray, Image.Image)):
            image = array_to_image(downloaded) if isinstance(downloaded, np.ndarray) else downloaded
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return buffer.getvalue(), None
    except Exception as exc:  # noqa: BLE001 - whatever reading it raised is this item's reason, not the batch's
        return None, f"could not read what download gave ({type(downloaded).__name__}): {exc}"
    return None, f"download gave a {type(downloaded).__name__}, not the item's data"


# ---- what an exported item's JSON says: captions, description, label, subset ----------------
def is_prompt_item(item: dict) -> bool:
    system = _system(item)
    shebang = system.get("shebang")
    if isinstance(shebang, dict) and shebang.get("dltype") == "prompt":
        return True
    return str(system.get("mimetype", "")).startswith("application/json") and str(
        item.get("filename", "")).lower().endswith(".json")


def is_image_item(item: dict) -> bool:
    mimetype = str(_system(item).get("mimetype", "")).lower()
    if mimetype:
        return mimetype.startswith("image/")
    return Path(str(item.get("filename", ""))).suffix.lower() in IMAGE_SUFFIXES


def human_annotations(item: dict) -> Iterator[dict]:
    """The item's annotations that are ground truth: not written by a model.

    dtlpy marks a model's output in `metadata.system.model` (predict_items: e.g. the zero-shot
    classes evaluate_model has just written) or `metadata.user.model` (a model's reply on a
    prompt item); `PromptItem.add` without model info leaves `user.model` None: a human's.
    """
    for annotation in item.get("annotations") or []:
        if isinstance(annotation, dict) and not is_model_annotation(annotation):
            yield annotation


def is_model_annotation(annotation: dict) -> bool:
    metadata = annotation.get("metadata") if isinstance(annotation.get("metadata"), dict) else {}
    return any(isinstance(metadata.get(part), dict) and bool(metadata[part].get("model"))
               for part in ("system", "user"))


def caption_annotations(item: dict) -> Iterator[dict]:
    """The item's human `free-text` annotations (Dataloop stores their text in `coordinates`)."""
    for annotation in human_annotations(item):
        if annotation.get("label") == CAPTION_LABEL:
            yield annotation


def annotation_text(annotation: dict) -> Optional[str]:
    """The text of a free-text annotation, stripped; None when it has none."""
    value = annotation.get("coordinates")
    if isinstance(value, dict):  # some exports nest it: {"text": ...}
        value = value.get("text")
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def annotation_prompt_id(annotation: dict) -> Optional[str]:
    prompt_id = _system(annotation).get("promptId")
    return str(prompt_id) if prompt_id is not None else None


def item_description(item: dict) -> Optional[str]:
    """The item's description, wherever this export keeps it.

    dtlpy 1.126 serialises it at the top level (`description`) and also reads
    `metadata.description.text`; the earlier adapter read `metadata.system.description`.
    """
    metadata = item.get("metadata") if isinstance(item.get("metadata"), dict) else {}
    nested = metadata.get("description")
    for value in (item.get("description"), nested.get("text") if isinstance(nested, dict) else None,
                  _system(item).get("description")):
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def item_label(item: dict) -> Optional[str]:
    """A class label for zero-shot accuracy: a human 'class' annotation, else metadata.user.label."""
    for annotation in human_annotations(item):
        if annotation.get("type") == "class" and annotation.get("label"):
            return str(annotation["label"])
    user = (item.get("metadata") or {}).get("user") or {}
    label = user.get("label") if isinstance(user, dict) else None
    return str(label) if isinstance(label, (str, int)) and str(label).strip() else None


def item_subset_tags(item: dict) -> list[str]:
    """The ML subsets an item is tagged with (dtlpy's `item.set_ml_subset` writes these)."""
    tags = _system(item).get("tags") or {}
    return [name for name, on in tags.items() if on is True] if isinstance(tags, dict) else []


def _system(obj: dict) -> dict:
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    system = metadata.get("system") if isinstance(metadata, dict) else None
    return system if isinstance(system, dict) else {}


def item_label_for_source(item: dict) -> str:
    item_id = item.get("id") or "?"
    name = item.get("filename") or item.get("name") or "?"
    return f"item {item_id} ({name})"


# ---- prompt items' images: references to other items -----------------------------------------
def prompt_image_ref(prompt_json: dict, prompt_id: Optional[str] = None) -> Optional[str]:
    """The image reference of prompt `prompt_id` (else of the first prompt that has an image)."""
    prompts = prompt_json.get("prompts") if isinstance(prompt_json, dict) else None
    if not isinstance(prompts, dict):
        return None
    keys = [prompt_id] if prompt_id is not None and prompt_id in prompts else sorted(prompts, key=prompt_order)
    for key in keys:
        for part in prompts.get(key) or []:
            if isinstance(part, dict) and str(part.get("mimetype", "")).lower().startswith("image/"):
                value = part.get("value")
                if isinstance(value, str) and value.strip():
                    return value.strip()
    return None


def ref_item_id(ref: str) -> Optional[str]:
    """The Dataloop item id in an image reference: a stream URL `.../items/<id>/stream` or a bare id."""
    match = _STREAM_ID.search(ref)
    if match:
        return match.group(1)
    return ref if is_item_id(ref) else None


def is_item_id(text: str) -> bool:
    """Dataloop's id shape: 24 hex digits."""
    return bool(_ITEM_ID.match(text))


# ---- building item JSON (prompt items, caption annotations): prepare_dataset, demos, tests ------
def stream_url(item_id: str) -> str:
    """The URL a prompt item uses to reference another item's file (`ref_item_id` reads it back)."""
    return DATALOOP_STREAM_URL.format(item_id)


def prompt_item_json(image_ref: str) -> dict[str, Any]:
    """A prompt item's file content with the image as the (user) prompt: dtlpy's PromptItem shape.

    The caption is not in here: on the platform it is a `free-text` annotation of the item
    (`caption_annotation_json`).
    """
    return {"shebang": "dataloop", "metadata": {"dltype": "prompt"},
            "prompts": {"1": [{"mimetype": "image/*", "value": image_ref},
                              {"mimetype": "metadata", "value": {"role": "user"}}]}}


def caption_annotation_json(text: str, prompt_id: str = "1", annotation_id: Optional[str] = None) -> dict[str, Any]:
    """A caption as Dataloop exports it: a `text` annotation labelled `free-text`, text in `coordinates`."""
    return {"id": annotation_id, "type": "text", "label": CAPTION_LABEL, "coordinates": text,
            "metadata": {"system": {"promptId": prompt_id}}}
