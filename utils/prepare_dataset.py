"""Turn an image dataset into a prompt-item dataset that `ClipAdapter.train` can fine-tune on.

Each image item becomes a prompt item (same name with `.json`, same folder) whose prompt is the
image (by its stream URL, so the images stay where they are) and whose caption is a `free-text`
annotation: the image's description, or else its directory name through a template
("a photo of a {}": /golden_retriever/x.jpg -> "a photo of a golden retriever"). The item's ML
subset (train/validation/test) is kept, and the directory name is recorded as
`metadata.user.label` for zero-shot accuracy.

Everything that decides what to write is pure and tested (`plan_prompt_item`,
`plan_prompt_items`); the platform calls are confined to `upload_prompt_item` and
`convert_dataset`, the only places that import dtlpy.

Usage (needs a Dataloop login):

    python utils/prepare_dataset.py --project "My project" --dataset "My images" \
        [--template "a photo of a {}"] [--name "My images prompt items"] [--val 0.2] [--seed 0]
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Optional

if __package__ in (None, ""):  # run as a script: make `adapters` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.clip.folders import DEFAULT_TEMPLATE, template_caption  # noqa: E402
from adapters.clip.items import (is_image_item, item_description, item_subset_tags, prompt_item_json,  # noqa: E402
                                 stream_url)
from adapters.clip.pairs import KNOWN_SUBSETS, DataProblem  # noqa: E402
from adapters.clip.errors import DataError  # noqa: E402
from adapters.clip.splits import split_by_image  # noqa: E402

log = logging.getLogger("prepare_dataset")


@dataclass(frozen=True)
class PromptItemPlan:
    """Everything needed to create one prompt item for one image item."""

    source_item_id: str
    name: str                      # '<image stem>.json'
    remote_path: str               # the image's folder, e.g. '/cats'
    prompt: dict[str, Any]         # the prompt item's JSON (image as the user prompt)
    caption: str                   # becomes the free-text annotation (assistant reply)
    caption_source: str            # 'description' | 'directory'
    subset: Optional[str] = None   # 'train' | 'validation' | 'test' | None
    metadata: dict[str, Any] = field(default_factory=dict)  # item metadata to upload with


def directory_name(item_json: dict) -> Optional[str]:
    """The last part of the item's folder ('/animals/cats' -> 'cats'); None at the root."""
    folder = item_json.get("dir") or str(PurePosixPath(str(item_json.get("filename") or "/")).parent)
    name = PurePosixPath(folder).name
    return name or None


def caption_for_item(item_json: dict, template: str = DEFAULT_TEMPLATE) -> tuple[Optional[str], str]:
    """(caption, where it came from): the description, else the directory name through `template`."""
    description = item_description(item_json)
    if description:
        return description, "description"
    folder = directory_name(item_json)
    if folder:
        return template_caption(folder, template), "directory"
    return None, ""


def item_subset(item_json: dict) -> Optional[str]:
    tags = [t for t in item_subset_tags(item_json) if t in KNOWN_SUBSETS]
    return tags[0] if len(tags) == 1 else None


def item_stream_url(item_json: dict) -> str:
    """The URL the prompt uses for this image item: the one dtlpy gave it, else built from its id."""
    return item_json.get("stream") or stream_url(item_json["id"])


def plan_prompt_item(item_json: dict, template: str = DEFAULT_TEMPLATE) -> PromptItemPlan:
    """The prompt item for one exported image item (`item.to_json()`); DataError when impossible."""
    where = f"item {item_json.get('id', '?')} ({item_json.get('filename') or item_json.get('name') or '?'})"
    if not item_json.get("id"):
        raise DataError(f"{where}: has no id")
    if not is_image_item(item_json):
        raise DataError(f"{where}: not an image item")
    caption, source = caption_for_item(item_json, template)
    if caption is None:
        raise DataError(f"{where}: no description and no directory name to caption it with")
    name = PurePosixPath(str(item_json.get("name") or item_json.get("filename"))).stem + ".json"
    folder = item_json.get("dir") or str(PurePosixPath(str(item_json.get("filename") or "/")).parent)
    subset = item_subset(item_json)
    label = directory_name(item_json)
    metadata: dict[str, Any] = {"user": {"label": label, "source_item_id": item_json["id"]} if label
                                else {"source_item_id": item_json["id"]}}
    if subset:
        metadata["system"] = {"tags": {name_: (True if name_ == subset else None) for name_ in KNOWN_SUBSETS}}
    return PromptItemPlan(source_item_id=item_json["id"], name=name, remote_path=folder or "/",
                          prompt=prompt_item_json(item_stream_url(item_json)), caption=caption,
                          caption_source=source, subset=subset, metadata=metadata)


