"""The local command line: `python -m adapters.clip COMMAND ...`.

Each command is a few lines over the library. Library errors (`ClipAdapterError`) and paths that
cannot be read or written (`OSError`) become one line on stderr and exit code 1; usage errors
exit 2 (argparse's convention).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional, Sequence

from .engines import ENGINES
from .errors import DISK_FULL_HINT, ClipAdapterError, WeightsUnavailableError, describe_os_error
from .image_files import walk_images
from .images import IMAGE_SUFFIXES
from .progress import elapsed, progress_bar, restart_clock, say

if TYPE_CHECKING:  # annotations only: search pulls in numpy and the store
    from .search import Hit

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Bad command-line usage: one line on stderr, exit code 2."""


# ---- shared helpers ----------------------------------------------------------------------
def expand_paths(paths: Iterable[str], suffixes: frozenset[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Files as given, folders walked recursively for image files (hidden ones too); sorted within each folder."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            walked = walk_images(path, hidden=True, suffixes=suffixes)
            found.extend(sorted(Path(p) for p in walked if os.path.isfile(p)))
        else:
            found.append(path)  # a missing file is reported per item, not fatal
    return found


def print_json(data: object) -> None:
    """Strict JSON on stdout: a NaN or infinite number is null, never the non-JSON literal NaN."""
    from .files import strict_json
    sys.stdout.write(strict_json(data, indent=2) + "\n")


def add_model_options(parser: argparse.ArgumentParser, default: str = "ViT-B/32") -> None:
    parser.add_argument("--model", default=default,
                        help=f"model name, 'ARCH:PRETRAINED' or checkpoint path (default {default})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps (default auto)")
    add_engine_option(parser)


def add_engine_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="inference engine: auto (measured on this CPU at first use, cached), torch, "
                             "onnxruntime[-int8], openvino[-bf16|-bf16-matmul] (default auto; GPUs use torch)")


# A model's first use on a CPU (ONNX export + `auto`'s timing) took 95 s for ViT-B/32 (151 M parameters) on
# this project's 2-core machine (`index --model ViT-B/32:random` on a fresh engine cache): ~0.6 s per M.
FIRST_USE_SECONDS_PER_MPARAM = 0.6


def load_for_inference(name: str, device: str, engine: str, towers: Optional[Sequence[str]] = None):
    """`load_model` + `attach_engine`, saying what happens when this is the model's slow first use here.

    With `towers` (embed, index: they need only the towers), the model comes from its exports alone
    when they and `auto`'s choice are cached, without importing torch (exported_model.py).
    The first line comes before torch is imported (that alone takes seconds on a busy machine).
    """
    missing = _is_path_name(name) and not Path(name).expanduser().exists()  # load_model says what is wrong
    first_use = engine != "torch" and device in ("auto", "cpu") and not missing and not _prepared_here(name, engine)
    if towers is not None and not first_use and not missing:
        from .exported_model import open_exported_model
        exported = open_exported_model(name, engine, device, towers=towers)
        if exported is not None:
            return exported
    if first_use:
        say(f"loading {name}; on its first use on this machine it is also exported to ONNX"
            + (" and the engines are timed" if engine == "auto" else "") + " once, to run faster from then on")
    from .models import load_model
    from .onnx_export import attach_engine

    clip = load_model(name, device=device)
    if first_use and clip.device.type == "cpu":
        params = sum(p.numel() for p in clip.model.parameters()) / 1e6
        seconds = 5 + FIRST_USE_SECONDS_PER_MPARAM * params
        say(f"{name} loaded ({params:.0f} M parameters); preparing it takes roughly "
            f"{_duration(seconds)} on a 2-core CPU (less on a faster one; `--engine torch` skips it)")
    return attach_engine(clip, engine, progress=say if first_use else None)


def _prepared_here(name: str, engine: str) -> bool:
    """Whether an export of `name` (and, for auto, a timing on this CPU) is cached: read without torch."""
    from .engines import AUTO, EXPORT_INFO, engine_roots, read_choice, read_export_info
    for root in engine_roots(name):
        for info_file in root.glob(f"*/{EXPORT_INFO}") if root.is_dir() else ():
            info = read_export_info(info_file.parent)
            if info and info.get("model") == name and (engine != AUTO or read_choice(info_file.parent)):
                return True
    return False


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{10 * round(seconds / 10) or 5:.0f} s"
    return f"{round(seconds / 60)} min"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (usage error, exit 2, otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_embedding_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per model call (default 64)")
    parser.add_argument("--workers", type=int, default=2, help="image decoding threads (default 2)")


# ---- models ------------------------------------------------------------------------------
def add_models(sub) -> None:
    p = sub.add_parser("models", help="list loadable models")
    p.add_argument("--all", action="store_true", help="also every open_clip ARCH:PRETRAINED pair")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    from .engines import cached_choices, describe_choice
    from .models import list_known_models
    rows = list_known_models(include_all=args.all)
    if args.json:
        print_json([row.__dict__ for row in rows])
        return EXIT_OK
    print(f"{'name':42} {'open_clip arch':26} {'dim':>5} {'size':>5}  weights")
    for row in rows:
        weights = "random (test model)" if row.name == "tiny" else "cached" if row.cached else "download"
        print(f"{row.name:42} {row.arch:26} {row.dim:5d} {row.image_size:5d}  {weights}")
    print("\nAlso: NAME:random for untrained weights (e.g. ViT-B/32:random: runs offline, the rankings mean "
          "nothing), ARCH:PRETRAINED (`models --all` lists them), or a checkpoint path.")
    choices = cached_choices()
    if choices:
        print("\nengine 'auto' chose, on this CPU (measured at first load, cached):")
        for choice in choices:
            print(f"  {choice['model']} [{choice['fingerprint'][:12]}]: {describe_choice(choice)}")
    return EXIT_OK


# ---- download ----------------------------------------------------------------------------
def add_download(sub) -> None:
    p = sub.add_parser("download", help="fetch pretrained weights into the cache (for images built offline)")
    p.add_argument("names", nargs="+", help="model names, e.g. ViT-B/32 or ViT-B-32:laion2b_s34b_b79k")
    p.set_defaults(handler=cmd_download)


def cmd_download(args: argparse.Namespace) -> int:
    from .models import fetch_pretrained, parse_model_spec
    for name in args.names:
        spec = parse_model_spec(name)
        if spec.kind != "pretrained":
            print(f"{name}: nothing to download ({spec.kind} weights)")
            continue
        path, _ = fetch_pretrained(spec.arch, spec.weights, name=name)
        print(f"{name}: {path}")
    return EXIT_OK


# ---- embed -------------------------------------------------------------------------------
def add_embed(sub) -> None:
    p = sub.add_parser("embed", help="embed images and texts into OUT.npy + OUT.jsonl",
                       description="Row i of OUT.npy is line i of OUT.jsonl. An input that failed keeps its row, "
                                   "filled with NaN; its line's 'error' says why (np.isnan(v).any(axis=1) "
                                   "finds them).")
    p.add_argument("paths", nargs="*", help="image files or folders (walked recursively)")
    p.add_argument("--text", action="append", default=[], help="a text to embed (repeatable)")
    p.add_argument("--out", default="embeddings", help="output prefix (default: embeddings)")
    add_model_options(p)
    add_embedding_options(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(handler=cmd_embed)


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from .embed import Embedder
    from .files import strict_json

    if not args.paths and not args.text:
        raise UsageError("nothing to embed: give image paths or folders, or --text")
    images = expand_paths(args.paths)
    towers = (["image"] if images else []) + (["text"] if args.text else [])
    clip = load_for_inference(args.model, args.device, args.engine, towers)
    embedder = Embedder(clip, batch_size=args.batch_size, num_workers=args.workers)
    rows, parts = [], []
    with progress_bar(len(images) + len(args.text), "embedding") as bar:
        for kind, ids, stream in (("image", images, embedder.iter_images(images)),
                                  ("text", args.text, embedder.iter_texts(args.text))):
            for batch in stream:
                parts.append(batch.vectors)
                for i in range(len(batch)):
                    rows.append({"index": len(rows), "kind": kind, "id": str(ids[batch.offset + i]),
                                 "error": batch.errors.get(i)})
                bar.update(len(batch))
    vectors = np.concatenate(parts) if parts else np.zeros((0, embedder.dim), np.float32)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out.with_suffix(".npy"), vectors)
    with open(out.with_suffix(".jsonl"), "w", encoding="utf-8") as fh:
        fh.writelines(strict_json(row) + "\n" for row in rows)
    failed = [r for r in rows if r["error"]]
    for row in failed:
        what = row["id"] if row["kind"] == "image" else f"--text {_shorten(row['id'])!r}"
        print(f"skipped {what}: {row['error']} (its row {row['index']} is NaN)", file=sys.stderr)
    summary = {"embedded": len(rows) - len(failed), "failed": len(failed), "dim": embedder.dim,
               "model": embedder.clip.name, "vectors": str(out.with_suffix(".npy")),
               "index": str(out.with_suffix(".jsonl"))}
    if args.json:
        print_json(summary)
    else:
        print(f"embedded {summary['embedded']} ({summary['failed']} failed) with {summary['model']} "
              f"-> {summary['vectors']} ({vectors.shape[0]}x{vectors.shape[1]}), {summary['index']}")
    return EXIT_OK


def _shorten(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


# ---- config ------------------------------------------------------------------------------
def add_config(sub) -> None:
    p = sub.add_parser("config", help="show the defaults, or validate a configuration")
    p.add_argument("file", nargs="?", help="a JSON configuration (a model's 'configuration' dict)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key; VALUE is parsed as JSON when it can be")
    p.add_argument("--explain", action="store_true", help="list every key with its description")
    p.set_defaults(handler=cmd_config)


def cmd_config(args: argparse.Namespace) -> int:
    from .config import ClipConfig
    config = config_from_args(args.file, args.set, {})
    if args.explain:
        for name, field in ClipConfig.model_fields.items():
            print(f"{name:22} {json.dumps(getattr(config, name)):28} {field.description or ''}")
    else:
        print_json(config.to_dict())
    return EXIT_OK


def config_from_args(path: Optional[str], assignments: Sequence[str], extra: dict):
    """A validated ClipConfig from a JSON file, then --set KEY=VALUE pairs, then `extra`."""
    from .config import ClipConfig
    raw: dict = _config_file(path) if path else {}
    raw.update(_parse_assignments(assignments, "--set"))
    raw.update(extra)
    return ClipConfig.from_dict(raw, warn=lambda msg: print(f"warning: {msg}", file=sys.stderr))


def _config_file(path: str) -> dict:
    """A JSON configuration: a model's 'configuration' dict, or the whole model JSON holding one."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    raw = raw.get("configuration", raw) if isinstance(raw, dict) else raw
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a JSON object")
    return raw


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


CORE_COMMANDS: list[Callable] = [add_models, add_download, add_embed, add_config]


# ---- store & search (index, search, classify) -------------------------------------------------
STORE_HELP = "store folder (default: $CLIP_ADAPTER_STORE, else ~/.cache/clip-adapter/store)"
MAX_LISTED_FAILURES = 20


def _add_store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", metavar="DIR", default=None, help=STORE_HELP)


def _store_root(args: argparse.Namespace) -> Path:
    from .store import default_store_dir
    return Path(args.store).expanduser() if args.store else default_store_dir()


def add_index(sub) -> None:
    p = sub.add_parser("index", help="add image files and folders to a local store; rerun: only what changed")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="image files or folders (walked recursively); none: rescan what the store was given")
    _add_store_option(p)
    p.add_argument("--model", default=None,
                   help="model name or checkpoint (default: the store's model; ViT-B/32 for a new store)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps (default auto)")
    add_engine_option(p)
    p.add_argument("--reindex", action="store_true",
                   help="re-embed every stored item with --model, beside the old vectors; swapped in when complete")
    p.add_argument("--subset", help="set this subset on the files indexed (e.g. train)")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                   help="metadata for the files indexed (repeatable; VALUE parsed as JSON when it can be)")
    p.add_argument("--manifest", help="JSONL/CSV manifest (image, caption, subset, metadata) whose attributes to store")
    add_embedding_options(p)
    p.add_argument("--ann", choices=("auto", "build", "off"), default="auto",
                   help="ANN index: auto (for stores of 100k+ items), build (now, any size), off")
    p.add_argument("--allow-empty-root", action="store_true",
                   help="a folder given that has no images left really lost them: remove its items (without this, "
                        "an empty folder removes nothing: it may be an unmounted drive)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=cmd_index)


def cmd_index(args: argparse.Namespace) -> int:
    from .indexing import IndexOptions, index, reindex
    from .config import DEFAULT_MODEL

    root = _store_root(args)
    paths = args.paths
    if not paths and not args.reindex:
        paths = _stored_roots(root)
        print(f"rescanning the store's folders: {', '.join(paths)}", file=sys.stderr)
    stored = None if args.model else _stored_model(root)
    model = args.model or stored or DEFAULT_MODEL
    options = IndexOptions(subset=args.subset, metadata=_parse_assignments(args.meta, "--meta"),
                           attributes=_manifest_attributes(args.manifest) if args.manifest else {},
                           batch_size=args.batch_size, ann=args.ann, allow_empty_root=args.allow_empty_root)
    with _store_model_moved(stored, root):
        clip = load_for_inference(model, args.device, args.engine, ["image"])
    from .embed import Embedder
    embedder = Embedder(clip, batch_size=args.batch_size, num_workers=args.workers)
    summary = (reindex if args.reindex else index)(root, embedder, paths, options)
    summary.seconds = elapsed()  # the whole command: loading (and a first use's export) included
    for path, reason in summary.failures[:MAX_LISTED_FAILURES]:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if len(summary.failures) > MAX_LISTED_FAILURES:
        print(f"... and {len(summary.failures) - MAX_LISTED_FAILURES} more skipped", file=sys.stderr)
    for note in summary.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        print_json(summary.to_dict())
    else:
        print(("re-indexed with " + summary.model + ": " if summary.reindexed else "") + summary.line())
        if summary.ann:
            print(summary.ann)
    return EXIT_OK


def _stored_roots(root: Path) -> list[str]:
    """What earlier `index` runs were given, for a bare `index` to rescan."""
    from .store import CURRENT, Store
    roots: list[str] = []
    if (root / CURRENT).is_file():
        with Store.open(root, readonly=True) as store:
            roots = store.roots()
    if not roots:
        raise UsageError(f"nothing to index: give image files or folders ({root} has none to rescan)")
    return roots


def _stored_model(root: Path) -> Optional[str]:
    from .store import CURRENT, DATA_PREFIX, Store
    if not (root / CURRENT).is_file() and not any(root.glob(DATA_PREFIX + "*")):
        return None  # a new store (one without CURRENT but with data is damaged: opening it says so)
    with Store.open(root, readonly=True) as store:
        return store.binding.name


@contextlib.contextmanager
def _store_model_moved(stored: Optional[str], root: Path):
    """A store names its model; a checkpoint that moved since cannot be found by that name: say what to pass."""
    from .errors import ModelLoadError
    try:
        yield
    except ModelLoadError as exc:
        if stored is None or Path(stored).expanduser().exists() or not _is_path_name(stored):
            raise
        raise ModelLoadError(f"the store's model {stored} is not there any more; if the checkpoint moved, "
                             f"pass --model NEWPATH (the same weights: another model is refused), or rebuild the "
                             f"store for another model with `index --reindex --store {root} --model MODEL`") from None


def _is_path_name(name: str) -> bool:
    """A checkpoint path rather than a model name ('runs/mine/best', not 'ViT-B/32')."""
    return name.startswith((".", "~", os.sep)) or ("/" in name or os.sep in name) and not name.startswith(("ViT-", "RN"))


def _parse_assignments(assignments: Sequence[str], option: str) -> dict:
    return dict(_parse_assignment(assignment, option) for assignment in assignments)


def _parse_assignment(assignment: str, option: str) -> tuple[str, object]:
    """KEY=VALUE -> (KEY, VALUE parsed as JSON when it can be)."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"{option} expects KEY=VALUE, got {assignment!r}")
    return key.strip(), _parse_value(value)


def _manifest_attributes(path: str) -> dict[str, dict]:
    """Manifest rows -> {absolute image path: subset, caption, metadata} (first caption of an image wins)."""
    from .manifests import read_manifest
    pairs = read_manifest(path)
    for problem in pairs.problems:
        print(f"manifest: skipped {problem.source}: {problem.reason}", file=sys.stderr)
    attributes: dict[str, dict] = {}
    for pair in pairs.pairs:
        metadata = dict(pair.metadata or {})
        if pair.label is not None:
            metadata.setdefault("label", pair.label)
        attributes.setdefault(str(pair.image), {"subset": pair.subset, "caption": pair.caption,
                                                "metadata": metadata})
    return attributes


def add_search(sub) -> None:
    p = sub.add_parser("search", help="search a store by text, image or both: \"dog + beach - people\"")
    p.add_argument("query", nargs="?", help="text; arithmetic \"dog + beach - people\", weights \"2:cat + dog\", "
                                            "image terms \"image:photo.jpg\" (or an existing image path; a path "
                                            "that names no file is an error)")
    p.add_argument("--text", action="store_true", dest="as_text",
                   help="read the query as text only, even where it looks like an image path")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="search by this image (repeatable)")
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    _add_store_option(p)
    p.add_argument("--model", default=None, help="default: the store's model (another model is an error)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps (default auto)")
    add_engine_option(p)
    p.add_argument("--subset", action="append", default=[], help="only items of this subset (repeatable)")
    p.add_argument("--where", action="append", default=[], metavar="COND",
                   help="metadata condition KEY=VALUE, KEY!=V, KEY>N, KEY<=N, KEY~GLOB (repeatable, all must hold); "
                        "globs ignore case (camera~canon*); on a date a year or year-month means that period "
                        "(taken>=2021, taken=2021-06)")
    p.add_argument("--glob", dest="path_glob", metavar="PATTERN",
                   help="only paths matching this glob ('*.png' matches names, '*/beach/*' whole paths)")
    p.add_argument("--min-score", type=float, help="only results with at least this cosine similarity")
    p.add_argument("--ann", choices=("auto", "on", "off"), default="auto",
                   help="approximate search: auto (large stores with an index), on, off (exact)")
    p.add_argument("--json", action="store_true", help='print [{"path", "score", ...}]')
    p.add_argument("--sheet", metavar="OUT.png", help="also draw the hits with their scores as a contact sheet "
                                                       "(.png, .jpg, .webp, ...: the type its extension names)")
    p.set_defaults(handler=cmd_search)


def cmd_search(args: argparse.Namespace) -> int:
    from .search import Filters, Searcher, Term, parse_query, query_vector
    from .store import Store, sqlite_errors

    if not args.query and not args.image:
        raise UsageError("nothing to search for: give a query text and/or --image PATH")
    if args.sheet:
        from .sheets import sheet_format
        sheet_format(args.sheet)  # a name that says no image type fails now, not after the search
    if args.k < 1:
        raise UsageError("-k must be >= 1")
    root = _store_root(args)
    logging.getLogger("adapters.clip.store").addFilter(_SaidBelow(f"store {root}:"))  # printed once, below
    with sqlite_errors(root), Store.open(root, readonly=True) as store:
        total = store.count()
        if not total:
            from .errors import StoreError
            raise StoreError(f"the store {root} holds no items yet: index a folder into it first "
                             f"(python -m adapters.clip index FOLDER --store {root})")
        terms = parse_query(args.query, images=not args.as_text) if args.query else []
        terms += [Term(1.0, "image", path) for path in args.image]
        embedder = _query_embedder(store, terms, args)
        _warn_truncated([term.value for term in terms if term.kind == "text"], embedder)
        query = query_vector(terms, embedder)
        filters = Filters(subsets=args.subset, where=args.where, path_glob=args.path_glob, min_score=args.min_score)
        result = Searcher(store, ann=args.ann).search(query, k=args.k, filters=filters)
        for warning in store.warnings + result.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    if args.sheet and result.hits:
        from .sheets import distinct_names, grid_sheet
        title = " + ".join(filter(None, [args.query] + [f"image:{p}" for p in args.image]))
        names = distinct_names([hit.path for hit in result.hits])
        grid_sheet([(hit.path, _hit_caption(hit, name)) for hit, name in zip(result.hits, names)], args.sheet,
                   title=title)
        print(f"contact sheet: {args.sheet}", file=sys.stderr)
    elif args.sheet:
        print(f"no hits: no contact sheet written to {args.sheet}", file=sys.stderr)
    if args.json:
        print_json([hit.to_dict() for hit in result.hits])
        return EXIT_OK
    if not result.hits:
        print(_no_results(result, total, args.min_score))
        return EXIT_OK
    print(f"{'rank':>4}  {'score':>6}  path")
    for hit in result.hits:
        extra = f"  [{hit.subset}]" if hit.subset else ""
        print(f"{hit.rank:4d}  {hit.score:6.3f}  {hit.path}{extra}")
    print(f"{len(result.hits)} results from {result.candidates} matching items ({result.method} search, "
          f"{result.seconds * 1000:.0f} ms)", file=sys.stderr)
    return EXIT_OK


class _SaidBelow(logging.Filter):
    """Drops the store's log records that the command prints itself (its `warnings`), so each shows once."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _no_results(result, total: int, min_score: Optional[float]) -> str:
    """Why a search found nothing: the filters, or the score bar (with the best score under it)."""
    if not result.candidates:
        return f"no results: none of the {total} items passed the filters"
    passed = f"{result.candidates} of {total} items passed the filters"
    if min_score is not None and result.best_score is not None:
        return f"no results: {passed}, but none scored >= {min_score:g} (the best scored {result.best_score:.3f})"
    return f"no results ({passed})"


def _warn_truncated(texts: Sequence[str], embedder) -> None:
    """CLIP reads a text's first context_length tokens (77 for OpenAI's models) and drops the rest: say so."""
    from .vector_query import exceeds_context
    context = getattr(embedder.clip.tokenizer, "context_length", "its")
    for text in texts:
        if exceeds_context(text, embedder):
            print(f"warning: the query text {_shorten(text)!r} is longer than the model's {context}-token context; "
                  f"it reads the start and ignores the rest", file=sys.stderr)


def _hit_caption(hit: "Hit", name: str) -> str:
    """Rank and score (and the date taken), the path that tells it apart, the camera."""
    taken = str(hit.metadata.get("taken", ""))[:10]
    first = f"{hit.rank}. {hit.score:.3f}" + (f"  {taken}" if taken else "")
    return "\n".join(filter(None, [first, name, str(hit.metadata.get("camera", ""))]))


def _query_embedder(store, terms: list, args: argparse.Namespace):
    """The store's exported text tower when it answers the query (no torch import: a cold search
    takes about a second), else the full model, checked against the store's."""
    from .embed import Embedder
    binding = store.binding
    text_only = all(term.kind == "text" for term in terms)
    if text_only and args.model in (None, binding.name) and args.device in ("auto", "cpu") and args.engine != "torch":
        from .engines import open_exported_text_model
        exported = open_exported_text_model(binding.name, binding.fingerprint, args.engine)
        if exported is not None:
            return Embedder(exported, num_workers=0)
    from .models import load_model
    from .store import ModelBinding
    with _store_model_moved(None if args.model else binding.name, Path(store.root)):
        clip = load_model(args.model or binding.name, device=args.device)
    store.check_model(ModelBinding.of(clip))
    return Embedder(clip, num_workers=0)


