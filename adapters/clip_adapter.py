"""`ClipAdapter`: the Dataloop model adapter. Thin: every decision is made in `adapters.clip`.

The platform calls `load` (after downloading the model's artifacts), `save` (before uploading
them), `embed` (from `embed_items`/`embed_dataset`, which `model.embed(...)` ends up calling),
`train` and `predict`. Library errors become one-line messages here, at the edge.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import dtlpy as dl
from dtlpy.ml.base_model_adapter import AdapterDefaults

# Dataloop's runner loads this file by path (dataloop.json entryPoint); make the package importable.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from adapters.clip.config import ClipConfig  # noqa: E402
from adapters.clip.embed import Embedder  # noqa: E402
from adapters.clip.errors import ClipAdapterError  # noqa: E402
from adapters.clip.items import IMAGE, PROMPT, TEXT, ItemInput, decode_payload, item_kind  # noqa: E402
from adapters.clip.models import ClipModel, find_checkpoint, load_model, save_checkpoint  # noqa: E402

# Keys dtlpy itself keeps in a model's configuration; ours are validated by ClipConfig.
DTLPY_KEYS = frozenset({f.name for f in dataclasses.fields(AdapterDefaults)} | {
    "include_background", "include_model_annotations", "column",
    "predict_embed_subset_limit", "predict_embed_timeout",
})

F = TypeVar("F", bound=Callable[..., Any])


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

    return wrapper  # type: ignore[return-value]


class ClipAdapter(dl.BaseModelAdapter):
    def __init__(self, model_entity: Optional[dl.Model] = None):
        self.clip: Optional[ClipModel] = None
        self.embedder: Optional[Embedder] = None
        self.settings: ClipConfig = ClipConfig()
        super().__init__(model_entity=model_entity)

    # ---- configuration -------------------------------------------------------------------
    def read_settings(self) -> ClipConfig:
        """The model entity's configuration, validated (defaults without an entity)."""
        raw = {k: v for k, v in dict(self.configuration).items() if k not in DTLPY_KEYS}
        self.settings = ClipConfig.from_dict(raw, warn=self.logger.warning)
        return self.settings

    def _record_embeddings_size(self, dim: int) -> None:
        """The feature set is created with configuration['embeddings_size'] (dtlpy defaults to 256)."""
        if self._model_entity is None:
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
        checkpoint = find_checkpoint(local_path) if local_path else None
        source = str(checkpoint) if checkpoint else settings.model_name
        self.clip = load_model(source, device=settings.device, precision=settings.precision,
                               arch=settings.model_name if checkpoint else None)
        self.clip.warmup()
        self.embedder = Embedder(self.clip, batch_size=settings.batch_size, num_workers=settings.num_workers)
        self.model = self.clip.model
        self._record_embeddings_size(self.clip.dim)
        self.logger.info(f"loaded {self.clip.description}")

    @user_errors
    def save(self, local_path: str, **kwargs) -> None:
        """Write the project's checkpoint format into `local_path` (uploaded as the model's artifacts)."""
        self._require_loaded()
        save_checkpoint(self.clip, local_path, config=self.settings.to_dict(),
                        metrics=kwargs.get("metrics"), replace_directory=False)

    def prepare_item_func(self, item: dl.Item) -> ItemInput:
        """Download one item (dtlpy calls this in 16 threads); never raises, so no item is lost.

        The base class would turn prompt items into None for an 'image' model; CLIP embeds
        their text, and text items too.
        """
        kind = item_kind(getattr(item, "mimetype", None), getattr(item, "system", None))
        prepared = ItemInput(item_id=item.id, kind=kind, item=item)
        if kind not in (IMAGE, TEXT, PROMPT):
            prepared.error = f"unsupported item type {item.mimetype!r} (CLIP embeds images, texts and prompt items)"
            return prepared
        try:
            buffer = item.download(save_locally=False)
            if buffer is None:
                prepared.error = "download failed: the platform returned no data"
            else:
                prepared.data, prepared.error = decode_payload(kind, buffer.getvalue())
        except Exception as exc:  # noqa: BLE001 - a failed download is this item's problem only
            prepared.error = f"download failed: {type(exc).__name__}: {exc}"
        return prepared

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
        return vectors

    # ---- predict (zero-shot classification) ---------------------------------------------
    @user_errors
    def predict(self, batch: list, **kwargs) -> list:
        """One dl.AnnotationCollection per element: the top `top_k` labels of each image as
        dl.Classification with their softmax confidence; empty for anything that is not an image."""
        self._require_loaded()
        classifier = self._zero_shot_classifier()
        inputs = [x if isinstance(x, ItemInput) else self.prepare_item_func(x) for x in batch]
        collections = [dl.AnnotationCollection() for _ in inputs]
        images = [i for i, x in enumerate(inputs) if x.ok and x.kind == IMAGE]
        for x in [x for x in inputs if not (x.ok and x.kind == IMAGE)]:
            reason = x.error or f"a {x.kind} item (zero-shot classification labels images)"
            self.logger.info(f"item {x.item_id}: no prediction: {reason}")
        results = classifier.classify([inputs[i].data for i in images], top_k=self.settings.top_k)
        entity = self._model_entity
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
        """The model entity's labels (or its id_to_label_map), else the `labels` configuration key."""
        from adapters.clip.errors import ConfigError

        entity = self._model_entity
        if entity is not None:
            if entity.labels:
                return [str(label) for label in entity.labels]
            mapping = self.configuration["id_to_label_map"] if "id_to_label_map" in self.configuration else None
            if mapping:
                return [str(mapping[key]) for key in sorted(mapping, key=int)]
        if self.settings.labels:
            return list(self.settings.labels)
        raise ConfigError("zero-shot predict has no labels: give the model labels (its dataset's ontology) "
                          "or set the 'labels' configuration key, e.g. [\"cat\", \"dog\"]")

    def _zero_shot_classifier(self):
        """Class vectors are computed once per (labels, templates, weights), not per batch."""
        from adapters.clip.classify import ZeroShotClassifier

        labels, templates = self.zero_shot_labels(), list(self.settings.prompt_templates)
        key = (tuple(labels), tuple(templates), id(self.clip), self.clip.fingerprint)
        cached = getattr(self, "_zero_shot", None)
        if cached is None or cached[0] != key:
            cached = (key, ZeroShotClassifier(self.embedder, labels, templates))
            self._zero_shot = cached
        return cached[1]

    # ---- train / evaluate ----------------------------------------------------------------
    TRAINING_DIR = "training"  # under output_path: metrics.jsonl, curves.png, report.md/json (uploaded)

    @user_errors
    def train(self, data_path: str, output_path: str, **kwargs) -> None:
        """Fine-tune the loaded model on the caption pairs `prepare_data` laid out in `data_path`.

        Starts from the weights `load` put in `self.clip` and leaves the final (best on validation,
        or WiSE-FT) weights there, so dtlpy's `save_to_model` -> `save` uploads them. The run's
        curves and report go to `output_path/training` and are uploaded with the weights; the
        resumable state and duplicate checkpoints are removed once training has finished.
        """
        import shutil

        from adapters.clip.manifests import load_pairs
        from adapters.clip.models import CHECKPOINT_WEIGHTS, read_state_dict
        from adapters.clip.reports import name_output
        from adapters.clip.runs import BEST, LAST, WISE_FT
        from adapters.clip.train import fit, load_weights_into

        self._require_loaded()
        settings = self.read_settings()
        pairs = load_pairs(data_path)
        self.logger.info(f"training on {data_path}: {pairs.summary()}")
        run_dir = Path(output_path) / self.TRAINING_DIR
        epoch_end = kwargs.get("on_epoch_end_callback")

        def on_epoch_end(record, num_epochs: int) -> None:
            self._publish_epoch(record)
            if epoch_end is not None:
                epoch_end(record.epoch - 1, num_epochs)  # dtlpy counts epochs from 0

        try:
            result = fit(settings, pairs, run_dir, clip=self.clip, on_epoch_end=on_epoch_end)
        except BaseException:
            # dtlpy saves and uploads the model on failure too: make that the best epoch so far,
            # not whatever the interrupted step left in memory.
            best = run_dir / BEST / CHECKPOINT_WEIGHTS
            if best.is_file():
                load_weights_into(self.clip, read_state_dict(best))
            raise
        self.model = self.clip.model
        for name in (LAST, BEST, WISE_FT):  # the weights themselves are saved by `save`
            shutil.rmtree(run_dir / name, ignore_errors=True)
        name_output(run_dir, output_path)  # the report named best/, just removed: the model is output_path
        self.logger.info(f"training finished: {self._headline(result.report)}")

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
            buffer = item.download(save_locally=False)
            if buffer is None:
                return f"prompt image {item_id}: the platform returned no data"
            with atomic_path(prompt_image_target(data_path, item_id, Path(item.name).suffix or ".jpg")) as tmp:
                tmp.write_bytes(buffer.getvalue())
        except Exception as exc:  # noqa: BLE001 - one missing image must not stop the training
            return f"prompt image {item_id}: {type(exc).__name__}: {exc}"
        return None

    def _publish_epoch(self, record) -> None:
        """Per-epoch loss and recall as the platform's metric plots; a failed upload never stops training."""
        if self._model_entity is None:
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


    # ---- helpers -------------------------------------------------------------------------
    def _require_loaded(self) -> None:
        if self.clip is None or self.embedder is None:
            raise ClipAdapterFailure("CLIP adapter: no model loaded; call load() (or load_from_model) first")

