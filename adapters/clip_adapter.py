"""`ClipAdapter`: the Dataloop model adapter. Thin: every decision is made in `adapters.clip`.

The platform calls `load` (after downloading the model's artifacts), `save` (before uploading
them), `embed` (from `embed_items`/`embed_dataset`, which `model.embed(...)` ends up calling),
`train` and `predict`. Library errors become one-line messages here, at the edge.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import dtlpy as dl

# The dtlpy this app needs. On the platform the agent's own dtlpy runs this file (requirements.txt
# names none, so starting a service never replaces it); here is where an older one is told apart.
DTLPY_MINIMUM = "1.118.12"  # every model flow works (docs/platform-tests.md); requirements-dev.txt, CI
DTLPY_FLOOR = "1.93.11"     # the first with dtlpy.ml.base_model_adapter.AdapterDefaults: below it, no import


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def dtlpy_problem(version: str) -> Optional[str]:
    """One line saying what this app needs from the dtlpy `version`, or None when it has it."""
    if _release(version) >= _release(DTLPY_MINIMUM):
        return None
    if _release(version) < _release(DTLPY_FLOOR):
        return (f"CLIP adapter: needs dtlpy>={DTLPY_MINIMUM}, found {version}, which cannot load it "
                f"(no AdapterDefaults before {DTLPY_FLOOR}); run the service on a newer dtlpy")
    return (f"CLIP adapter: needs dtlpy>={DTLPY_MINIMUM}, found {version}: embedding and predicting work, "
            "training does not (captions dropped up to 1.110, prepare_data fails in 1.114-1.117, no resume "
            "after a lost pod before 1.118); run the service on a newer dtlpy")


def _check_dtlpy(version: str) -> None:
    """At import: too old to load is an ImportError; too old to train is one warning line (a service
    that embeds must not go down over it)."""
    problem = dtlpy_problem(version)
    if problem is not None and _release(version) < _release(DTLPY_FLOOR):
        raise ImportError(problem)
    if problem is not None:
        logging.getLogger("clip-adapter").warning(problem)


_check_dtlpy(dl.__version__)

from dtlpy.ml.base_model_adapter import AdapterDefaults  # noqa: E402

# Dataloop's runner loads this file by path (dataloop.json entryPoint); make the package importable.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from adapters.clip.config import ClipConfig  # noqa: E402
from adapters.clip.embed import Embedder  # noqa: E402
from adapters.clip.errors import ClipAdapterError, describe_os_error  # noqa: E402
from adapters.clip.feature_sets import MIXED_VECTORS_NOTE, SAMPLE_SIZE, VectorCheck, batches  # noqa: E402
from adapters.clip.items import (IMAGE, PROMPT, TEXT, ItemInput, PromptImage, decode_payload,  # noqa: E402
                                 downloaded_bytes, item_kind)
from adapters.clip.models import ClipModel, find_checkpoint, load_model, save_checkpoint  # noqa: E402
from adapters.clip.onnx_export import attach_engine, export_with_checkpoint  # noqa: E402
from adapters.clip.prefetch import Prefetcher  # noqa: E402
from adapters.clip.runs import (RESUME_ARCHIVE, adopt_run, archive_is_resumable, flatten_run,  # noqa: E402
                                pack_resume_state, read_saved_run, unpack_resume_state)

# Keys dtlpy itself keeps in a model's configuration; ours are validated by ClipConfig.
DTLPY_KEYS = frozenset({f.name for f in dataclasses.fields(AdapterDefaults)} | {
    "include_background", "include_model_annotations", "column",
    "predict_embed_subset_limit", "predict_embed_timeout",
})

F = TypeVar("F", bound=Callable[..., Any])

NO_LABELS = ("the model has no labels to classify into; give the model labels (its dataset's ontology) "
             "or set the 'labels' configuration key, e.g. [\"cat\", \"dog\"]")


class ClipAdapterFailure(RuntimeError):
    """What the platform shows when a hook fails for a reason the user can fix."""


def user_errors(hook: F) -> F:
    """Turn the library's typed errors into one readable line for the platform's logs."""

    @functools.wraps(hook)
    def wrapper(*args, **kwargs):
        try:
            return hook(*args, **kwargs)
        except ClipAdapterError as exc:
            raise ClipAdapterFailure(f"CLIP adapter: {exc}") from None
        except OSError as exc:  # a full disk, an unwritable path: the user's to fix, in one line
            raise ClipAdapterFailure(f"CLIP adapter: {describe_os_error(exc)}") from None

    return wrapper  # type: ignore[return-value]


def download_bytes(item: dl.Item) -> tuple[Optional[bytes], Optional[str]]:
    """An item's bytes through dtlpy's public download, or why there are none (never raises).
    Whatever `download` gives (a BytesIO, bytes, a path, an array) is read as the item's data."""
    try:
        downloaded = item.download(save_locally=False)
    except Exception as exc:  # noqa: BLE001 - a failed download is this item's problem only
        return None, f"download failed: {type(exc).__name__}: {exc}"
    raw, error = downloaded_bytes(downloaded)
    return raw, (f"download failed: {error}" if error else None)