def add_classify(sub) -> None:
    p = sub.add_parser("classify", help="zero-shot: which of --labels each image shows")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    p.add_argument("--labels", required=True, help='comma-separated labels, e.g. "cat,dog,car"')
    p.add_argument("--template", action="append", default=[], metavar="TEXT",
                   help="prompt template with {} for the label (repeatable; default \"a photo of a {}.\")")
    p.add_argument("-k", "--top-k", type=int, default=1, help="labels per image (default 1)")
    add_model_options(p)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--json", action="store_true", help='print [{"path", "labels": [{"label", "score"}], "error"}]')
    p.add_argument("--sheet", metavar="OUT.png", help="also draw the images with their labels as a contact sheet")
    p.set_defaults(handler=cmd_classify)


def cmd_classify(args: argparse.Namespace) -> int:
    from .classify import DEFAULT_TEMPLATES, ZeroShotClassifier
    from .embed import Embedder

    if args.top_k < 1:
        raise UsageError("--top-k must be >= 1")
    if args.sheet:
        from .sheets import sheet_format
        sheet_format(args.sheet)
    images = expand_paths(args.images)
    if not images:
        raise UsageError("no images found in the given folders")
    embedder = Embedder(load_for_inference(args.model, args.device, args.engine), batch_size=args.batch_size)
    classifier = ZeroShotClassifier(embedder, args.labels, args.template or DEFAULT_TEMPLATES)
    results = classifier.classify(images, top_k=args.top_k)
    rows = [{"path": str(path), "labels": [{"label": s.label, "score": round(s.score, 6)} for s in r.labels],
             "error": r.error} for path, r in zip(images, results)]
    for row in rows:
        if row["error"]:
            print(f"skipped {row['path']}: {row['error']}", file=sys.stderr)
    if args.sheet:
        from .sheets import distinct_names, grid_sheet
        names = distinct_names([row["path"] for row in rows])
        tiles = [(row["path"], (", ".join(f"{s['label']} {s['score']:.2f}" for s in row["labels"]) or "unreadable")
                  + "\n" + name) for row, name in zip(rows, names)]
        grid_sheet(tiles, args.sheet, title="zero-shot: " + args.labels)
        print(f"contact sheet: {args.sheet}", file=sys.stderr)
    if args.json:
        print_json(rows)
        return EXIT_OK
    for row in rows:
        if not row["error"]:
            print(f"{row['path']}: " + ", ".join(f"{s['label']} ({s['score']:.2f})" for s in row["labels"]))
    return EXIT_OK


