"""Issue 8, problem 5: a few hundred bytes of PNG must not cost gigabytes.

An 8000x1 PNG (104 bytes) passed the pixel guard and took 2.4 GB and 7.6 s in 224-pixel
preprocessing (short side to 224: a 1,792,000x224 intermediate). The aspect ratio is now checked
from the header, before anything is decoded or resized; the child process below measures it.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from adapters.clip.errors import InputError
from adapters.clip.images import MAX_ASPECT_RATIO, load_image
from conftest import ROOT


@pytest.mark.parametrize("size", [(8000, 1), (1, 80000), (MAX_ASPECT_RATIO * 10 + 10, 10)])
def test_extreme_aspect_ratios_are_refused_with_one_line(tmp_path, size):
    path = tmp_path / "strip.png"
    Image.new("L", size, 128).save(path, optimize=True)
    with pytest.raises(InputError, match=r"aspect ratio over 50:1") as caught:
        load_image(path)
    assert "\n" not in str(caught.value)


def test_a_wide_panorama_still_loads(tmp_path):
    path = tmp_path / "pano.png"
    Image.new("RGB", (2000, 200), (10, 20, 30)).save(path)
    assert load_image(path).size == (2000, 200)


def test_embedding_a_tiny_strip_file_costs_no_memory_and_reports_it(tmp_path):
    """In a child process: peak memory grows by less than 150 MB (it was 2.4 GB) and the item fails alone."""
    strip, good = tmp_path / "strip.png", tmp_path / "good.png"
    Image.new("L", (8000, 1), 0).save(strip)
    Image.new("RGB", (64, 64), (200, 0, 0)).save(good)
    assert strip.stat().st_size < 300
    child = textwrap.dedent(f"""
        import json, resource, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from adapters.clip.embed import Embedder
        from adapters.clip.models import load_model
        embedder = Embedder(load_model("tiny", device="cpu"), num_workers=0)
        embedder.embed_images([{str(good)!r}])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        result = embedder.embed_images([{str(strip)!r}, {str(good)!r}])
        print(json.dumps({{"grew_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before,
                          "seconds": time.perf_counter() - started, "errors": result.errors}}))
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["grew_kb"] < 150_000 and report["seconds"] < 5
    assert list(report["errors"]) == ["0"] and "aspect ratio" in report["errors"]["0"]