def widen_download_pool(threads: int) -> None:
    """Let `threads` item downloads run at once in this process.

    Every `item.download` goes through one dtlpy pool of `client_api.num_processes` threads, 3 x the
    CPU count by default: 6 on a 2-core pod, so dtlpy's 16 download threads (and the prefetcher's
    16) queue behind 6 and the network idles (81 items/s at 50 ms per request here, 194 with 32;
    docs/platform.md). `num_processes` is dtlpy's own public setting for it (its upload's
    deprecation message names it); it is only ever raised. Raising it replaces dtlpy's pools, so
    it happens at load, before this process downloads items."""
    client = dl.client_api
    if getattr(client, "num_processes", threads) < threads:
        client.num_processes = threads


class ClipAdapter(dl.BaseModelAdapter):
    def __init__(self, model_entity: Optional[dl.Model] = None):
        self.clip: Optional[ClipModel] = None
        self.embedder: Optional[Embedder] = None
        self.settings: ClipConfig = ClipConfig()
        self._warned_no_labels = False
        self._artifacts_dir: Optional[Path] = None  # where load_from_model put the model's artifacts
        self._interrupted = False  # the last train() failed: `save` keeps the starting weights
        self._prefetchers: list[Prefetcher] = []  # one per embed_items/predict_items call in progress
        self._prefetch_lock = threading.Lock()
        self._vectors_checked = False  # the feature set was looked at for the earlier adapter's vectors
        self._turn = threading.local()   # the embed_items turn this thread runs (see _embed_in_turns)
        super().__init__(model_entity=model_entity)

    # ---- configuration -------------------------------------------------------------------
    def read_settings(self) -> ClipConfig:
        """The model entity's configuration, validated (defaults without an entity)."""
        raw = {k: v for k, v in dict(self.configuration).items() if k not in DTLPY_KEYS}
        # Never fatal here: a key from a later platform release must not stop a deployed model.
        self.settings = ClipConfig.from_dict(raw, warn=self.logger.warning, unknown_keys="warn")
        return self.settings

    def _record_embeddings_size(self, dim: int) -> None:
        """The feature set is created with configuration['embeddings_size'] (dtlpy defaults to 256)."""
        if self.entity_or_none() is None:
            return
        configured = self.configuration["embeddings_size"] if "embeddings_size" in self.configuration else None
        if configured is not None and configured != dim:
            self.logger.warning(f"configuration embeddings_size={configured} does not match the model's "
                                f"{dim}-d embeddings; corrected to {dim}")
        if configured != dim:
            self.configuration["embeddings_size"] = dim
        self.settings = self.settings.updated(embeddings_size=dim)

    # ---- hooks ---------------------------------------------------------------------------
    @user_errors
    def load(self, local_path: str, **kwargs) -> None:
        """Fine-tuned weights in `local_path` if there are any, else the model named by model_name."""
        settings = self.read_settings()
        self._warned_no_labels = False
        self._artifacts_dir, self._interrupted = (Path(local_path) if local_path else None), False
        self._vectors_checked = False
        checkpoint = find_checkpoint(local_path, settings.weights_filename) if local_path else None
        source = str(checkpoint) if checkpoint else settings.model_name
        self.clip = attach_engine(load_model(source, device=settings.device, precision=settings.precision,
                                             arch=settings.model_name if checkpoint else None), settings.engine)
        self.clip.warmup()
        self.embedder = Embedder(self.clip, batch_size=settings.batch_size, num_workers=settings.num_workers)
        self.model = self.clip.model
        widen_download_pool(2 * self.DOWNLOAD_THREADS)
        self._record_embeddings_size(self.clip.dim)
        self.logger.info(f"loaded {self.clip.description}")
        if self.clip.engine is not None and self.clip.engine.note:
            self.logger.info(f"engine {self.clip.engine.note}")

    @user_errors
    def save(self, local_path: str, **kwargs) -> None:
        """Write the project's checkpoint format into `local_path` (uploaded as the model's artifacts)."""
        self._require_loaded()
        run_dir = Path(local_path) / self.TRAINING_DIR
        if self._interrupted:
            self._save_interrupted_run(run_dir, local_path)
            return
        save_checkpoint(self.clip, local_path, config=self.settings.to_dict(),
                        metrics=kwargs.get("metrics"), replace_directory=False)
        self._save_exports(Path(local_path))
        if run_dir.is_dir():  # a finished training: an earlier interrupted run's state is stale now
            flatten_run(run_dir, local_path, resumable=False)

    def _save_exports(self, checkpoint: Path) -> None:
        """The ONNX exports (and, on a CPU, `auto`'s choice) go into the artifacts with the weights,
        so a fine-tuned model's first CPU load opens them instead of exporting. Never fails the save."""
        if self.settings.engine == "torch":
            return
        try:
            directory = export_with_checkpoint(self.clip, checkpoint, measure=self.settings.engine == "auto")
            self.logger.info(f"engine exports saved with the checkpoint in {directory}")
        except Exception as exc:  # noqa: BLE001 - an export is an optimisation; the weights are saved
            self.logger.warning(f"engine exports not saved with the checkpoint ({type(exc).__name__}: {exc}); "
                                f"its first load exports them")

    def _save_interrupted_run(self, run_dir: Path, local_path: str) -> None:
        """dtlpy's train_model uploads `output_path` when training fails too (preemption, timeout, an
        error): keep the model's starting weights as its weights, and upload the resume state so the
        next train_model continues from the last finished epoch instead of starting over."""
        resumable = run_dir.is_dir() and read_saved_run(run_dir) is not None
        if run_dir.is_dir():
            flatten_run(run_dir, local_path, resumable)
        self.logger.warning(
            "training was interrupted: the model keeps its starting weights (the best epoch so far is in its "
            f"artifacts, in {RESUME_ARCHIVE}); "
            + ("train it again to continue from the last finished epoch" if resumable
               else "no epoch had finished, so the next training starts over"))

    # ---- dtlpy's batch loops, with the next batch downloading while one computes -------------
    DOWNLOAD_THREADS = 16  # as many as dtlpy's own pool: downloads wait on the network, not the CPU

    FIRST_TURN = 32  # items in embed_items' first call into dtlpy: the only download nothing hides

    def embed_items(self, items: list, upload_features=None, batch_size=None, progress=None, **kwargs):
        """dtlpy's own `embed_items`, unchanged, with downloads and feature uploads overlapped with compute.

        dtlpy downloads a batch (`prepare_item_func` in 16 threads) and then embeds it, and uploads
        every vector at the end, so within one execution the network and the CPU take turns. Here a
        prefetcher over `items` fetches the next batch as soon as dtlpy asks for the current one
        (`prepare_item_func` hands dtlpy what it fetched), and dtlpy's `embed_items` runs one batch
        per call, its upload (dtlpy's own code, at the end of the call) going on while the next batch
        embeds; the first call takes FIRST_TURN items, so the first download is short
        (docs/platform.md has the measurements).

        Before the first upload into the model's feature set (once per loaded model), a look at its
        oldest vectors: the earlier adapter's there are reported (see `migrate_feature_set`).
        """
        if upload_features is not False:
            self._check_vectors_once("embed_dataset on the model's datasets, or migrate_feature_set(), embeds them "
                                     "again")
        options = dict(upload_features=upload_features, batch_size=batch_size, progress=progress, **kwargs)
        with self._overlapped_downloads(items, batch_size):
            size = self._batch_size(batch_size)
            if not isinstance(items, (list, tuple)) or len(items) <= min(size, self.FIRST_TURN):
                return super().embed_items(items, **options)
            return self._embed_in_turns(list(items), size, options)

    def _batch_size(self, batch_size: Optional[int]) -> int:
        return int(batch_size if batch_size is not None else self.configuration.get("batch_size", 4))

    def _embed_in_turns(self, items: list, size: int, options: dict) -> tuple[list, list]:
        """dtlpy's `embed_items` on one batch per call; a call starts as soon as the one before has
        its vectors (that call then uploads them, while this one embeds). Every batch runs, as in
        dtlpy's loop; the failures of all of them are raised together at the end, as dtlpy does."""
        first = min(size, self.FIRST_TURN)
        turns = [items[:first]] + [items[i:i + size] for i in range(first, len(items), size)]
        calls = []
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="embed-turn") as pool:
            for turn in turns:
                embedded = threading.Event()
                calls.append(pool.submit(self._embed_turn, turn, embedded, options))
                embedded.wait()
            outcomes = [call.exception() or call.result() for call in calls]
        failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if len(failures) == 1:
            raise failures[0]
        if failures:
            raise Exception(f"Failed to embed all items: {len(failures)} of {len(turns)} batches failed.\n"
                            + "\n".join(str(failure) for failure in failures))
        return ([item for done, _ in outcomes for item in done], [vector for _, vectors in outcomes for vector in vectors])

    def _embed_turn(self, items: list, embedded: threading.Event, options: dict) -> tuple[list, list]:
        self._turn.embedded = embedded  # set by `embed` when the batch's vectors exist
        try:
            return super().embed_items(items, **options)
        finally:
            self._turn.embedded = None
            embedded.set()  # also when dtlpy never reached `embed` (a failure before it)

    def predict_items(self, items: list, batch_size=None, **kwargs):
        """dtlpy's own `predict_items`, with downloads overlapped with compute (see `embed_items`)."""
        with self._overlapped_downloads(items, batch_size):
            return super().predict_items(items, batch_size=batch_size, **kwargs)

    # the platform's function specs (display name, inputs, outputs) stay dtlpy's
    embed_items.__dtlpy__ = getattr(dl.BaseModelAdapter.embed_items, "__dtlpy__", None)
    predict_items.__dtlpy__ = getattr(dl.BaseModelAdapter.predict_items, "__dtlpy__", None)

    @contextlib.contextmanager
    def _overlapped_downloads(self, items: Any, batch_size: Optional[int]):
        """While dtlpy walks `items` batch by batch: taking element i starts downloading every element
        up to i + one batch (the batch size dtlpy itself uses). At most two batches are in memory."""
        if not isinstance(items, (list, tuple)) or len(items) == 0:
            yield
            return
        prefetcher = Prefetcher(items, self._prepare_item, key=id, ahead=self._batch_size(batch_size),
                                workers=self.DOWNLOAD_THREADS)
        with self._prefetch_lock:
            self._prefetchers.append(prefetcher)
        try:
            yield
        finally:
            with self._prefetch_lock:
                self._prefetchers.remove(prefetcher)
            prefetcher.close()

    def prepare_item_func(self, item: dl.Item) -> ItemInput:
        """Download one item (dtlpy calls this in 16 threads); never raises, so no item is lost.

        Inside `embed_items`/`predict_items` the item was (or is being) downloaded ahead by their
        prefetcher; otherwise it is downloaded here.
        """
        with self._prefetch_lock:
            active = list(self._prefetchers)
        for prefetcher in active:
            prepared = prefetcher.take(id(item))
            if prepared is not None:
                return prepared
        return self._prepare_item(item)

    def _prepare_item(self, item: dl.Item) -> ItemInput:
        """One item's input: its bytes downloaded and read by kind (never raises).

        The base class would turn prompt items into None for an 'image' model; CLIP embeds
        their text, or the image their prompt points to when they have no text (what
        utils/prepare_dataset.py makes), and text items too.
        """
        mimetype = getattr(item, "mimetype", None)
        kind = item_kind(mimetype, getattr(item, "system", None))
        prepared = ItemInput(item_id=getattr(item, "id", None), kind=kind, item=item)
        if kind not in (IMAGE, TEXT, PROMPT):
            prepared.error = f"unsupported item type {mimetype!r} (CLIP embeds images, texts and prompt items)"
            return prepared
        raw, prepared.error = download_bytes(item)
        if raw is not None:
            prepared.data, prepared.error = decode_payload(kind, raw)
        if isinstance(prepared.data, PromptImage):
            prepared.kind = IMAGE
            prepared.data, prepared.error = self._prompt_image_bytes(prepared.data.ref)
        return prepared

    @staticmethod
    def _prompt_image_bytes(ref: str) -> tuple[Optional[bytes], Optional[str]]:
        """The bytes of the item a prompt's image reference points to, or why there are none."""
        from adapters.clip.items import ref_item_id

        item_id = ref_item_id(ref)
        if item_id is None:
            return None, f"prompt image {ref!r} is not a Dataloop item"
        try:
            image_item = dl.items.get(item_id=item_id)
        except Exception as exc:  # noqa: BLE001 - this item's problem only
            return None, f"prompt image (item {item_id}): {type(exc).__name__}: {exc}"
        raw, error = download_bytes(image_item)
        return raw, (f"prompt image (item {item_id}): {error}" if error else None)

    @user_errors
    def embed(self, batch: list, **kwargs) -> list[Optional[list[float]]]:
        """One L2-normalised vector (list of floats) or None per element, in order."""
        self._require_loaded()
        inputs = [x if isinstance(x, ItemInput) else self.prepare_item_func(x) for x in batch]
        vectors: list[Optional[list[float]]] = [None] * len(inputs)
        reasons = {i: x.error for i, x in enumerate(inputs) if x.error}
        images = [i for i, x in enumerate(inputs) if x.ok and x.kind == IMAGE]
        texts = [i for i, x in enumerate(inputs) if x.ok and x.kind in (TEXT, PROMPT)]
        for indices, result in ((images, self.embedder.embed_images([inputs[i].data for i in images])),
                                (texts, self.embedder.embed_texts([inputs[i].data for i in texts]))):
            for position, index in enumerate(indices):
                vector = result.vector(position)
                vectors[index] = None if vector is None else vector.tolist()
                if vector is None:
                    reasons[index] = result.errors[position]
        for index, reason in reasons.items():
            self.logger.warning(f"item {inputs[index].item_id}: no embedding: {reason}")
        embedded = getattr(self._turn, "embedded", None)
        if embedded is not None:
            embedded.set()  # the next turn of _embed_in_turns may start computing
        return vectors

    # ---- text search of a dataset ----------------------------------------------------------
    @user_errors
    def search_dataset(self, dataset: dl.Dataset, text: Optional[str] = None, k: Optional[int] = None,
                       filters: Optional[dict] = None) -> tuple[list, dict]:
        """The k items of `dataset` nearest to `text` by this model's own text tower (a fine-tuned
        checkpoint's, on the model's engine), best first, among those `filters` (an items DQL query)
        selects; uploads nothing. Returns (items, {"query": <the DQL it ran>, "results": [{id, name,
        score}]}) with score the cosine similarity. The dataset must have been embedded by this model
        (its feature set); see adapters/platform_search.py."""
        from adapters.platform_search import SearchUnavailable, search_dataset

        self._require_loaded()
        entity = self.entity_or_none()
        if entity is None:
            raise ClipAdapterFailure("CLIP adapter: search_dataset needs the model entity (its feature set): "
                                     "ClipAdapter(model_entity=model)")
        try:
            found = search_dataset(entity, self.embedder, dataset, text, k, filters, logger=self.logger)
        except SearchUnavailable as exc:
            raise ClipAdapterFailure(f"CLIP adapter: {exc}") from None
        self.logger.info(f"search {text!r} in {dataset.name!r}: {len(found.items)} result(s)")
        return found.items, found.json

    # ---- the earlier adapter's vectors in the model's feature set -----------------------
    def embed_dataset(self, dataset: dl.Dataset, filters=None, upload_features=None, batch_size=None,
                      progress=None, **kwargs):
        """dtlpy's embed_dataset, first embedding again every item whose vector in the model's feature set is
        the earlier adapter's (a dataset function runs on a config that can wait for it)."""
        if self._check_vectors_once("embedding them again now (migrate_feature_set)").mixed:
            self.migrate_feature_set()
        return super().embed_dataset(dataset=dataset, filters=filters, upload_features=upload_features,
                                     batch_size=batch_size, progress=progress, **kwargs)

    def _check_vectors_once(self, action: str) -> VectorCheck:
        """The oldest SAMPLE_SIZE vectors of the feature set, checked once per loaded model; logs what it
        means if they are the earlier adapter's. Never stops an embedding: a failed look is a warning."""
        if self._vectors_checked or self.entity_or_none() is None:
            return VectorCheck()
        self._vectors_checked = True
        try:
            check = VectorCheck().add(next(iter(self._feature_vectors(SAMPLE_SIZE)), []))
        except Exception as exc:  # noqa: BLE001 - the look is a courtesy; the embedding goes on
            self.logger.warning(f"could not look at the feature set's vectors: {type(exc).__name__}: {exc}")
            return VectorCheck()
        if check.mixed:
            self.logger.warning(MIXED_VECTORS_NOTE.format(name=self.feature_set.name) + f"; {action}")
        return check

    def _feature_vectors(self, page_size: int):
        """(entity id, vector) pairs of the model's feature set, oldest first (dtlpy sorts by id), a page at a time."""
        filters = dl.Filters(resource=dl.FiltersResource.FEATURE, page_size=page_size)
        for page in self.feature_set.features.list(filters=filters):
            yield [(feature.entity_id, feature.value) for feature in page]

    MIGRATION_PAGE_SIZE = 200  # vectors read per request while looking for the earlier adapter's

    @user_errors
    def migrate_feature_set(self, batch_size: Optional[int] = None) -> int:
        """Embed again every item whose vector in the model's feature set is not unit length (the earlier
        CLIP adapter's), so a search never ranks a mixture. Returns how many items were embedded again.

        From the SDK: `ClipAdapter(model_entity=model).migrate_feature_set()`; `embed_dataset` runs it by
        itself when it finds such vectors. An item that cannot be embedded now keeps its old vector and
        is named in the log."""
        self._require_loaded()
        self._vectors_checked = True  # re-embedding goes through embed_items: no second look
        check = VectorCheck()
        for page in self._feature_vectors(self.MIGRATION_PAGE_SIZE):
            check.add(page)
        if not check.mixed:
            self.logger.info(f"feature set {self.feature_set.name!r}: all {check.looked_at} vectors are current")
            return 0
        self.logger.info(f"feature set {self.feature_set.name!r}: embedding {len(check.old_entities)} of "
                         f"{check.looked_at} items again (their vectors are the earlier adapter's)")
        done, missing = 0, []
        with ThreadPoolExecutor(max_workers=16) as pool:  # item fetches wait on the network, not the CPU
            for ids in batches(check.old_entities, batch_size or self.settings.batch_size):
                fetched = list(pool.map(self._item_or_none, ids))
                missing += [item_id for item_id, item in zip(ids, fetched) if item is None]
                items = [item for item in fetched if item is not None]
                if not items:
                    continue
                try:
                    embedded, _ = self.embed_items(items, upload_features=True, batch_size=batch_size)
                except Exception as exc:  # noqa: BLE001 - one failed batch keeps its old vectors, the rest go on
                    self.logger.warning(f"embedding {len(items)} items again failed: {type(exc).__name__}: {exc}")
                    continue
                done += len(embedded)
        if done < len(check.old_entities):
            self.logger.warning(f"{len(check.old_entities) - done} items keep their old vectors (missing: "
                                f"{missing[:20]}{' ...' if len(missing) > 20 else ''}; others failed to embed, "
                                f"see above)")
        return done

    @staticmethod
    def _item_or_none(item_id: str) -> Optional[dl.Item]:
        try:
            return dl.items.get(item_id=item_id)
        except Exception:  # noqa: BLE001 - a deleted item keeps its vector; counted by the caller
            return None

    # ---- predict (zero-shot classification) ---------------------------------------------
    @user_errors
    def predict(self, batch: list, **kwargs) -> list:
        """One dl.AnnotationCollection per element: the top `top_k` labels of each image as
        dl.Classification with their softmax confidence; empty for anything that is not an image.

        A model without labels predicts nothing (one warning per loaded model, not per batch):
        dtlpy's `evaluate_model` predicts over the dataset before it evaluates, and a failed batch
        would fail the evaluation of every embedding model.
        """
        self._require_loaded()
        collections = [dl.AnnotationCollection() for _ in batch]
        labels = self.zero_shot_labels()
        if not labels:
            if not self._warned_no_labels:
                self._warned_no_labels = True
                self.logger.warning(f"CLIP adapter: predict gives no annotations: {NO_LABELS}")
            return collections
        classifier = self._zero_shot_classifier(labels)
        inputs = [x if isinstance(x, ItemInput) else self.prepare_item_func(x) for x in batch]
        images = [i for i, x in enumerate(inputs) if x.ok and x.kind == IMAGE]
        for x in [x for x in inputs if not (x.ok and x.kind == IMAGE)]:
            reason = x.error or f"a {x.kind} item (zero-shot classification labels images)"
            self.logger.info(f"item {x.item_id}: no prediction: {reason}")
        results = classifier.classify([inputs[i].data for i in images], top_k=self.settings.top_k)
        entity = self.entity_or_none()
        for index, result in zip(images, results):
            if not result.ok:
                self.logger.warning(f"item {inputs[index].item_id}: no prediction: {result.error}")
                continue
            for scored in result.labels:
                collections[index].add(annotation_definition=dl.Classification(label=scored.label),
                                       model_info={"name": entity.name if entity is not None else "clip",
                                                   "model_id": entity.id if entity is not None else None,
                                                   "confidence": scored.score})
        return collections

    def zero_shot_labels(self) -> list[str]:
        """The model entity's labels (or its id_to_label_map), else the `labels` configuration key;
        empty when there are none."""
        entity = self.entity_or_none()
        if entity is not None:
            if entity.labels:
                return [str(label) for label in entity.labels]
            mapping = self.configuration["id_to_label_map"] if "id_to_label_map" in self.configuration else None
            if mapping:
                return [str(mapping[key]) for key in sorted(mapping, key=int)]
        return list(self.settings.labels or [])

    def _zero_shot_classifier(self, labels: list[str]):
        """Class vectors are computed once per (labels, templates, weights), not per batch."""
        from adapters.clip.classify import ZeroShotClassifier

        templates = list(self.settings.prompt_templates)
        key = (tuple(labels), tuple(templates), id(self.clip), self.clip.fingerprint)
        cached = getattr(self, "_zero_shot", None)
        if cached is None or cached[0] != key:
            cached = (key, ZeroShotClassifier(self.embedder, labels, templates))
            self._zero_shot = cached
        return cached[1]

    # ---- train / evaluate ----------------------------------------------------------------
    # The run's folder under output_path while training; `save` lays it out flat at the top of the model
    # (training_report.json/.md, training_curves.png, training_metrics.jsonl, training_resume.zip):
    # dtlpy lists a model's artifacts with `<model folder>/*`, which does not reach into subfolders.
    TRAINING_DIR = "training"

    @user_errors
    def train(self, data_path: str, output_path: str, **kwargs) -> None:
        """Fine-tune the loaded model on the caption pairs `prepare_data` laid out in `data_path`.

        Starts from the weights `load` put in `self.clip` and leaves the final (best on validation,
        or WiSE-FT) weights there, so dtlpy's `save_to_model` -> `save` uploads them. The run's
        curves and report go to `output_path/training` and are uploaded with the weights; the
        resumable state and duplicate checkpoints are removed once training has finished.

        A train_model that died (preemption, timeout, an error) uploaded its resume state with the
        artifacts (see `save`); the next train_model of the model downloads it and continues from
        the last finished epoch, ending with the weights an uninterrupted run would have.
        """
        import shutil

        from adapters.clip.manifests import load_pairs
        from adapters.clip.reports import name_output
        from adapters.clip.runs import BEST, LAST, WISE_FT
        from adapters.clip.termination import sigterm_stops_training
        from adapters.clip.train import fit

        self._require_loaded()
        settings = self.read_settings()
        pairs = load_pairs(data_path)
        self.logger.info(f"training on {data_path}: {pairs.summary()}")
        run_dir = Path(output_path) / self.TRAINING_DIR
        resume = self._continue_interrupted_run(run_dir, settings, pairs)
        epoch_end = kwargs.get("on_epoch_end_callback")
        upload_every_s, last_upload = settings.resume_upload_minutes * 60, time.monotonic()

        def on_epoch_end(record, num_epochs: int) -> None:
            nonlocal last_upload
            self._publish_epoch(record)
            if upload_every_s and record.epoch < num_epochs and time.monotonic() - last_upload >= upload_every_s:
                self._upload_resume_state(run_dir)
                last_upload = time.monotonic()
            if epoch_end is not None:
                epoch_end(record.epoch - 1, num_epochs)  # dtlpy counts epochs from 0

        self._interrupted = False
        try:
            with sigterm_stops_training():  # a preempted pod raises here, so dtlpy uploads on failure
                result = fit(settings, pairs, run_dir, clip=self.clip, resume=resume, on_epoch_end=on_epoch_end)
        except BaseException:
            self._interrupted = True  # what `save` then uploads: see _save_interrupted_run
            raise
        self.model = self.clip.model
        for name in (LAST, BEST, WISE_FT):  # the weights themselves are saved by `save`
            shutil.rmtree(run_dir / name, ignore_errors=True)
        name_output(run_dir, output_path)  # the report named best/, just removed: the model is output_path
        self.logger.info(f"training finished: {self._headline(result.report)}")

    def _upload_resume_state(self, run_dir: Path) -> None:
        """The run so far (last/, best/, metrics), as one archive at the top of the model's artifacts: what
        the next train_model continues from if this pod is killed outright (no exception, so no save)."""
        import tempfile

        entity = self.entity_or_none()
        if entity is None:
            return
        started = time.monotonic()
        try:
            with tempfile.TemporaryDirectory(prefix="clip-resume-") as folder:
                archive = Path(folder) / RESUME_ARCHIVE
                pack_resume_state(run_dir, archive, resumable=True)
                entity.artifacts.upload(filepath=str(archive), overwrite=True)
        except Exception as exc:  # noqa: BLE001 - a failed upload costs resumability, not the training
            self.logger.warning(f"could not upload the resume state: {type(exc).__name__}: {exc}")
            return
        self.logger.info(f"uploaded the resume state in {time.monotonic() - started:.0f} s")

    def _continue_interrupted_run(self, run_dir: Path, settings: ClipConfig, pairs) -> bool:
        """Put the resume state an interrupted train_model uploaded (downloaded with the artifacts by
        load_from_model) into `run_dir`, when it is this model's run on the same data and configuration."""
        import tempfile

        from adapters.clip.train import resume_problem

        archive = self._artifacts_dir / RESUME_ARCHIVE if self._artifacts_dir is not None else None
        if archive is None or not archive_is_resumable(archive):
            return False
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".resume-", dir=run_dir.parent) as folder:
            saved = unpack_resume_state(archive, folder)
            problem = resume_problem(saved, settings, pairs, self.clip)
            if problem is not None:
                self.logger.warning(f"not continuing the interrupted training ({problem}): training from the start")
                return False
            self.logger.info(f"continuing the interrupted training after epoch {adopt_run(saved, run_dir).epoch}")
        return True

    EVAL_FIGURES = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "mean_recall",
                    "zero_shot_accuracy")

    @user_errors
    def evaluate(self, model: dl.Model, dataset: dl.Dataset, filters: Optional[dl.Filters] = None) -> dl.Model:
        """Retrieval metrics of the loaded model on a dataset's captioned items, sent as the model's metrics.

        dtlpy's `evaluate_model` calls this after `load_from_model`. The items (prompt items with
        their caption annotations, or images with descriptions) are downloaded in dtlpy's layout,
        their prompt images fetched, and every pair scored: Recall@1/5/10 both ways, ranks, and
        zero-shot accuracy where items carry labels.
        """
        import tempfile

        from adapters.clip.manifests import load_pairs
        from adapters.clip.evaluate import evaluate_pairs

        self._require_loaded()
        if isinstance(filters, dict):
            filters = dl.Filters(custom_filter=filters)
        with tempfile.TemporaryDirectory(prefix="clip-eval-") as root:
            # Everything downloaded counts as the evaluation subset, whatever its ML-subset tags.
            dataset.items.download(local_path=str(Path(root) / "validation"), filters=filters,
                                   annotation_options=dl.ViewAnnotationOptions.JSON)
            self.convert_from_dtlpy(root)
            pairs = load_pairs(root)
            for problem in pairs.problems:
                self.logger.warning(f"evaluation skipped {problem}")
            metrics = evaluate_pairs(self.clip, pairs.subset("validation"), batch_size=self.settings.batch_size,
                                     templates=self.settings.prompt_templates)
        self.logger.info("evaluation on %s: %s", dataset.name,
                         ", ".join(f"{k} {metrics[k]:.3f}" for k in self.EVAL_FIGURES if k in metrics))
        samples = [dl.PlotSample(figure=f"evaluation: {key}", legend=dataset.name, x=0, y=float(metrics[key]))
                   for key in self.EVAL_FIGURES if key in metrics]
        model.metrics.create(samples=samples, dataset_id=dataset.id)
        return model

    def prepare_data(self, dataset: dl.Dataset, root_path=None, data_path=None, output_path=None, overwrite=False,
                     **kwargs):
        """dtlpy's prepare_data, downloading every item of each subset with all its annotations, whatever
        the model's output type.

        A caption is an item's description or a prompt item's free-text annotation; which annotations
        are captions is decided when the data is read (never the model's own). dtlpy's prepare_data
        instead joins each subset with annotations *of the output type*: Dataloop's CLIP tutorial sets
        `output_type = "text"` on images whose captions are descriptions, so none would be downloaded
        ("No items downloaded for subset train"). The earlier CLIP adapter exported whole subsets too.
        So the download runs as for an embedding model (no annotation join), the entity's output type
        restored after it (nothing is written to the platform)."""
        entity = self.model_entity
        output_type = entity.output_type
        entity.output_type = "embedding"
        try:
            return super().prepare_data(dataset, root_path=root_path, data_path=data_path, output_path=output_path,
                                        overwrite=overwrite, **kwargs)
        finally:
            entity.output_type = output_type

    @user_errors
    def convert_from_dtlpy(self, data_path: str, **kwargs) -> None:
        """Called at the end of dtlpy's `prepare_data`: fetch the images that prompt items point to.

        A prompt item's image is another item (often in another dataset) that `prepare_data`
        does not download. Each lands where `load_pairs` looks for it; one that cannot be
        fetched is logged here and reported (then skipped) when the data is read.
        """
        from concurrent.futures import ThreadPoolExecutor

        from adapters.clip.exports import prompt_images_to_download

        wanted = prompt_images_to_download(data_path)
        if not wanted:
            return
        with ThreadPoolExecutor(max_workers=16) as pool:  # downloads wait on the network, not the CPU
            failures = [f for f in pool.map(lambda item_id: self._fetch_prompt_image(data_path, item_id), wanted)
                        if f]
        self.logger.info(f"downloaded {len(wanted) - len(failures)} of {len(wanted)} prompt images")
        for failure in failures:
            self.logger.warning(failure)

    @staticmethod
    def _fetch_prompt_image(data_path: str, item_id: str) -> Optional[str]:
        """Download one prompt image; the reason it failed, or None."""
        from adapters.clip.prompt_images import prompt_image_target
        from adapters.clip.files import atomic_path

        try:
            item = dl.items.get(item_id=item_id)
        except Exception as exc:  # noqa: BLE001 - one missing image must not stop the training
            return f"prompt image {item_id}: {type(exc).__name__}: {exc}"
        raw, error = download_bytes(item)
        if error:
            return f"prompt image {item_id}: {error}"
        with atomic_path(prompt_image_target(data_path, item_id, Path(item.name).suffix or ".jpg")) as tmp:
            tmp.write_bytes(raw)
        return None

    def _publish_epoch(self, record) -> None:
        """Per-epoch loss and recall as the platform's metric plots; a failed upload never stops training."""
        if self.entity_or_none() is None:
            return
        val = record.val
        samples = [dl.PlotSample(figure="loss", legend="train", x=record.epoch, y=record.train_loss),
                   dl.PlotSample(figure="loss", legend="validation", x=record.epoch, y=val["loss"]),
                   dl.PlotSample(figure="recall@1", legend="text->image", x=record.epoch, y=val["t2i_r1"]),
                   dl.PlotSample(figure="recall@1", legend="image->text", x=record.epoch, y=val["i2t_r1"]),
                   dl.PlotSample(figure="mean recall", legend="validation", x=record.epoch, y=val["mean_recall"])]
        try:
            self.model_entity.metrics.create(samples=samples, dataset_id=self.model_entity.dataset_id)
        except Exception as exc:  # noqa: BLE001 - plots are a convenience; the training must go on
            self.logger.warning(f"could not send epoch {record.epoch} metrics to the platform: {exc}")

    @staticmethod
    def _headline(report: dict) -> str:
        from adapters.clip.reports import headline
        return headline(report) if report else "no report"


    # ---- curation (near-duplicates, diverse samples) ---------------------------------------
    @user_errors
    def find_duplicates(self, dataset: dl.Dataset, filters: Optional[dict] = None,
                        threshold: Optional[float] = None) -> dict:
        """Near-duplicate groups of the selected items, from the vectors in the model's feature set
        (never re-embedded): {"groups": [[kept id, ...], ...], "missing": [...], "threshold": t}. Every
        member gets metadata.user.clip.duplicate_group = its kept id; selected items no longer in a
        group lose it. docs/curation.md."""
        from adapters.platform_curation import find_duplicates
        return find_duplicates(self.model_entity, dataset, filters, threshold, logger=self.logger)

    @user_errors
    def sample_diverse(self, dataset: dl.Dataset, n: int, filters: Optional[dict] = None,
                       exclude: Optional[dict] = None) -> tuple[list, dict]:
        """n selected items by greedy k-center (farthest first), far from the `exclude` query's items:
        (the items in pick order, {"items": [ids], "radius": r}). docs/curation.md."""
        from adapters.platform_curation import sample_diverse
        outcome = sample_diverse(self.model_entity, dataset, n, filters, exclude, logger=self.logger)
        return outcome.items, outcome.json

    # ---- helpers -------------------------------------------------------------------------
    def entity_or_none(self) -> Optional[dl.Model]:
        """The model entity, or None when the adapter runs without one (dtlpy's public property raises)."""
        try:
            return self.model_entity
        except ValueError:
            return None

    def _require_loaded(self) -> None:
        if self.clip is None or self.embedder is None:
            raise ClipAdapterFailure("CLIP adapter: no model loaded; call load() (or load_from_model) first")