def add_check(sub) -> None:
    p = sub.add_parser("check", help="prove a store's vectors match its database; --repair fixes what it can")
    _add_store_option(p)
    p.add_argument("--repair", action="store_true",
                   help="rewrite what is derived (CURRENT, the matrix files, the ANN index) from the database")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    from .integrity import check_store
    report = check_store(_store_root(args), repair=args.repair)
    if args.json:
        print_json(report.to_dict())
    else:
        for problem in report.problems:
            print(f"problem: {problem}")
        for fixed in report.repaired:
            print(f"repaired: {fixed}")
        for note in report.notes:
            print(f"note: {note}")
        if not report.problems:
            print(f"ok: {report.store}, {report.items} items; the matrix matches the database")
        elif not report.unrepaired:
            print(f"repaired: {report.store} is consistent again")
        elif not args.repair:
            print(f"damaged: rerun with --repair (python -m adapters.clip check --store {report.store} --repair)")
    return EXIT_OK if not report.unrepaired else EXIT_ERROR


STORE_COMMANDS: list[Callable] = [add_index, add_search, add_classify, add_check]


# ---- data & evaluation (prepare, convert, eval) ----------------------------------------------
def add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="caption an image folder and split it into a manifest")
    p.add_argument("folder", help="a folder of images (class sub-folders, or train/ + validation/)")
    p.add_argument("--out", required=True, help="manifest to write (.jsonl, or .csv)")
    p.add_argument("--val", type=float, default=0.2, help="validation fraction, by image (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    p.add_argument("--captions", metavar="CSV", help="a CSV of captions: image,caption (several rows per image ok)")
    p.add_argument("--template", default="a photo of a {}",
                   help="caption from the directory name when an image has none (default 'a photo of a {}')")
    p.add_argument("--strict", action="store_true", help="fail on any image that cannot be captioned")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(handler=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> int:
    from .folders import prepare_folder
    if not 0.0 <= args.val < 1.0:
        raise UsageError("--val must be in [0, 1)")
    if "{}" not in args.template:
        raise UsageError("--template needs '{}' where the directory name goes")
    result = prepare_folder(args.folder, val=args.val, seed=args.seed, captions_csv=args.captions,
                            template=args.template)
    _warn_poor_captions(result.pairs, args.template)
    return _finish_manifest(result, args)


def _warn_poor_captions(pairs, template: str) -> None:
    """Folder names like '2015' or 'drawings' make captions that teach a model little: say so, and what helps."""
    from .folders import poor_caption_folders, template_caption
    poor = poor_caption_folders(pairs)
    if not poor:
        return
    shown = ", ".join(f"{template_caption(name, template)!r} ({count} image{'s' if count != 1 else ''})"
                      for name, count in sorted(poor.items(), key=lambda kv: -kv[1])[:5])
    more = f" and {len(poor) - 5} more folders" if len(poor) > 5 else ""
    print(f"warning: captions from folder names that say little about the images: {shown}{more}. Write "
          f"captions in sidecar <image>.txt files or a --captions CSV, or give a --template that fits the folders "
          f"(e.g. --template 'a photo taken in {{}}' for years)", file=sys.stderr)


def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="a Dataloop export folder (prepare_data layout) -> a manifest")
    p.add_argument("export_dir", help="folder with <subset>/json/ (+ items/ or images/), or datasets/<id>/...")
    p.add_argument("--out", required=True, help="manifest to write (.jsonl, or .csv)")
    p.add_argument("--strict", action="store_true", help="fail on any bad record")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(handler=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from .exports import read_export
    if not Path(args.export_dir).is_dir():
        raise UsageError(f"{args.export_dir}: not a folder")
    return _finish_manifest(read_export(args.export_dir), args)


def _finish_manifest(result, args: argparse.Namespace) -> int:
    """Report skipped records, honour --strict, write the manifest, print a summary."""
    from .manifests import write_manifest
    from .errors import DataError
    for problem in result.problems:
        print(f"skipped {problem}", file=sys.stderr)
    if args.strict:
        result.raise_if_problems()
    if not result.pairs:
        raise DataError("no caption pairs to write" + (f" ({len(result.problems)} records skipped)"
                                                         if result.problems else ""))
    write_manifest(result.pairs, args.out)
    summary = {"manifest": str(args.out), "subsets": result.counts(), "skipped": len(result.problems)}
    if args.json:
        print_json(summary)
    else:
        print(f"wrote {len(result.pairs)} pairs to {args.out} ({result.summary()})")
    return EXIT_OK


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="retrieval (and zero-shot) metrics of one or more models on a manifest")
    p.add_argument("--model", action="append", dest="models", metavar="MODEL",
                   help="model name, 'ARCH:PRETRAINED' or checkpoint (repeat to compare models)")
    p.add_argument("--data", required=True, help="a manifest (.jsonl/.csv) or a Dataloop export folder")
    p.add_argument("--subset", default="validation", help="subset to evaluate, or 'all' (default validation)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps (default auto)")
    add_engine_option(p)
    add_embedding_options(p)
    p.add_argument("--template", action="append", dest="templates", metavar="TEMPLATE",
                   help="zero-shot prompt template with '{}' (repeatable; default: the config's prompt_templates)")
    p.add_argument("--strict", action="store_true", help="fail on any bad data record")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(handler=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from .config import ClipConfig
    from .manifests import load_pairs
    from .evaluate import EvalData, evaluate_pairs

    if not args.models:
        raise UsageError("give at least one --model (repeat --model to compare models)")
    models = args.models
    templates = args.templates or ClipConfig().prompt_templates
    if any("{}" not in t for t in templates):
        raise UsageError("every --template needs '{}' where the label goes")
    loaded = load_pairs(args.data, strict=args.strict)
    pairs = loaded.pairs if args.subset == "all" else loaded.subset(args.subset)
    for problem in loaded.problems:
        print(f"skipped {problem}", file=sys.stderr)
    if not pairs:
        from .errors import DataError
        present = ", ".join(loaded.counts()) or "none"
        raise DataError(f"{args.data}: no pairs in subset {args.subset!r} (subsets present: {present})")
    data = EvalData.from_pairs(pairs)
    results: dict[str, dict] = {}
    for position, name in enumerate(models):
        failed: list = []
        clip = load_for_inference(name, args.device, args.engine)
        column = name if name not in results else f"{name} #{position + 1}"
        results[column] = evaluate_pairs(clip, data, batch_size=args.batch_size, templates=templates,
                                       num_workers=args.workers, on_problem=failed.append, show_progress=True)
        for problem in failed:
            print(f"{name}: excluded {problem}", file=sys.stderr)
        del clip
    if args.json:
        print_json({"data": str(args.data), "subset": args.subset, "models": results})
    else:
        print(f"{args.data} [{args.subset}]: {len(data.images)} images, {len(data.captions)} distinct captions, "
              f"{data.n_pairs} pairs")
        print(format_metrics_table(results))
    return EXIT_OK


METRIC_ROWS = (("t2i_r1", "text->image R@1"), ("t2i_r5", "text->image R@5"), ("t2i_r10", "text->image R@10"),
               ("i2t_r1", "image->text R@1"), ("i2t_r5", "image->text R@5"), ("i2t_r10", "image->text R@10"),
               ("mean_recall", "mean recall"), ("t2i_mean_rank", "text->image mean rank"),
               ("t2i_median_rank", "text->image median rank"), ("i2t_mean_rank", "image->text mean rank"),
               ("i2t_median_rank", "image->text median rank"), ("zero_shot_accuracy", "zero-shot accuracy"),
               ("images", "images scored"), ("failed_images", "images failed"))


def format_metrics_table(results: dict[str, dict]) -> str:
    """Metrics as rows, models as columns; recalls and accuracy in percent."""
    names = list(results)
    width = max([12] + [len(n) for n in names])
    lines = [f"{'metric':26}" + "".join(f" {n:>{width}}" for n in names)]
    for key, title in METRIC_ROWS:
        if not any(key in r for r in results.values()):
            continue
        cells = []
        for name in names:
            value = results[name].get(key)
            if value is None:
                cells.append("-")
            elif "rank" in key:
                cells.append(f"{value:.1f}")
            elif key in ("images", "failed_images"):
                cells.append(f"{int(value)}")
            else:
                cells.append(f"{100 * value:.1f}%")
        lines.append(f"{title:26}" + "".join(f" {c:>{width}}" for c in cells))
    return "\n".join(lines)


DATA_COMMANDS: list[Callable] = [add_prepare, add_convert, add_eval]


# ---- training --------------------------------------------------------------------------------
def add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model on caption pairs (manifest or Dataloop export)")
    p.add_argument("--data", help="a manifest (.jsonl/.csv) or a Dataloop export folder with 'train' and "
                                  "'validation' subsets (with --resume: only if the run's data moved)")
    p.add_argument("--out", required=True, help="run directory: best/, last/, metrics.jsonl, curves.png, report.md")
    p.add_argument("--model", help="starting model (sets model_name): a name, 'ARCH:PRETRAINED' or a checkpoint")
    p.add_argument("--config", metavar="JSON", help="a configuration file (a model's 'configuration' dict)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a configuration key; VALUE is parsed as JSON when it can be (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last epoch, with its model and settings")
    p.add_argument("--strict", action="store_true", help="fail on any bad data record")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from .manifests import load_pairs
    from .reports import REPORT_MD, headline
    from .files import recover_directory
    from .runs import LAST, read_saved_run
    from .train import fit

    out = Path(args.out)
    for done in recover_directory(out / LAST):  # a save killed midway: finish it before reading the run
        print(done, file=sys.stderr)
    saved = read_saved_run(out)
    if saved is not None and not args.resume:
        raise UsageError(f"{out} already holds a training run; pass --resume to continue it, or choose another --out")
    if args.resume:
        if saved is None:
            raise UsageError(f"nothing to resume: {out} holds no training run (drop --resume to start one)")
        config, data = _resume_settings(saved, args)  # fit() says what it resumes, once it has read the checkpoint
    else:
        if not args.data:
            raise UsageError("--data is required (a manifest or a Dataloop export folder)")
        config = config_from_args(args.config, args.set, {"model_name": args.model} if args.model else {})
        data = args.data
    pairs = load_pairs(data, strict=args.strict)
    for problem in pairs.problems:
        print(f"skipped {problem}", file=sys.stderr)
    print(f"data: {pairs.summary()}", file=sys.stderr)
    result = fit(config, pairs, out, resume=args.resume, data_source=str(Path(data).resolve()))
    if args.json:
        print_json(result.report)
    else:
        print(headline(result.report))
        print(f"model:   {result.model_dir}")
        print(f"report:  {out / REPORT_MD}")
        print(f"curves:  {out / 'curves.png'}, metrics: {out / 'metrics.jsonl'}")
    return EXIT_OK


def _resume_settings(saved, args: argparse.Namespace):
    """The run's configuration with what this command line may still change, and its data."""
    from .config import ClipConfig
    from .runs import resumed_config

    overrides = [(f"--config {args.config} ({key})", key, value)
                 for key, value in _config_file(args.config).items()] if args.config else []
    overrides += [(f"--set {assignment}", *_parse_assignment(assignment, "--set")) for assignment in args.set]
    if args.model:
        overrides.append((f"--model {args.model}", "model_name", args.model))
    config = ClipConfig.from_dict(resumed_config(saved, overrides))
    data = args.data or saved.data
    if not data:
        raise UsageError(f"{saved.run_dir} does not record its data (an older run): pass --data")
    if not Path(data).exists():
        raise UsageError(f"the run's data {data} is not there any more; pass --data with where it is now")
    return config, data


TRAIN_COMMANDS: list[Callable] = [add_train]


# ---- curation (duplicates, sample) ------------------------------------------------------------
def _add_selection_options(parser: argparse.ArgumentParser) -> None:
    _add_store_option(parser)
    parser.add_argument("--subset", action="append", default=[], help="only items of this subset (repeatable)")
    parser.add_argument("--where", action="append", default=[], metavar="COND",
                        help="metadata condition KEY=VALUE, KEY!=V, KEY>N, KEY<=N, KEY~GLOB (repeatable, all must hold)")
    parser.add_argument("--glob", dest="path_glob", metavar="PATTERN", help="only paths matching this glob")


def add_duplicates(sub) -> None:
    from .duplicates import DEFAULT_THRESHOLD
    p = sub.add_parser("duplicates", help="groups of near-duplicate images in a store (cosine >= threshold)",
                       description="Groups are the connected components of 'cosine >= threshold' among the stored "
                                   "items; each group's kept item (the earliest file modification time, then the "
                                   "smallest store id) comes first. Nothing is changed or deleted.")
    _add_selection_options(p)
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"cosine similarity in (0, 1] from which two items are near-duplicates "
                        f"(default {DEFAULT_THRESHOLD}; docs/curation.md)")
    p.add_argument("--json", action="store_true",
                   help='print {"groups": [[kept, other, ...], ...], "missing": [...], "threshold": t}')
    p.add_argument("--sheet", metavar="OUT.png", help="also draw the groups, one row each, as a contact sheet")
    p.set_defaults(handler=cmd_duplicates)


def cmd_duplicates(args: argparse.Namespace) -> int:
    from .curation import Selection, duplicates_sheet, store_duplicates
    from .duplicates import check_threshold
    from .store import Store, sqlite_errors

    check_threshold(args.threshold)  # before the store is read: a typo fails at once
    root = _store_root(args)
    with sqlite_errors(root), Store.open(root, readonly=True) as store:
        selection = Selection.of(store, args.subset, args.where, args.path_glob)
        report = store_duplicates(store, args.threshold, selection, progress=True)
        for warning in store.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    if args.sheet and report.groups:
        duplicates_sheet(report, args.sheet)
        print(f"contact sheet: {args.sheet}", file=sys.stderr)
    elif args.sheet:
        print(f"no near-duplicates: no contact sheet written to {args.sheet}", file=sys.stderr)
    if args.json:
        print_json(report.to_json())
        return EXIT_OK
    for number, group in enumerate(report.groups, 1):
        print(f"group {number} ({len(group)} items)")
        for index, member in enumerate(group):
            label = "kept " if index == 0 else f"{member['cosine']:.3f}"
            print(f"  {label}  {member['path']}")
    for path in report.missing:
        print(f"no vector: {path}", file=sys.stderr)
    print(f"{len(report.groups)} groups, {sum(len(g) for g in report.groups)} items, among {report.items} items "
          f"(cosine >= {report.threshold}; {report.method}, {report.seconds:.1f} s)", file=sys.stderr)
    return EXIT_OK


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="a diverse sample of a store's items (greedy k-center), e.g. to label first",
                       description="Each pick is the item farthest from every earlier pick (and from --exclude-* "
                                   "items): the sample covers the whole store, small clusters included. The same "
                                   "store and options give the same sample.")
    _add_selection_options(p)
    p.add_argument("-n", type=positive_int, required=True, help="number of items to pick")
    p.add_argument("--exclude-subset", action="append", default=[], metavar="SUBSET",
                   help="items of this subset are already labelled or chosen: keep away from them (repeatable)")
    p.add_argument("--exclude-where", action="append", default=[], metavar="COND",
                   help="items matching this condition are already chosen: keep away from them (repeatable)")
    p.add_argument("--json", action="store_true", help='print {"items": [paths in pick order], "radius": r}')
    p.add_argument("--sheet", metavar="OUT.png", help="also draw the picks, in order, as a contact sheet")
    p.set_defaults(handler=cmd_sample)


