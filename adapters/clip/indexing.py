"""Indexing a folder into a store: find files, embed only what is new or changed, commit in batches.

`index` is incremental: unchanged files (same size and mtime) are only stat'ed; a changed file is
re-embedded; a moved or renamed file with the same content reuses its vector (content hash);
files that vanished from the indexed folders are removed. Batches commit as they finish, so a
killed run keeps everything it committed and the next run carries on from there. `reindex`
builds a whole new data folder for another model beside the live one and swaps it in at the end
(see store.py for the layout).
"""
from __future__ import annotations

import itertools
import logging
import os
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence


from .progress import progress_bar
from .errors import InputError
from .files import content_hash, write_text_atomic
from .image_files import walk_images
from .images import IMAGE_SUFFIXES, OTHER_IMAGE_SUFFIXES, supported_types
from .faults import faultpoint
from .store import (CHUNK_ROWS, CURRENT, DB_FILE, REINDEX_PREFIX, FileStat, ItemRecord, ModelBinding, Store,
                    Transaction, next_data_dir, remove_temp_files, settle_layout, sqlite_errors, writer_lock)
from .filters import typed_metadata
from .photos import photo_metadata

if TYPE_CHECKING:
    from .embed import Embedder

log = logging.getLogger(__name__)

LIST_FAILED = "cannot list folder"


# --------------------------------------------------------------------------------------
# Finding files
# --------------------------------------------------------------------------------------
@dataclass
class Scope:
    """Which stored items an index run speaks for: those it may find vanished."""

    folders: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    everything: bool = False
    unreadable: list[str] = field(default_factory=list)  # sub-folders that could not be listed: none vanished
    unsupported: Counter = field(default_factory=Counter)  # suffix -> photos of a kind not read here (HEIC)

    def hides(self, path: str) -> bool:
        """Whether `path` lies in a folder this run could not list (its absence proves nothing)."""
        return any(path.startswith(folder.rstrip(os.sep) + os.sep) for folder in self.unreadable)


def scan_files(paths: Iterable[str | os.PathLike], suffixes: frozenset[str] = IMAGE_SUFFIXES
               ) -> tuple[list[FileStat], Scope, list[tuple[str, str]]]:
    """Image files under `paths` (folders walked, hidden entries skipped), their scope, and problems.

    A named path that does not exist is an error: treating it as "everything there was deleted"
    would empty the store because of a typo or an unmounted drive.
    """
    found: dict[str, FileStat] = {}
    scope = Scope()
    problems: list[tuple[str, str]] = []
    for raw in paths:
        path = os.path.abspath(os.path.expanduser(os.fspath(raw)))
        if os.path.isdir(path):
            scope.folders.append(path)
            for stat in _walk(path, suffixes | OTHER_IMAGE_SUFFIXES, problems):
                suffix = os.path.splitext(stat.path)[1].lower()
                if suffix in suffixes:
                    found[stat.path] = stat
                else:
                    scope.unsupported[suffix] += 1
        elif os.path.isfile(path):
            scope.files.append(path)
            stat = _stat(path, problems)
            if stat:
                found[stat.path] = stat
        else:
            raise InputError(f"{raw}: no such file or folder")
    return sorted(found.values(), key=lambda s: s.path), scope, problems


def _require_existing(paths: Iterable[str | os.PathLike]) -> None:
    for raw in paths:
        if not os.path.exists(os.path.expanduser(os.fspath(raw))):
            raise InputError(f"{raw}: no such file or folder")


def _walk(folder: str, suffixes: frozenset[str], problems: list[tuple[str, str]]) -> Iterator[FileStat]:
    def report(error: OSError) -> None:
        problems.append((error.filename or folder, f"{LIST_FAILED}: {error.strerror or error}"))

    for path in walk_images(folder, suffixes=suffixes, on_error=report):
        stat = _stat(path, problems)
        if stat:
            yield stat


def _stat(path: str, problems: list[tuple[str, str]]) -> Optional[FileStat]:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        problems.append((path.encode("utf-8", "replace").decode(), "file name is not valid UTF-8; rename it"))
        return None
    try:
        st = os.stat(path)
    except OSError as exc:
        problems.append((path, f"cannot stat: {exc.strerror or exc}"))
        return None
    return FileStat(path, st.st_size, st.st_mtime_ns)


def file_hash(path: str) -> str:
    """The content's hash: equal bytes, equal vector."""
    return content_hash(path)