def plan_prompt_items(item_jsons: Iterable[dict], template: str = DEFAULT_TEMPLATE
                      ) -> tuple[list[PromptItemPlan], list[DataProblem]]:
    """Plans for every image item; the rest reported. Two images that would give the same prompt
    item name (x.jpg and x.png in one folder) get the second named after its item id."""
    plans: list[PromptItemPlan] = []
    problems: list[DataProblem] = []
    taken: set[str] = set()
    for item_json in item_jsons:
        try:
            plan = plan_prompt_item(item_json, template)
        except DataError as exc:
            where, _, reason = str(exc).partition(": ")
            problems.append(DataProblem(where, reason))
            continue
        key = f"{plan.remote_path.rstrip('/')}/{plan.name}"
        if key in taken:
            plan = PromptItemPlan(**{**plan.__dict__, "name": f"{PurePosixPath(plan.name).stem}-{plan.source_item_id}.json"})
            key = f"{plan.remote_path.rstrip('/')}/{plan.name}"
        taken.add(key)
        plans.append(plan)
    return plans, problems


def assign_subsets(plans: list[PromptItemPlan], val: float, seed: int = 0) -> list[PromptItemPlan]:
    """Plans whose image had no ML subset get one: `val` of them validation, by image, stratified by
    folder (splits.py, as `prepare` does locally). Plans with a subset keep it; val=0 assigns none."""
    loose = [plan for plan in plans if plan.subset is None]
    if not loose or val <= 0:
        return plans
    assignment = split_by_image({plan.source_item_id: plan.remote_path for plan in loose}, val=val, seed=seed)
    return [plan if plan.subset is not None else _with_subset(plan, assignment[plan.source_item_id])
            for plan in plans]


def _with_subset(plan: PromptItemPlan, subset: str) -> PromptItemPlan:
    metadata = {**plan.metadata, "system": {"tags": {name: (True if name == subset else None) for name in KNOWN_SUBSETS}}}
    return PromptItemPlan(**{**plan.__dict__, "subset": subset, "metadata": metadata})


def summarize(plans: list[PromptItemPlan], problems: list[DataProblem]) -> str:
    """'train 9, validation 3; captions: 1 from descriptions, 11 from folder names; 1 skipped (not an image item)'."""
    subsets = Counter(plan.subset or "no subset" for plan in plans)
    order = [*KNOWN_SUBSETS, "no subset"]
    by_subset = ", ".join(f"{name} {subsets[name]}" for name in order if subsets[name]) or "none"
    sources = Counter(plan.caption_source for plan in plans)
    captions = ", ".join(f"{count} from {'descriptions' if source == 'description' else 'folder names'}"
                         for source, count in sorted(sources.items()))
    reasons = Counter(problem.reason.split(":")[0] for problem in problems)
    skipped = "; ".join(f"{count} {reason}" for reason, count in reasons.most_common())
    line = f"{by_subset}; captions: {captions or 'none'}; {len(problems)} skipped" + (f" ({skipped})" if skipped else "")
    if not (subsets["train"] and subsets["validation"]):
        line += ("\nwarning: training needs prompt items in both the train and validation subsets; "
                 "rerun with --val 0.2 to assign them to images that have none")
    return line


# ---- the platform part (dtlpy) -----------------------------------------------------------
def upload_prompt_item(dataset, plan: PromptItemPlan):
    """Create one prompt item with its caption annotation and subset; returns the new item."""
    import dtlpy as dl

    prompt_item = dl.PromptItem(name=plan.name)
    prompt_item.add(message={"role": "user", "content": [{"mimetype": dl.PromptType.IMAGE,
                                                          "value": plan.prompt["prompts"]["1"][0]["value"]}]})
    item = dataset.items.upload(prompt_item, remote_name=plan.name, remote_path=plan.remote_path, overwrite=True,
                                item_metadata={"user": plan.metadata.get("user", {})})
    # The assistant reply: a free-text annotation answering prompt "1" (what PromptItem.add stores for
    # an assistant message, uploaded through the public annotations API).
    caption = dl.Annotation.new(item=item, annotation_definition=dl.FreeText(text=plan.caption),
                                metadata={"system": {"promptId": "1"}})
    item.annotations.upload(annotations=[caption])
    if plan.subset:
        item.assign_subset(plan.subset)
    return item