def cmd_sample(args: argparse.Namespace) -> int:
    from .curation import Selection, sample_sheet, store_sample
    from .store import Store, sqlite_errors

    root = _store_root(args)
    with sqlite_errors(root), Store.open(root, readonly=True) as store:
        selection = Selection.of(store, args.subset, args.where, args.path_glob)
        exclude = (Selection.of(store, args.exclude_subset, args.exclude_where)
                   if args.exclude_subset or args.exclude_where else None)
        report = store_sample(store, args.n, selection, exclude=exclude, progress=True)
        for warning in store.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    if args.sheet:
        sample_sheet(report, args.sheet)
        print(f"contact sheet: {args.sheet}", file=sys.stderr)
    if args.json:
        print_json(report.to_json())
        return EXIT_OK
    for number, pick in enumerate(report.picks, 1):
        print(f"{number:4d}  {pick['path']}")
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{len(report.picks)} of {report.items} items; every item is within cosine distance {report.radius:.3f} "
          f"of a pick ({report.seconds:.1f} s)", file=sys.stderr)
    return EXIT_OK


CURATE_COMMANDS: list[Callable] = [add_duplicates, add_sample]


REGISTRARS: list[Callable] = CORE_COMMANDS + STORE_COMMANDS + DATA_COMMANDS + TRAIN_COMMANDS + CURATE_COMMANDS