# --------------------------------------------------------------------------------------
# Indexing
# --------------------------------------------------------------------------------------
@dataclass
class IndexOptions:
    subset: Optional[str] = None                   # for every file this run adds or finds
    metadata: dict[str, Any] = field(default_factory=dict)   # merged into every file's metadata
    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)  # abs path -> subset/caption/metadata
    batch_size: int = 64
    show_progress: bool = True
    ann: str = "auto"                              # auto | build | off (see ann.refresh_ann)
    photo_metadata: bool = True                    # read taken/year/month/camera/size/GPS (photos.py)
    allow_empty_root: bool = False                 # an indexed folder with no images left: remove its items
    on_batch: Optional[Callable[["IndexSummary"], None]] = None  # after each committed batch


@dataclass
class IndexSummary:
    store: str
    model: str
    scanned: int = 0
    added: int = 0
    updated: int = 0
    removed: int = 0
    reused: int = 0       # moved, renamed or duplicate files: their vector was taken, not computed
    unchanged: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    items: int = 0
    seconds: float = 0.0
    reindexed: bool = False
    ann: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    @property
    def embedded(self) -> int:
        return self.added + self.updated

    def line(self) -> str:
        return (f"added {self.added}, updated {self.updated}, removed {self.removed}, reused {self.reused}, "
                f"unchanged {self.unchanged}, failed {self.failed}; {self.items} items in {self.store} "
                f"({self.seconds:.1f} s)")

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["failures"] = [{"path": p, "reason": r} for p, r in self.failures]
        return data


def index(root: str | os.PathLike, embedder: "Embedder", paths: Sequence[str | os.PathLike],
          options: Optional[IndexOptions] = None) -> IndexSummary:
    """Bring the store in `root` up to date with the images under `paths` (created on first use).

    Embeds only new and changed files; reuses the vector of any file whose content is already
    stored (moves, renames, copies); removes items whose files vanished from under `paths`.
    """
    options = options or IndexOptions()
    started = time.perf_counter()
    binding = ModelBinding.of(embedder.clip)
    root = Path(root).expanduser().absolute()
    _require_existing(paths)  # before the lock: a typo must not leave an empty store folder behind
    with sqlite_errors(root), writer_lock(root):
        files, scope, problems = scan_files(paths)
        notes = settle_layout(root)
        with Store.open(root, create=binding) as store:
            store.check_model(binding)
            store.catch_up()
            summary = IndexSummary(str(root), store.binding.name, scanned=len(files), notes=notes)
            _fail_problems(summary, problems)
            _keep_items_of_empty_folders(store, scope, files, problems, options, summary)
            _update(store, embedder, files, scope, options, summary)
            summary.notes.extend(_scan_notes(scope, files))
            store.remember_roots([*scope.folders, *scope.files])
            _finish(store, options, summary)
            stopped = [p.name for p in root.glob(REINDEX_PREFIX + "*")]
            if stopped:
                summary.notes.append(f"a stopped re-index is kept in {root / stopped[0]}; rerun "
                                     f"`index --reindex` with its model to finish it")
    summary.seconds = time.perf_counter() - started
    return summary


