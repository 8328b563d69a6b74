"""Embedder and image decoding: the bad-input matrix, odd modes, order and batch invariance."""
import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from adapters.clip.embed import Embedder, Embeddings
from adapters.clip.errors import InputError
from adapters.clip.images import load_image, to_rgb
from conftest import pattern_image


def jpeg_bytes(image, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


# ---- the bad-input matrix: each failure is that item's, with a reason ---------------------
def test_bad_inputs_get_reasons_and_the_rest_is_embedded(embedder, tmp_path):
    good = tmp_path / "good.png"
    pattern_image(1).save(good)
    zero = tmp_path / "zero.jpg"
    zero.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    full = jpeg_bytes(pattern_image(2, (256, 256)))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(full[: len(full) // 2])
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(full[:200] + bytes(range(256)) * 20)
    sources = [good, tmp_path / "missing.png", zero, text, truncated, corrupt, tmp_path, b"", 42, good]
    result = embedder.embed_images(sources)
    assert list(result.ok) == [True, False, False, False, False, False, False, False, False, True]
    assert "file not found" in result.errors[1]
    assert "empty file (0 bytes)" in result.errors[2]
    assert "not an image" in result.errors[3]
    assert "truncated or corrupt" in result.errors[4]
    assert "truncated or corrupt" in result.errors[5] or "unreadable" in result.errors[5]
    assert "directory" in result.errors[6]
    assert "empty image data" in result.errors[7]
    assert "unsupported image source" in result.errors[8]
    assert np.isnan(result.vectors[~result.ok]).all()  # never a plausible-looking vector
    alone = embedder.embed_images([good]).vectors[0]
    np.testing.assert_allclose(result.vectors[0], alone, atol=1e-5)
    np.testing.assert_allclose(result.vectors[9], alone, atol=1e-5)


def test_images_over_the_pixel_limit_are_refused(tiny, tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 100)).save(path)
    result = Embedder(tiny, max_pixels=10_000).embed_images([path, pattern_image(0, (50, 50))])
    assert "over the" in result.errors[0] and "limit" in result.errors[0]
    assert result.ok[1]


def test_pil_decompression_bomb_is_refused_not_crashed(embedder, tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (14_000, 13_000)).save(path)  # 182 MP > 2x PIL's limit; tiny file on disk
    result = embedder.embed_images([path])
    assert not result.ok[0] and "limit" in result.errors[0]


# ---- odd modes ---------------------------------------------------------------------------
def test_cmyk_jpeg_becomes_the_right_rgb():
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    rgb = load_image(jpeg_bytes(cmyk, quality=95))
    r, g, b = rgb.getpixel((16, 16))
    assert rgb.mode == "RGB" and r > 230 and g < 30 and b < 30


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert to_rgb(rgba).getpixel((4, 4)) == (255, 255, 255)
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    assert 120 <= to_rgb(half).getpixel((4, 4))[0] <= 135
    la = Image.new("LA", (8, 8), (0, 0))
    assert to_rgb(la).getpixel((1, 1)) == (255, 255, 255)


def test_palette_with_transparency_and_without(tmp_path):
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([10, 20, 30] + [0] * 765)
    assert to_rgb(palette).getpixel((0, 0)) == (10, 20, 30)
    path = tmp_path / "p.png"
    palette.save(path, transparency=0)
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    array = np.full((8, 8), 32768, dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(array).save(path)
    assert Image.open(path).mode.startswith("I")
    value = load_image(path).getpixel((0, 0))
    assert value == (128, 128, 128)  # PIL's own convert('RGB') would give white
    assert load_image(array).getpixel((0, 0)) == (128, 128, 128)


def test_grayscale_and_bilevel():
    assert to_rgb(Image.new("L", (4, 4), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("1", (4, 4), 1)).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_honoured():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    loaded = load_image(jpeg_bytes(image, exif=exif.tobytes()))
    assert loaded.size == (20, 40)


def test_large_jpeg_decoded_at_reduced_scale():
    big = Image.new("RGB", (4000, 3000), (10, 200, 30))
    data = jpeg_bytes(big)
    reduced = load_image(data, draft_size=224)
    assert reduced.size == (500, 375)  # 1/8 scale: still >= 224 on both sides
    assert load_image(data).size == (4000, 3000)


@pytest.mark.parametrize("array,expected", [
    (np.full((4, 4), 255, np.uint8), (255, 255, 255)),
    (np.zeros((4, 4, 3), np.uint8) + np.array([1, 2, 3], np.uint8), (1, 2, 3)),
    (np.full((4, 4, 1), 0.5, np.float32), (128, 128, 128)),
    (np.full((4, 4, 4), 0, np.uint8), (255, 255, 255)),
    (np.ones((4, 4), bool), (255, 255, 255)),
])
def test_numpy_arrays(array, expected):
    assert load_image(array).getpixel((0, 0)) == expected


@pytest.mark.parametrize("array,fragment", [
    (np.zeros((4, 4, 2), np.uint8), "not an image"),
    (np.zeros((2, 4, 4, 3), np.uint8), "not an image"),
    (np.full((4, 4), np.nan, np.float32), "NaN"),
    (np.zeros((4, 4), np.complex64), "dtype"),
])
def test_bad_arrays(array, fragment):
    with pytest.raises(InputError, match=fragment):
        load_image(array)


# ---- order, batches, streaming -----------------------------------------------------------
def test_same_vector_alone_or_in_any_batch_and_order_kept(tiny):
    images = [pattern_image(i) for i in range(7)]
    singles = np.stack([Embedder(tiny, num_workers=0).embed_images([im]).vectors[0] for im in images])
    for batch_size, workers in [(3, 2), (7, 0), (2, 1)]:
        batched = Embedder(tiny, batch_size=batch_size, num_workers=workers).embed_images(images)
        np.testing.assert_allclose(batched.vectors, singles, atol=1e-5)
    assert not np.allclose(singles[0], singles[1])  # distinct images: the order check means something


def test_vectors_are_unit_float32(embedder):
    result = embedder.embed_images([pattern_image(i) for i in range(5)])
    assert result.vectors.dtype == np.float32 and result.vectors.shape == (5, 64)
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)


def test_streaming_yields_batches_with_offsets(embedder):
    batches = list(embedder.iter_images((pattern_image(i) for i in range(10)), batch_size=4))
    assert [b.offset for b in batches] == [0, 4, 8] and [len(b) for b in batches] == [4, 4, 2]


def test_streaming_an_endless_source_stays_bounded(embedder):
    consumed = itertools.count()
    source = (pattern_image(next(consumed) % 5) for _ in itertools.count())
    stream = embedder.iter_images(source, batch_size=4)
    first_two = list(itertools.islice(stream, 2))
    stream.close()
    assert [len(b) for b in first_two] == [4, 4]
    assert next(consumed) <= 4 * 2 + 2 * 4 + 1  # read-ahead is bounded, not the whole input


def test_texts_empty_and_non_text_fail_alone(embedder):
    result = embedder.embed_texts(["a cat", "", "   ", None, "a dog"])
    assert list(result.ok) == [True, False, False, False, True]
    assert result.errors[1] == "empty text" and "not a text" in result.errors[3]
    alone = embedder.embed_texts(["a dog"]).vectors[0]
    np.testing.assert_allclose(result.vectors[4], alone, atol=1e-5)


def test_over_long_texts_are_truncated_to_the_context(embedder, tiny):
    long_text = "a photo of " + "a very " * 200 + "red square"
    same_prefix = "a photo of " + "a very " * 100
    result = embedder.embed_texts([long_text, same_prefix])
    assert result.ok.all()
    # Everything past the context window is dropped, so both read the same first tokens.
    np.testing.assert_allclose(result.vectors[0], result.vectors[1], atol=1e-5)
    assert tiny.context_length == 32


def test_embeddings_concat_and_lists():
    a = Embeddings(np.ones((2, 3), np.float32), {1: "bad"})
    b = Embeddings(np.zeros((1, 3), np.float32), {0: "worse"}, offset=2)
    merged = Embeddings.concat([a, b], 3)
    assert merged.errors == {1: "bad", 2: "worse"} and len(merged) == 3
    assert merged.as_lists() == [[1.0, 1.0, 1.0], None, None]


def test_numpy_preprocess_matches_open_clip_transform(tiny):
    from adapters.clip.embed import numpy_preprocess
    fast = numpy_preprocess(tiny.preprocess)
    assert fast is not tiny.preprocess  # the fast path is really taken
    for seed, size in [(0, (64, 64)), (1, (300, 97)), (2, (31, 200))]:
        image = pattern_image(seed, size)
        torch_pixels = tiny.preprocess(image)
        assert fast(image).shape == torch_pixels.shape
        assert (fast(image) - torch_pixels).abs().max() < 1e-5


@pytest.mark.parametrize("workers", [0, 2])
def test_iter_prepared_decodes_in_input_order_with_reasons_for_failures(tiny, workers):
    """The decode half of iter_images, public for callers that encode later (evaluation)."""
    embedder = Embedder(tiny, num_workers=workers)
    sources = [pattern_image(0), b"not an image", pattern_image(1), pattern_image(0)]
    prepared = list(embedder.iter_prepared(sources, ahead=2))
    assert [p.error is None for p in prepared] == [True, False, True, True]
    assert "image" in prepared[1].error and prepared[1].tensor is None
    assert prepared[0].tensor.shape == (3, tiny.image_size, tiny.image_size)
    assert torch.equal(prepared[0].tensor, prepared[3].tensor)
    assert not torch.equal(prepared[0].tensor, prepared[2].tensor)
    assert torch.equal(embedder.prepare(sources[2]).tensor, prepared[2].tensor)
    encoded = tiny.encode_images(torch.stack([prepared[0].tensor, prepared[2].tensor]))
    np.testing.assert_allclose(encoded, embedder.embed_images([sources[0], sources[2]]).vectors, atol=1e-5)
