"""Check dataloop.json for what `dl.Dpk.from_json` lets through and the platform would refuse or run wrong.

    python scripts/check_manifest.py [dataloop.json]     # lists the problems; exit 1 if any

`dl.Dpk.from_json` parses any JSON into a DPK without looking at it (an unknown pod type, a function
naming a compute config that does not exist, a model of a module that does not exist all pass).
These rules read the values dtlpy itself knows, from the dtlpy it runs on:

- compute configs: unique names; `podType` one of dtlpy's `InstanceCatalog`; autoscaler `type` one of
  `KubernetesAutoscalerType`; `onReset` one of `OnResetAction`; positive `concurrency`,
  `executionTimeout`; a non-negative `drainTime`; a `runnerImage`; each one used by something;
- modules: unique names; a `computeConfig` that exists; an `entryPoint` file in the repository that
  defines `className`; functions with unique names, each a method of that class (when the caller
  passes the class: tests/test_manifest_check.py imports it; the command line does not), its own
  `computeConfig` (if any) existing, input and output types dtlpy's `PackageInputType` knows;
- models: unique names; a `moduleName` that exists; an `outputType` dtlpy's `AnnotationType` knows,
  or `embedding` (what the earlier CLIP app and clip-smart-search declare); a `configuration` object.
"""
from __future__ import annotations

import ast
import json
import sys
from pathlib import Path
from typing import Any, Iterable

import dtlpy as dl
from dtlpy.entities.service import OnResetAction

ROOT = Path(__file__).resolve().parents[1]
EMBEDDING_OUTPUT = "embedding"


def _values(enum: Iterable) -> set[str]:
    return {member.value for member in enum}


def _duplicates(names: list[str]) -> set[str]:
    return {name for name in names if names.count(name) > 1}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def compute_config_problems(configs: list[dict]) -> list[str]:
    problems = [f"compute config {name!r} is declared twice" for name in
                sorted(_duplicates([c.get("name") for c in configs]))]
    pod_types, autoscalers = _values(dl.InstanceCatalog), _values(dl.KubernetesAutoscalerType)
    for config in configs:
        where, runtime = f"compute config {config.get('name')!r}", config.get("runtime") or {}
        if runtime.get("podType") not in pod_types:
            problems.append(f"{where}: podType {runtime.get('podType')!r} is not one of {sorted(pod_types)}")
        autoscaler = runtime.get("autoscaler")
        if autoscaler is not None and autoscaler.get("type") not in autoscalers:
            problems.append(f"{where}: autoscaler type {autoscaler.get('type')!r} is not one of {sorted(autoscalers)}")
        if not _positive_int(runtime.get("concurrency", 1)):
            problems.append(f"{where}: concurrency {runtime.get('concurrency')!r} is not a positive integer")
        if not runtime.get("runnerImage"):
            problems.append(f"{where}: no runnerImage")
        if "executionTimeout" in config and not _positive_int(config["executionTimeout"]):
            problems.append(f"{where}: executionTimeout {config['executionTimeout']!r} is not a positive integer")
        drain = config.get("drainTime", 0)
        if not (isinstance(drain, int) and not isinstance(drain, bool) and drain >= 0):
            problems.append(f"{where}: drainTime {drain!r} is not a non-negative integer")
        if "onReset" in config and config["onReset"] not in _values(OnResetAction):
            problems.append(f"{where}: onReset {config['onReset']!r} is not one of {sorted(_values(OnResetAction))}")
    return problems


def _defined_classes(path: Path) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(node, ast.ClassDef)}


def module_problems(modules: list[dict], config_names: set[str], root: Path, classes: dict) -> list[str]:
    """`classes`: className -> the class itself, when the caller imported it (its methods are checked)."""
    problems = [f"module {name!r} is declared twice" for name in sorted(_duplicates([m.get("name") for m in modules]))]
    types = _values(dl.PackageInputType)
    for module in modules:
        where = f"module {module.get('name')!r}"
        if module.get("computeConfig") not in config_names:
            problems.append(f"{where}: computeConfig {module.get('computeConfig')!r} is not declared")
        entry = root / str(module.get("entryPoint", ""))
        if not entry.is_file():
            problems.append(f"{where}: entryPoint {module.get('entryPoint')!r} is not a file in the repository")
        elif module.get("className") not in _defined_classes(entry):
            problems.append(f"{where}: {module.get('entryPoint')} defines no class {module.get('className')!r}")
        for port in module.get("initInputs", []):
            if port.get("type") not in types:
                problems.append(f"{where}: init input {port.get('name')!r} has unknown type {port.get('type')!r}")
        functions = module.get("functions", [])
        problems += [f"{where}: function {name!r} is declared twice"
                     for name in sorted(_duplicates([f.get("name") for f in functions]))]
        cls = classes.get(module.get("className"))
        for function in functions:
            at = f"{where} function {function.get('name')!r}"
            if cls is not None and not callable(getattr(cls, str(function.get("name")), None)):
                problems.append(f"{at}: {module.get('className')} has no such method")
            if "computeConfig" in function and function["computeConfig"] not in config_names:
                problems.append(f"{at}: computeConfig {function['computeConfig']!r} is not declared")
            for port in function.get("input", []) + function.get("output", []):
                if port.get("type") not in types:
                    problems.append(f"{at}: port {port.get('name')!r} has unknown type {port.get('type')!r}")
    return problems


def model_problems(models: list[dict], module_names: set[str]) -> list[str]:
    problems = [f"model {name!r} is declared twice" for name in sorted(_duplicates([m.get("name") for m in models]))]
    outputs = _values(dl.AnnotationType) | {EMBEDDING_OUTPUT}
    for model in models:
        where = f"model {model.get('name')!r}"
        if model.get("moduleName") not in module_names:
            problems.append(f"{where}: moduleName {model.get('moduleName')!r} is not a declared module")
        if model.get("outputType") not in outputs:
            problems.append(f"{where}: outputType {model.get('outputType')!r} is not one of {sorted(outputs)}")
        if not isinstance(model.get("configuration", {}), dict):
            problems.append(f"{where}: configuration is not an object")
    return problems


def problems(manifest: dict, root: Path = ROOT, classes: dict | None = None) -> list[str]:
    """Every problem found in `manifest` (a parsed dataloop.json); empty when there is none."""
    components = manifest.get("components", {})
    configs, modules = components.get("computeConfigs", []), components.get("modules", [])
    config_names = {c.get("name") for c in configs}
    found = compute_config_problems(configs)
    found += module_problems(modules, config_names, root, classes or {})
    found += model_problems(components.get("models", []), {m.get("name") for m in modules})
    used = {m.get("computeConfig") for m in modules} | {f["computeConfig"] for m in modules
                                                        for f in m.get("functions", []) if "computeConfig" in f}
    found += [f"compute config {name!r} is used by no module or function" for name in sorted(config_names - used)]
    return found


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else ROOT / "dataloop.json"
    found = problems(json.loads(path.read_text()), root=path.resolve().parent)
    for problem in found:
        print(f"{path.name}: {problem}")
    if not found:
        print(f"{path.name}: no problems")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
