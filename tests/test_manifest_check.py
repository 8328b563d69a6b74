"""scripts/check_manifest.py: dataloop.json passes it, and it catches what `dl.Dpk.from_json` lets
through. Each broken copy below is first shown to parse with dtlpy (so the gap is real), then to fail
the check with a message naming what is wrong."""
import copy
import importlib.util
import json
import sys
from pathlib import Path

import dtlpy as dl
import pytest

from adapters.clip_adapter import ClipAdapter

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = json.loads((ROOT / "dataloop.json").read_text())
_spec = importlib.util.spec_from_file_location("check_manifest", ROOT / "scripts" / "check_manifest.py")
check_manifest = sys.modules["check_manifest"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_manifest)
CLASSES = {"ClipAdapter": ClipAdapter}


def test_dataloop_json_has_no_problems():
    assert check_manifest.problems(MANIFEST, ROOT, CLASSES) == []


def _config(manifest, name):
    return next(c for c in manifest["components"]["computeConfigs"] if c["name"] == name)


def _function(manifest, name):
    return next(f for f in manifest["components"]["modules"][0]["functions"] if f["name"] == name)


BREAKAGES = {  # what is broken -> (how, a phrase the problem must contain)
    "unknown pod type": (lambda m: _config(m, "clip-cpu")["runtime"].update(podType="regular-xxl"),
                         "podType 'regular-xxl'"),
    "a function names a missing compute config": (
        lambda m: _function(m, "embed_dataset").update(computeConfig="clip-datasets"),
        "computeConfig 'clip-datasets' is not declared"),
    "the module names a missing compute config": (
        lambda m: m["components"]["modules"][0].update(computeConfig="cpu"), "computeConfig 'cpu' is not declared"),
    "a model names a missing module": (
        lambda m: m["components"]["models"][1].update(moduleName="clip-modul"), "moduleName 'clip-modul'"),
    "two models with one name": (
        lambda m: m["components"]["models"][1].update(name="openai-clip"), "model 'openai-clip' is declared twice"),
    "a function the class does not have": (
        lambda m: _function(m, "embed_items").update(name="embed_item"), "ClipAdapter has no such method"),
    "a port type dtlpy does not know": (
        lambda m: _function(m, "embed_items")["input"][0].update(type="Items"), "unknown type 'Items'"),
    "an entry point that is not there": (
        lambda m: m["components"]["modules"][0].update(entryPoint="model_adapters.py"), "is not a file"),
    "a class the entry point does not define": (
        lambda m: m["components"]["modules"][0].update(className="ClipAdaptor"), "defines no class 'ClipAdaptor'"),
    "an output type dtlpy does not know": (
        lambda m: m["components"]["models"][0].update(outputType="embeddings"), "outputType 'embeddings'"),
    "an unknown autoscaler": (lambda m: _config(m, "clip-train")["runtime"]["autoscaler"].update(type="kafka"),
                              "autoscaler type 'kafka'"),
    "a timeout that is not a number of seconds": (lambda m: _config(m, "clip-cpu").update(executionTimeout="10m"),
                                                  "executionTimeout '10m'"),
    "an unknown onReset": (lambda m: _config(m, "clip-cpu").update(onReset="retry"), "onReset 'retry'"),
    "a compute config nothing uses": (
        lambda m: m["components"]["computeConfigs"].append({**copy.deepcopy(_config(m, "clip-cpu")), "name": "spare"}),
        "'spare' is used by no module or function"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_what_dtlpy_lets_through_the_check_refuses(breakage):
    mutate, phrase = BREAKAGES[breakage]
    broken = copy.deepcopy(MANIFEST)
    mutate(broken)
    assert dl.Dpk.from_json(copy.deepcopy(broken), client_api=dl.client_api).name == MANIFEST["name"]  # dtlpy: fine
    found = check_manifest.problems(broken, ROOT, CLASSES)
    assert any(phrase in problem for problem in found), found


def test_the_command_line_exits_1_and_lists_problems(tmp_path, capsys):
    broken = copy.deepcopy(MANIFEST)
    _config(broken, "clip-cpu")["runtime"]["podType"] = "regular-xxl"
    (tmp_path / "dataloop.json").write_text(json.dumps(broken))
    assert check_manifest.main([str(tmp_path / "dataloop.json")]) == 1  # and the entry point is missing there
    out = capsys.readouterr().out
    assert "podType 'regular-xxl'" in out and "is not a file" in out
    assert check_manifest.main([str(ROOT / "dataloop.json")]) == 0