# ---- entry point -------------------------------------------------------------------------
def _program_name() -> str:
    """'clip-adapter' when run as the installed command, else 'python -m adapters.clip'."""
    return "clip-adapter" if os.path.basename(sys.argv[0] or "") == "clip-adapter" else "python -m adapters.clip"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_program_name(),
                                     description="CLIP embeddings, search and fine-tuning, locally.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    restart_clock()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the command's own usage, not the top level's, and the option probably meant
        command_parser = _command_parsers(parser)[args.command]
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}{_option_hint(unknown, command_parser)}")
    return run_command(lambda: args.handler(args), f"{parser.prog} {args.command}", verbose=args.verbose,
                       interrupted=INTERRUPTED.get(args.command, "").format(**vars(args)))


def _command_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _option_hint(unknown: Sequence[str], parser: argparse.ArgumentParser) -> str:
    """'; did you mean -k?' for `-K 5`: the same letters in another case first, then close spellings."""
    import difflib
    options = [o for action in parser._actions for o in action.option_strings]
    for word in unknown:
        if not word.startswith("-"):
            continue
        name = word.split("=", 1)[0]
        same = [o for o in options if o.lower() == name.lower()]
        close = same or difflib.get_close_matches(name, options, n=1, cutoff=0.6)
        if close:
            return f" (did you mean {close[0]}?)"
    return ""