def reindex(root: str | os.PathLike, embedder: "Embedder", paths: Sequence[str | os.PathLike] = (),
            options: Optional[IndexOptions] = None) -> IndexSummary:
    """Re-embed every item of the store (and the images under `paths`) with `embedder`'s model.

    The new vectors are built in a folder beside the old ones; only when all are in does CURRENT
    switch to them. Until then the old store keeps working, whatever happens to this run; a
    stopped re-index is resumed by the next call with the same model.
    """
    options = options or IndexOptions()
    started = time.perf_counter()
    binding = ModelBinding.of(embedder.clip)
    root = Path(root).expanduser().absolute()
    with sqlite_errors(root), writer_lock(root):
        extra, _, problems = scan_files(paths)
        notes = settle_layout(root)
        with Store.open(root) as old:
            old.catch_up()
            work = root / f"{REINDEX_PREFIX}{binding.fingerprint[:16]}"
            for stale in root.glob(REINDEX_PREFIX + "*"):
                if stale != work:  # a stopped re-index for another model
                    shutil.rmtree(stale, ignore_errors=True)
            if (work / DB_FILE).is_file():  # a stopped re-index: carry on from what it committed
                remove_temp_files(work)
                new = Store.open_data_dir(root, work)
            else:
                new = Store.create_data_dir(root, work, binding)
            with new:
                new.check_model(binding)
                new.remember_roots(old.roots())
                new.catch_up()
                attributes: dict[str, dict[str, Any]] = {}
                stats: dict[str, FileStat] = {}
                for record in old.iter_items():
                    attributes[record.path] = {"subset": record.subset, "caption": record.caption,
                                               "metadata": record.metadata}
                    if os.path.isfile(record.path):
                        found = _stat(record.path, problems)
                        if found:
                            stats[found.path] = found
                stats.update({s.path: s for s in extra})
                files = sorted(stats.values(), key=lambda s: s.path)
                merged = IndexOptions(**{**options.__dict__, "attributes": {**attributes, **options.attributes}})
                summary = IndexSummary(str(root), binding.name, scanned=len(files), reindexed=True, notes=notes)
                _fail_problems(summary, problems)
                _update(new, embedder, files, Scope(everything=True), merged, summary)
                kept = new.paths()
                summary.removed = sum(1 for path in attributes if path not in kept)
                _finish(new, options, summary)
        faultpoint("reindex.built")
        final = next_data_dir(root)
        os.replace(work, final)  # complete before the rename: a data-N newer than CURRENT is a finished re-index
        faultpoint("reindex.renamed")
        write_text_atomic(root / CURRENT, final.name + "\n")
        # the old data folder stays until the next writer run: a reader may still have it open
    summary.seconds = time.perf_counter() - started
    return summary


def _scan_notes(scope: Scope, files: list[FileStat]) -> list[str]:
    """What the walk passed over that a person would otherwise not know: photos of kinds not read
    here, and folders without a single image."""
    notes = []
    if scope.unsupported:
        kinds = ", ".join(f"{count} {suffix}" for suffix, count in sorted(scope.unsupported.items()))
        notes.append(f"skipped {kinds} file(s): not a type read here (supported: {supported_types()}); convert them "
                     f"(to JPEG, say) to index them")
    if not files and (scope.folders or scope.files):
        notes.append(f"no image files found in {', '.join(scope.folders + scope.files)} "
                     f"(supported: {supported_types()}; hidden files and folders are skipped)")
    return notes


def _fail_problems(summary: IndexSummary, problems: list[tuple[str, str]]) -> None:
    summary.failed += len(problems)
    summary.failures.extend(problems)


def _finish(store: Store, options: IndexOptions, summary: IndexSummary) -> None:
    if store.needs_compaction():
        store.compact()
    if options.ann != "off":
        from .ann import refresh_ann  # FAISS is only needed for large stores
        summary.ann = refresh_ann(store, build=options.ann == "build")
    summary.items = store.count()


def _keep_items_of_empty_folders(store: Store, scope: Scope, files: list[FileStat], problems: list[tuple[str, str]],
                                 options: IndexOptions, summary: IndexSummary) -> None:
    """An indexed folder with no image left in it, or one that could not be listed, looks exactly
    like an unmounted drive: its items are kept (the folder leaves the run's scope) unless
    `options.allow_empty_root` says the files really were deleted. A folder that could not be
    read is never taken as empty: nothing under it is removed, flag or not.
    """
    unreadable = {path for path, reason in problems if reason.startswith(LIST_FAILED)}
    for folder in list(scope.folders):
        prefix = folder.rstrip(os.sep) + os.sep
        listed_nothing = not any(f.path.startswith(prefix) for f in files)
        blind_spots = [u for u in unreadable if u == folder or u.startswith(prefix)]
        for spot in blind_spots:
            if spot != folder:
                scope.unreadable.append(spot)
        if not listed_nothing and folder not in blind_spots:
            continue
        if folder not in blind_spots and options.allow_empty_root:
            continue
        held = store.count_under(folder)
        if held:
            scope.folders.remove(folder)
            why = "could not be read" if folder in blind_spots else "has no images now"
            summary.notes.append(f"{folder} {why}: its {held} stored items are kept (an unmounted drive looks "
                                 f"like this)" + ("" if folder in blind_spots else
                                                  "; if the files were deleted, rerun with --allow-empty-root"))


