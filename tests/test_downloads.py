"""`prepare_item_func` takes whatever an item's `download` gives and never raises.

dtlpy's `Item.download(save_locally=False)` gives a BytesIO; with `save_locally=True` a path, with
`to_array=True` a numpy array; the earlier CLIP app's own unit tests pass mock items whose
`download()` returns an array for images, a BytesIO for text and a float for anything else
(dataloop-ai-apps/clip-model-adapter tests/unittest/clip-model-pretrained/test_embed.py). Each is read
as the item's data; anything else is that item's logged reason, never a failed batch.
Real ClipAdapter on the `tiny` model (on the fake platform), real dl.Items downloading from file://.
"""
import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adapters.clip.items import downloaded_bytes
from adapters.clip_adapter import ClipAdapter
from conftest import pattern_image
from dataloop_fakes import file_item, platform_model


class DownloadGives:
    """An item whose `download` returns `value` (or raises it), like the earlier app's MockItem."""

    def __init__(self, mimetype: str, value, item_id: str = "mock"):
        self.mimetype, self.value, self.id, self.name = mimetype, value, item_id, f"mock {mimetype}"

    def download(self, save_locally=False, to_array=False, **kwargs):
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


@pytest.fixture(scope="module")
def adapter(module_platform):
    return ClipAdapter(model_entity=platform_model(module_platform, {"model_name": "tiny", "embeddings_size": 64}))


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    pattern_image(3).save(path)
    return path


WAYS_TO_GIVE = {  # how download may give the photo at `path`
    "BytesIO": lambda path: io.BytesIO(path.read_bytes()), "bytes": lambda path: path.read_bytes(),
    "bytearray": lambda path: bytearray(path.read_bytes()), "path str": str, "Path": lambda path: path,
    "file object": lambda path: io.BufferedReader(io.BytesIO(path.read_bytes())),
    "array": lambda path: np.asarray(Image.open(path).convert("RGB")),
    "PIL image": lambda path: Image.open(path).convert("RGB"),
}


@pytest.mark.parametrize("way", sorted(WAYS_TO_GIVE))
def test_every_form_of_an_image_embeds_as_the_real_download_does(adapter, photo, way):
    """The same pixels, whichever way they come, give the vector dtlpy's real download gives."""
    expected = adapter.embed([adapter.prepare_item_func(file_item("real", photo, "image/png"))])[0]
    prepared = adapter.prepare_item_func(DownloadGives("image/png", WAYS_TO_GIVE[way](photo)))
    assert prepared.ok, prepared.error
    (vector,) = adapter.embed([prepared])
    assert np.allclose(vector, expected, atol=1e-6)


def test_text_given_as_bytesio_as_the_earlier_mock_items_give_it(adapter, tmp_path):
    (tmp_path / "t.txt").write_text("Hello, world!")
    expected = adapter.embed([file_item("t", tmp_path / "t.txt", "text/plain")])[0]
    (vector,) = adapter.embed([DownloadGives("text/plain", io.BytesIO(b"Hello, world!"))])
    assert np.allclose(vector, expected, atol=1e-6)


@pytest.mark.parametrize("given, reason", [
    (None, "no data"), (0.0, "gave a float"), ("/no/such/file.png", "not a file"),
    (np.zeros((2, 2, 7), np.uint8), "not an image"), (np.zeros((4, 4), np.complex64), "unsupported array dtype"),
    (ConnectionError("reset by peer"), "ConnectionError: reset by peer"),
])
def test_what_cannot_be_read_is_that_items_reason_and_the_batch_goes_on(adapter, photo, given, reason):
    bad = DownloadGives("image/png", given, item_id="bad")
    prepared = adapter.prepare_item_func(bad)  # never raises
    assert not prepared.ok and reason in prepared.error
    logged = Logged()
    adapter.logger.addHandler(logged)  # the adapter's own logger (dtlpy's may not propagate to the root)
    try:
        vectors = adapter.embed([bad, file_item("good", photo, "image/png")])
    finally:
        adapter.logger.removeHandler(logged)
    assert vectors[0] is None and len(vectors[1]) == 64
    assert any("item bad: no embedding" in message and reason in message for message in logged.messages)


class Logged(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_an_unsupported_item_is_not_downloaded_at_all(adapter):
    prepared = adapter.prepare_item_func(DownloadGives("application/pdf", AssertionError("downloaded")))
    assert prepared.error.startswith("unsupported item type 'application/pdf'")


def test_a_file_object_that_fails_to_read_is_a_reason(tmp_path):
    class Broken(io.RawIOBase):
        def read(self, *args):
            raise OSError("disk went away")

    raw, error = downloaded_bytes(Broken())
    assert raw is None and "disk went away" in error and "Broken" in error
