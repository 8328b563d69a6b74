"""The earlier CLIP app's own unit tests, ported to run offline against this app, importing it the
way they do (`from model_adapter import ClipAdapter`); and the earlier repository's `.dataloop.cfg`.

Sources (dataloop-ai-apps/clip-model-adapter, read through the search tool):
- tests/unittest/clip-model-pretrained/test_embed.py (commit 0c346218): MockItem, image/text/unsupported;
- tests/unittest/clip-model-pretrained/test_batching.py (commit 5842c0ef): single, mixed, duplicate,
  large, ordered, empty and single-type batches, dimensions per batch size;
- tests/unittest/clip-model-pretrained/test_devices.py (commit b266c5ab): CPU, and CUDA when present.

What changed in the port, and why: the originals fetch a model and two items from a Dataloop
project (`dl.models.get`, `dl.items.get`) and download OpenAI's ViT-B/32. Here the model is on the
fake platform (tests/fake_dataloop, dtlpy unmodified above it) with the `tiny` architecture and
seeded random weights, and the items are real `dl.Item`s (`dl.Item.from_json`) whose binaries
download from file:// URLs; test_embed's MockItem is kept as written. The dimension the originals
check (512, ViT-B/32's) is the loaded model's (`tiny`: 64); that `openai-clip` gives 512 is checked
against open_clip's ViT-B/32 in tests/test_dataloop_json.py. `adapter.load('./')` loads from an
empty folder.
"""
import json
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import pattern_image
from dataloop_fakes import file_item, platform_model
from model_adapter import ClipAdapter

ROOT = Path(__file__).resolve().parents[1]
TINY_DIM = 64


# ---- the earlier repository's layout ---------------------------------------------------------
def test_dataloop_cfg_lists_the_manifest_as_dataloops_publish_helpers_read_it():
    """Dataloop's e2e publish helpers (dataloop-ai-apps, `publish_dpk_and_install_app`) read
    `.dataloop.cfg` as JSON, open each path in `manifests` and pick the one whose `name` is the dpk."""
    config = json.loads((ROOT / ".dataloop.cfg").read_text())
    assert config == {"manifests": ["dataloop.json"]}
    names = [json.loads((ROOT / path).read_text())["name"] for path in config["manifests"]]
    assert names == ["clip-model-pretrained"]


def test_model_adapter_reexports_the_adapter():
    from adapters.clip_adapter import ClipAdapter as adapter_class
    assert ClipAdapter is adapter_class


# ---- test_embed.py ------------------------------------------------------------------------------
class MockItem:
    """As in the earlier test_embed.py: `download()` gives an array for images, a BytesIO for text,
    a float for anything else."""

    def __init__(self, mimetype, item_type='file'):
        self.mimetype = mimetype
        self.type = item_type
        self.name = f'Mock item {self.mimetype}'
        self.id = 1

    def download(self, save_locally=False, to_array=True):
        if self.mimetype == 'image/jpeg':
            item_obj = Image.new('RGB', (64, 64), color='red')
            if to_array is True:
                item_obj = np.array(item_obj)
        elif self.mimetype == 'text/plain':
            item_obj = BytesIO(b"Hello, world!")
        else:
            item_obj = float()
        return item_obj


@pytest.fixture(scope="module")
def adapter(module_platform, tmp_path_factory):
    adapter = ClipAdapter(model_entity=platform_model(module_platform, {"model_name": "tiny",
                                                                        "embeddings_size": TINY_DIM}))
    adapter.load(str(tmp_path_factory.mktemp("empty")))  # the originals' setUp: adapter.load('./')
    return adapter


def test_image_embedding(adapter):
    result = adapter.embed([MockItem(mimetype='image/jpeg')])
    assert isinstance(result[0], list)
    assert all(isinstance(x, (int, float)) for x in result[0])
    assert len(result[0]) == TINY_DIM


def test_text_embedding(adapter):
    result = adapter.embed([MockItem(mimetype='text/plain')])
    assert isinstance(result, list)
    assert all(isinstance(x, (int, float)) for x in result[0])
    assert len(result[0]) == TINY_DIM


def test_unsupported_type(adapter):
    result = adapter.embed([MockItem(mimetype='application/pdf')])
    assert result[0] is None


