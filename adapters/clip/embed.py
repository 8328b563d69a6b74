"""`Embedder`: batching, parallel decoding, normalisation and per-item errors, owned once.

Images are decoded and preprocessed by a thread pool while the model encodes the previous
batch (PIL and torch release the GIL for the heavy parts), so the model rarely waits.
Streaming forms (`iter_images`, `iter_texts`) keep memory constant for any input length.

A failed item gets a NaN row and a reason in `errors`; it never fails the batch and never
gets a plausible-looking vector. A vector the model returns with NaN or inf in it is such a
failure too, with its reason.
"""
from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from .errors import InputError
from .images import DEFAULT_MAX_PIXELS, ImageSource, load_image

if TYPE_CHECKING:  # torch loads with the model, not with this module: a cold text search never needs it
    import torch

    from .engines import ExportedTextModel
    from .exported_model import ExportedModel
    from .models import ClipModel

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64


@dataclass
class Embeddings:
    """Vectors for a run of inputs, in input order.

    `vectors` is (N, D) float32 and L2-normalised; rows of failed inputs are NaN and their
    reasons are in `errors` (keyed by index within this object). `offset` is the index of
    the first row in the whole stream.
    """

    vectors: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)
    offset: int = 0

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def ok(self) -> np.ndarray:
        """(N,) bool: True where the input was embedded."""
        mask = np.ones(len(self.vectors), dtype=bool)
        mask[list(self.errors)] = False
        return mask

    def vector(self, index: int) -> Optional[np.ndarray]:
        return None if index in self.errors else self.vectors[index]

    def as_lists(self) -> list[Optional[list[float]]]:
        """One list of floats or None per input (the shape Dataloop's embed hook returns)."""
        return [None if i in self.errors else row.tolist() for i, row in enumerate(self.vectors)]

    @classmethod
    def concat(cls, parts: Sequence["Embeddings"], dim: int) -> "Embeddings":
        if not parts:
            return cls(np.zeros((0, dim), dtype=np.float32))
        errors: dict[int, str] = {}
        start = 0
        for part in parts:
            errors.update({start + i: reason for i, reason in part.errors.items()})
            start += len(part)
        return cls(np.concatenate([p.vectors for p in parts]), errors, parts[0].offset)


@dataclass
class Prepared:
    """One image decoded and preprocessed for the model, or why it could not be."""

    tensor: Optional["torch.Tensor | np.ndarray"]  # (3, H, W); numpy for a model started without torch
    error: Optional[str]


class Embedder:
    """Embeds texts and images with one `ClipModel` (or, texts only, an `ExportedTextModel`)."""

    def __init__(self, clip: "ClipModel | ExportedModel | ExportedTextModel", *, batch_size: int = DEFAULT_BATCH_SIZE,
                 num_workers: int = 2, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.clip = clip
        self.batch_size = batch_size
        self.num_workers = max(0, num_workers)
        self.max_pixels = max_pixels
        self._to_pixels = numpy_preprocess(clip.preprocess)

    @property
    def dim(self) -> int:
        return self.clip.dim

    # ---- texts ---------------------------------------------------------------------------
    def embed_texts(self, texts: Sequence[str]) -> Embeddings:
        return Embeddings.concat(list(self.iter_texts(texts)), self.dim)

    def iter_texts(self, texts: Iterable[str], batch_size: Optional[int] = None) -> Iterator[Embeddings]:
        """Texts longer than the model's context (77 tokens for OpenAI's models) are truncated."""
        size = batch_size or self.batch_size
        offset = 0
        chunk: list[str] = []
        for text in texts:
            chunk.append(text)
            if len(chunk) == size:
                yield self._text_batch(chunk, offset)
                offset += len(chunk)
                chunk = []
        if chunk:
            yield self._text_batch(chunk, offset)

    def _text_batch(self, texts: list, offset: int) -> Embeddings:
        vectors = np.full((len(texts), self.dim), np.nan, dtype=np.float32)
        errors: dict[int, str] = {}
        good: list[int] = []
        for i, text in enumerate(texts):
            reason = text_problem(text)
            if reason:
                errors[i] = reason
            else:
                good.append(i)
        if good:
            tokens = self.clip.tokenizer(capped_texts([texts[i].strip() for i in good]))
            vectors[good] = self.clip.encode_tokens(tokens)
            refuse_non_finite(vectors, good, errors)
        return Embeddings(vectors, errors, offset)

    # ---- images --------------------------------------------------------------------------
    def embed_images(self, sources: Sequence[ImageSource]) -> Embeddings:
        return Embeddings.concat(list(self.iter_images(sources)), self.dim)

    def iter_images(self, sources: Iterable[ImageSource], batch_size: Optional[int] = None) -> Iterator[Embeddings]:
        """Yield one `Embeddings` per batch; decoding of later batches overlaps encoding."""
        size = batch_size or self.batch_size
        yield from self._batches(self.iter_prepared(sources, ahead=2 * size), size)

    def iter_prepared(self, sources: Iterable[ImageSource], ahead: Optional[int] = None,
                      thread_name: str = "clip-decode") -> Iterator[Prepared]:
        """Each source decoded and preprocessed (no encoding), in input order: the decode half of
        `iter_images`, for callers that encode later (evaluation caches the pixels between epochs).

        `ahead` decode jobs are kept in flight on `num_workers` threads (default: two batches).
        """
        if self.num_workers == 0:
            yield from (self.prepare(s) for s in sources)
            return
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix=thread_name) as pool:
            yield from self._prefetched(pool, sources, ahead=ahead or 2 * self.batch_size)

    def _prefetched(self, pool: ThreadPoolExecutor, sources: Iterable[ImageSource],
                    ahead: int) -> Iterator[Prepared]:
        """Keep `ahead` decode jobs in flight; yield results in input order."""
        pending: deque[Future] = deque()
        for source in sources:
            pending.append(pool.submit(self.prepare, source))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def _batches(self, prepared: Iterable[Prepared], size: int) -> Iterator[Embeddings]:
        offset = 0
        chunk: list[Prepared] = []
        for item in prepared:
            chunk.append(item)
            if len(chunk) == size:
                yield self._image_batch(chunk, offset)
                offset += len(chunk)
                chunk = []
        if chunk:
            yield self._image_batch(chunk, offset)

    def _image_batch(self, chunk: list[Prepared], offset: int) -> Embeddings:
        vectors = np.full((len(chunk), self.dim), np.nan, dtype=np.float32)
        errors = {i: p.error for i, p in enumerate(chunk) if p.error is not None}
        good = [i for i, p in enumerate(chunk) if p.error is None]
        if good:
            tensors = [chunk[i].tensor for i in good]
            if isinstance(tensors[0], np.ndarray):
                pixels = np.stack(tensors)  # (B, 3, H, W)
            else:
                import torch
                pixels = torch.stack(tensors)
            vectors[good] = self.clip.encode_images(pixels)
            refuse_non_finite(vectors, good, errors)
        return Embeddings(vectors, errors, offset)

    def prepare(self, source: ImageSource) -> Prepared:
        """Decode and preprocess one image; a failure is returned with its reason, never raised."""
        try:
            image = load_image(source, max_pixels=self.max_pixels, draft_size=self.clip.image_size)
            return Prepared(self._to_pixels(image), None)
        except InputError as exc:
            return Prepared(None, str(exc))
        except Exception as exc:  # noqa: BLE001 - one odd file must not stop a million-image run
            log.debug("unexpected failure preparing an image", exc_info=True)
            return Prepared(None, f"cannot prepare image: {type(exc).__name__}: {exc}")