def convert_dataset(dataset, *, template: str = DEFAULT_TEMPLATE, name: Optional[str] = None, workers: int = 8,
                    val: float = 0.0, seed: int = 0, on_plans=None):
    """Create `<dataset name> prompt items` next to `dataset` and fill it; returns (new dataset, problems).

    val > 0 gives images without an ML subset one (`assign_subsets`); `on_plans(plans)` sees what was made.
    """
    from concurrent.futures import ThreadPoolExecutor

    target = dataset.project.datasets.create(dataset_name=name or f"{dataset.name} prompt items")
    item_jsons = [item.to_json() for item in dataset.items.list().all()]
    plans, problems = plan_prompt_items(item_jsons, template)
    plans = assign_subsets(plans, val, seed)
    made = []
    with ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(upload_prompt_item, target, plan): plan for plan in plans}
        for future, plan in futures.items():
            try:
                future.result()
                made.append(plan)
            except Exception as exc:  # noqa: BLE001 - one failed upload must not stop the rest
                problems.append(DataProblem(f"item {plan.source_item_id}", f"upload failed: {exc}"))
    for problem in problems:
        log.warning("skipped %s", problem)
    if on_plans is not None:
        on_plans(made)
    return target, problems


PREREQUISITES = """\
needs:
  - dtlpy (pip install dtlpy) and a Dataloop login on this machine: run once
    python -c "import dtlpy as dl; dl.login()"   (a browser window), or dl.login_m2m(...) for a bot
  - an image dataset in the project; captions come from each item's description, else its folder name

makes:
  a new dataset (default '<dataset> prompt items') with one prompt item per image: the image as the
  prompt, its caption as a free-text answer, in the image's ML subset (train/validation/test). Images
  without a subset get one: --val of them validation, by image, stratified by folder. Fine-tuning
  needs both train and validation. The images are not copied (the prompts link to them).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python utils/prepare_dataset.py", description=__doc__.split("\n\n")[0],
                                     epilog=PREREQUISITES, formatter_class=_HelpFormatter)
    parser.add_argument("--project", required=True, help="Dataloop project name")
    parser.add_argument("--dataset", required=True, help="the image dataset's name")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE,
                        help="caption from the folder name when an image has no description; {} is the name")
    parser.add_argument("--name", help="name of the new prompt-item dataset (default: '<dataset> prompt items')")
    parser.add_argument("--val", type=float, default=0.2,
                        help="validation fraction for images without an ML subset (0: leave them without one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of that split")
    return parser


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Defaults shown (where there is one), and the prerequisites laid out as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is not None and action.default is not False and action.default != argparse.SUPPRESS \
                and not action.required:
            text += " (default: %(default)s)"
        return text


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if "{}" not in args.template:
        parser.error("--template needs '{}' where the directory name goes")
    if not 0.0 <= args.val < 1.0:
        parser.error("--val must be in [0, 1)")
    # dtlpy logs its cookie reads at DEBUG through the root logger: only this script's own logger prints
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        import dtlpy as dl
    except ImportError:
        print("error: dtlpy is not installed: pip install dtlpy (or pip install -e '.[platform]')", file=sys.stderr)
        return 1
    if dl.token_expired():  # never an interactive login from a script: it would wait for a browser
        print('error: not logged in to Dataloop (or the login expired): run python -c "import dtlpy as dl; '
              'dl.login()" once, then rerun', file=sys.stderr)
        return 1
    made: list[PromptItemPlan] = []
    try:
        dataset = dl.projects.get(project_name=args.project).datasets.get(dataset_name=args.dataset)
        target, problems = convert_dataset(dataset, template=args.template, name=args.name, val=args.val,
                                           seed=args.seed, on_plans=made.extend)
    except dl.exceptions.PlatformException as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    print(f"made {len(made)} prompt items in dataset {target.name!r} ({target.id}): {summarize(made, problems)}")
    return 0


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:500] or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