# ---- test_batching.py ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def test_items(tmp_path_factory):
    folder = tmp_path_factory.mktemp("items")
    pattern_image(7).save(folder / "image.png")
    (folder / "text.txt").write_text("a photo of a dog on a beach")
    return file_item("image-item", folder / "image.png", "image/png"), file_item("text-item", folder / "text.txt",
                                                                                 "text/plain")


def test_single_image_embedding(adapter, test_items):
    image_item, _ = test_items
    result = adapter.embed([image_item])
    assert len(result) == 1 and result[0] is not None
    assert isinstance(result[0], list) and len(result[0]) == TINY_DIM


def test_single_text_embedding(adapter, test_items):
    _, text_item = test_items
    result = adapter.embed([text_item])
    assert len(result) == 1 and result[0] is not None
    assert isinstance(result[0], list) and len(result[0]) == TINY_DIM


def test_mixed_batch_embedding(adapter, test_items):
    image_item, text_item = test_items
    result = adapter.embed([image_item, text_item, image_item, text_item])
    assert len(result) == 4
    assert all(emb is not None for emb in result)
    assert all(isinstance(emb, list) and len(emb) == TINY_DIM for emb in result)


def test_duplicate_items_consistency(adapter, test_items):
    image_item, text_item = test_items
    image_emb1, image_emb2, text_emb1, text_emb2 = adapter.embed([image_item, image_item, text_item, text_item])
    np.testing.assert_array_almost_equal(np.array(image_emb1), np.array(image_emb2), decimal=5)
    np.testing.assert_array_almost_equal(np.array(text_emb1), np.array(text_emb2), decimal=5)


def test_large_batch_embedding(adapter, test_items):
    image_item, text_item = test_items
    result = adapter.embed([image_item, text_item] * 5)
    assert len(result) == 10
    assert all(isinstance(emb, list) and len(emb) == TINY_DIM for emb in result)


def test_batch_order_preservation(adapter, test_items):
    """The originals only check each is a list; here each position must be its own item's vector."""
    image_item, text_item = test_items
    image_vector, text_vector = adapter.embed([image_item]), adapter.embed([text_item])
    batch = [image_item, text_item, image_item, text_item, image_item]
    for item, embedding in zip(batch, adapter.embed(batch)):
        expected = image_vector[0] if 'image/' in item.mimetype else text_vector[0]
        np.testing.assert_array_almost_equal(np.array(embedding), np.array(expected), decimal=5)


def test_empty_batch_handling(adapter):
    assert adapter.embed([]) == []


def test_single_type_batch(adapter, test_items):
    image_item, text_item = test_items
    assert len(image_result := adapter.embed([image_item] * 3)) == 3 and all(e is not None for e in image_result)
    assert len(text_result := adapter.embed([text_item] * 3)) == 3 and all(e is not None for e in text_result)


@pytest.mark.parametrize("batch_size", [1, 2, 5, 10])
def test_embedding_dimensions_consistency(adapter, test_items, batch_size):
    image_item, text_item = test_items
    batch = ([image_item, text_item] * (batch_size // 2 + 1))[:batch_size]
    dims = {len(emb) for emb in adapter.embed(batch) if emb is not None}
    assert dims == {TINY_DIM}


# ---- test_devices.py ----------------------------------------------------------------------------
def test_cpu_device(adapter, test_items):
    adapter.device = torch.device("cpu")  # as the original: force the device, move the model
    adapter.model.to(adapter.device)
    result = adapter.embed(list(test_items))
    assert len(result) == 2 and all(isinstance(emb, list) and len(emb) == TINY_DIM for emb in result)
    assert all(param.device.type == 'cpu' for param in adapter.model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_device(module_platform, test_items):
    """The original moves a loaded model with `adapter.model.to('cuda:0')`; here the model is
    loaded there (configuration `device`), which is how this adapter is told its device."""
    on_gpu = ClipAdapter(model_entity=platform_model(module_platform, {"model_name": "tiny", "device": "cuda",
                                                                       "embeddings_size": TINY_DIM}))
    result = on_gpu.embed(list(test_items))
    assert len(result) == 2 and all(isinstance(emb, list) and len(emb) == TINY_DIM for emb in result)
    assert all(param.device.type == 'cuda' and param.device.index == 0 for param in on_gpu.model.parameters())
