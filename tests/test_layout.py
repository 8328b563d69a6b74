"""The library under adapters/clip runs without the platform: no module of it imports dtlpy."""
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_library_modules_never_import_dtlpy():
    import adapters.clip
    names = sorted(m.name for m in pkgutil.iter_modules(adapters.clip.__path__) if m.name != "__main__")
    assert {"models", "embed", "train", "store", "search", "data", "cli"} <= set(names)
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module('adapters.clip.' + name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'dtlpy'))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