def numpy_preprocess(preprocess: Callable) -> Callable[[Image.Image], torch.Tensor]:
    """The same transform with its tensor steps done in numpy.

    Decode threads run beside the model; torch ops there (ToTensor, Normalize) enter torch's
    intra-op thread pool and fight the model for it (measured: 0.4 ms alone, 20+ ms contended).
    numpy does the same arithmetic in the calling thread. Falls back to `preprocess` when its
    shape is not the usual [PIL steps..., ToTensor, Normalize].
    """
    steps = list(getattr(preprocess, "transforms", []))
    names = [type(t).__name__ for t in steps]
    if len(steps) < 2 or names[-1] != "Normalize" or names[-2] not in ("ToTensor", "MaybeToTensor"):
        return preprocess
    pil_steps, normalize = steps[:-2], steps[-1]
    mean = np.asarray(normalize.mean, dtype=np.float32)
    std = np.asarray(normalize.std, dtype=np.float32)

    import torch

    def to_pixels(image: Image.Image) -> torch.Tensor:
        for step in pil_steps:
            image = step(image)
        array = np.asarray(image, dtype=np.float32) / np.float32(255.0)  # (H, W, 3)
        array = (array - mean) / std
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))  # (3, H, W)

    return to_pixels


# Longest text given to the tokenizer. CLIP reads 77 tokens, each at least one character, and they come
# from the first 77 words: 16k characters keep any real caption whole, while tokenizing a whole 25 MB
# text took 23 s and 400 MB (a 1 GB one would stall a batch for 15 min or kill the pod).
MAX_TEXT_CHARS = 16384


def capped_texts(texts: Sequence[str]) -> list[str]:
    """`texts`, each cut to its first MAX_TEXT_CHARS characters before tokenizing, with a note in the log."""
    long = sum(len(text) > MAX_TEXT_CHARS for text in texts)
    if not long:
        return list(texts)
    log.warning("%d text(s) longer than %d characters cut to their first %d before tokenizing (the model reads "
                "only their first tokens)", long, MAX_TEXT_CHARS, MAX_TEXT_CHARS)
    return [text[:MAX_TEXT_CHARS] for text in texts]


NON_FINITE = ("the model gave a vector with NaN or infinite values (its weights or its preprocessing are "
              "broken: a NaN weight, preprocess std 0?)")


def refuse_non_finite(vectors: np.ndarray, rows: Sequence[int], errors: dict[int, str]) -> None:
    """Rows of `vectors` among `rows` that hold NaN or inf become failures with a reason (and NaN rows):
    a broken model's output is never passed on as a vector."""
    bad = [i for i in rows if not np.isfinite(vectors[i]).all()]
    for i in bad:
        errors[i] = NON_FINITE
        vectors[i] = np.nan


def text_problem(text: object) -> Optional[str]:
    """Why `text` cannot be embedded, or None."""
    if not isinstance(text, str):
        return f"not a text ({type(text).__name__})"
    if not text.strip():
        return "empty text"
    return None