def _attributes_for(path: str, options: IndexOptions) -> dict[str, Any]:
    """What this run says about one file: subset, caption, metadata (absent keys = keep)."""
    wanted: dict[str, Any] = {}
    if options.subset is not None:
        wanted["subset"] = options.subset
    if options.metadata:
        wanted["metadata"] = typed_metadata(options.metadata)
    given = options.attributes.get(path)
    if given:
        for key in ("subset", "caption"):
            if key in given:
                wanted[key] = given[key]
        if "metadata" in given:
            wanted["metadata"] = {**typed_metadata(given.get("metadata")), **wanted.get("metadata", {})}
    return wanted


def _attribute_changes(record: Optional[ItemRecord], wanted: dict[str, Any]) -> dict[str, Any]:
    if record is None:
        return wanted
    changes = {}
    if "subset" in wanted and wanted["subset"] != record.subset:
        changes["subset"] = wanted["subset"]
    if "caption" in wanted and wanted["caption"] != record.caption:
        changes["caption"] = wanted["caption"]
    if "metadata" in wanted:
        merged = {**record.metadata, **wanted["metadata"]}
        if merged != record.metadata:
            changes["metadata"] = merged
    return changes


class _Pending:
    """Changes found while streaming files to the embedder; committed with the next batch."""

    def __init__(self) -> None:
        self.ops: list[Callable[[Transaction], None]] = []

    def __len__(self) -> int:
        return len(self.ops)

    def add(self, op: Callable[[Transaction], None]) -> None:
        self.ops.append(op)

    def apply(self, txn: Transaction) -> None:
        for op in self.ops:
            op(txn)
        self.ops.clear()


def _update(store: Store, embedder: "Embedder", files: list[FileStat], scope: Scope, options: IndexOptions,
            summary: IndexSummary) -> None:
    """The incremental core: stat -> hash only what changed -> reuse or embed -> commit per batch."""
    _IndexPass(store, embedder, files, scope, options, summary).run()