# What a Ctrl-C leaves behind, and how to carry on, per command.
INTERRUPTED = {
    "index": "the batches committed so far are kept (`check` proves it); rerun the same command to carry on "
             "from there (a model's ONNX export or timing that was cut short starts again)",
    "train": "the epochs finished so far are kept in the run folder; continue with `train --out {out} --resume`",
    "embed": "nothing was written (the outputs are written at the end); rerun the command",
    "prepare": "no manifest was written; rerun the command",
    "convert": "no manifest was written; rerun the command",
    "download": "a partial download is not used; rerun the command to fetch the weights again",
}


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {super().format(record)}"


def run_command(command: Callable[[], int], prog: str, *, verbose: bool = False, interrupted: str = "") -> int:
    """Run one command as the edge of the library: logging set up, errors made one line.

    Also the edge of app-level commands (the demo, `python -m adapters.demo`), so they read the same.
    """
    handler = logging.StreamHandler()
    # a user reads "warning: ...", as the command's own lines say it; -v adds the logger's name
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s") if verbose else _PlainFormatter())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, handlers=[handler])
    try:
        with sigterm_as_interrupt():
            code = command()
        sys.stdout.flush()  # here, not at exit: a reader gone (`| head`) is then handled below
        return code
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except WeightsUnavailableError as exc:
        print(f"error: {exc.told_as('use `--model PATH`, PATH being')}", file=sys.stderr)
        return EXIT_ERROR
    except ClipAdapterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # `search --json | head`: the reader left; there is no one to tell, and Python must not try again at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except OSError as exc:
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except sqlite3.Error as exc:
        print(f"error: store database: {exc}" + (f"; {DISK_FULL_HINT}" if "full" in str(exc) else ""),
              file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as exc:
        how = "stopped by SIGTERM" if isinstance(exc, Terminated) else "interrupted"
        print(f"{how} after {elapsed():.1f} s" + (f": {interrupted}" if interrupted else ""), file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(exc, Terminated) else 130


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill PID`, a shutdown), handled as Ctrl-C is: what was kept is said, and how to carry on."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM raises `Terminated` in it instead of ending the process on the spot
    (Python's default): the command's own cleanup runs, as for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum, frame) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