class _IndexPass:
    """One pass over `files` for one store; counts go to `summary` as they happen."""

    def __init__(self, store: Store, embedder: "Embedder", files: list[FileStat], scope: Scope,
                 options: IndexOptions, summary: IndexSummary):
        self.store, self.embedder, self.files, self.options, self.summary = store, embedder, files, options, summary
        self.scope = scope
        self.known = store.items_in(scope.folders, scope.files, everything=scope.everything)
        self.known_failures = store.failures_in(scope.folders, scope.files, everything=scope.everything)
        self.seen = {f.path for f in files}
        self.vanished = {p: r for p, r in self.known.items() if p not in self.seen}
        self.vanished_by_hash: dict[str, list[ItemRecord]] = defaultdict(list)
        for record in self.vanished.values():
            self.vanished_by_hash[record.hash].append(record)
        self.moved: set[str] = set()
        self.pending = _Pending()
        self.fed: dict[int, tuple[FileStat, str]] = {}  # position in the embedder's stream -> (file, hash)
        self.positions = itertools.count()

    def run(self) -> None:
        to_check = self._triage()
        bar = progress_bar(len(to_check), "indexing", enabled=self.options.show_progress, leave=False)
        try:
            for batch in self.embedder.iter_images(self._new_content(to_check, bar),
                                                   batch_size=self.options.batch_size):
                with self.store.transaction() as txn:
                    self.pending.apply(txn)
                    self._store_batch(txn, batch)
                bar.update(len(batch))
                if self.options.on_batch is not None:
                    self.options.on_batch(self.summary)
            if len(self.pending):
                with self.store.transaction() as txn:
                    self.pending.apply(txn)
        finally:
            bar.close()
        self._remove_vanished()

    def _triage(self) -> list[FileStat]:
        """Files whose size or mtime changed (or are new); the rest cost one stat each."""
        to_check: list[FileStat] = []
        relabel: list[tuple[int, dict[str, Any]]] = []
        damaged = 0
        for stat in self.files:
            record = self.known.get(stat.path)
            if record is not None and not self._intact(record):
                damaged += 1  # its stored vector is damaged: embedded again from the file
                to_check.append(stat)
                continue
            if record is not None and record.size == stat.size and record.mtime_ns == stat.mtime_ns:
                self.summary.unchanged += 1
                # photo metadata is read once: for items indexed before it was, read it now
                changes = _attribute_changes(record, self._wanted(stat.path, photo="taken" not in record.metadata))
                if changes:
                    relabel.append((record.id, changes))
                continue
            failure = self.known_failures.get(stat.path)
            if record is None and failure is not None and failure[:2] == (stat.size, stat.mtime_ns):
                self._fail(stat, f"{failure[2]} (unchanged since it failed; not retried)")
                continue
            to_check.append(stat)
        if relabel:
            with self.store.transaction() as txn:
                for item_id, changes in relabel:
                    txn.set_attributes(item_id, **changes)
        if damaged:
            self.summary.notes.append(f"{damaged} item(s) had a damaged vector in the database (a blob of the wrong "
                                      f"length): embedded again from their files")
        return to_check

    def _intact(self, record: ItemRecord) -> bool:
        return record.vector_bytes == self.store.vector_bytes

    def _wanted(self, path: str, photo: bool = True) -> dict[str, Any]:
        """This run's attributes for `path`, over its photo metadata (a --meta value wins)."""
        wanted = _attributes_for(path, self.options)
        if photo and self.options.photo_metadata:
            wanted["metadata"] = {**photo_metadata(path), **wanted.get("metadata", {})}
        return wanted

    def _new_content(self, to_check: list[FileStat], bar) -> Iterator[str]:
        """Hash each changed file; yield to the embedder only those whose content is not stored yet."""
        for stat in to_check:
            try:
                content = file_hash(stat.path)
            except OSError as exc:
                reason = f"cannot read: {exc.strerror or exc}"
                self.pending.add(lambda txn, s=stat, r=reason: txn.record_failure(s, r))
                self._fail(stat, reason)
                bar.update(1)
                continue
            if self._reuse(stat, content):
                bar.update(1)
                continue
            self.fed[next(self.positions)] = (stat, content)
            yield stat.path

    def _reuse(self, stat: FileStat, content: str) -> bool:
        """Same bytes as before (touched), as a vanished item (moved), or as any stored item (copied)."""
        record = self.known.get(stat.path)
        if record is not None and record.hash == content and self._intact(record):
            self.pending.add(lambda txn, i=record.id, s=stat: txn.touch(i, s))
            self.summary.unchanged += 1
            return True
        movable = self.vanished_by_hash.get(content)
        if record is None and movable:
            source = movable.pop()
            self.moved.add(source.path)
            changes = _attribute_changes(source, self._wanted(stat.path))

            def move(txn: Transaction, i: int = source.id, s: FileStat = stat, c: dict = changes) -> None:
                txn.move(i, s)
                if c:
                    txn.set_attributes(i, **c)

            self.pending.add(move)
            self.summary.reused += 1
            return True
        donor = self.store.vector_for_hash(content)
        if donor is not None:
            changes = _attribute_changes(record, self._wanted(stat.path))
            self.pending.add(lambda txn, s=stat, h=content, v=donor, c=changes: txn.put(s, h, v, **c))
            self.summary.reused += 1
            return True
        return False

    def _store_batch(self, txn: Transaction, batch) -> None:
        for i in range(len(batch)):
            stat, content = self.fed.pop(batch.offset + i)
            if i in batch.errors:
                txn.record_failure(stat, batch.errors[i])
                self._fail(stat, batch.errors[i])
                continue
            changes = _attribute_changes(self.known.get(stat.path), self._wanted(stat.path))
            _, existed = txn.put(stat, content, batch.vectors[i], **changes)
            if existed:
                self.summary.updated += 1
            else:
                self.summary.added += 1

    def _remove_vanished(self) -> None:
        faultpoint("index.removing-vanished")
        gone = [r for p, r in self.vanished.items() if p not in self.moved and not self.scope.hides(p)]
        stale_failures = [p for p in self.known_failures if p not in self.seen]
        for start in range(0, max(len(gone), len(stale_failures)), CHUNK_ROWS):
            with self.store.transaction() as txn:
                for record in gone[start:start + CHUNK_ROWS]:
                    txn.delete(record.id)
                for path in stale_failures[start:start + CHUNK_ROWS]:
                    txn.clear_failure(path)
        self.summary.removed += len(gone)
        if gone:
            shown = ", ".join(record.path for record in gone[:3]) + (", ..." if len(gone) > 3 else "")
            self.summary.notes.append(
                f"removed {len(gone)} item(s) whose files are gone from the indexed folders ({shown}); a file "
                f"moved to a folder outside them is found again by indexing that folder too")

    def _fail(self, stat: FileStat, reason: str) -> None:
        self.summary.failed += 1
        self.summary.failures.append((stat.path, reason))
