"""CLIP's byte-pair tokenizer without torch, for the cold search path.

open_clip's `SimpleTokenizer` lives in a module that imports torch (4 s here), so a search
that needs only the exported text tower would pay for torch just to tokenize. This is the
same algorithm over the same vocabulary file, read from open_clip's installed package data
without importing open_clip, returning numpy. tests/test_engines.py checks it against
open_clip's tokenizer on many strings (unicode, HTML entities, long texts, punctuation).

Only open_clip's default text cleaning ('lower', no reduction mask) is reproduced; models
with other tokenizers (Hugging Face ones) keep the torch path.
"""
from __future__ import annotations

import gzip
import html
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import regex

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
MERGES = 49152 - 256 - 2  # OpenAI's vocabulary: 256 bytes x2 (with </w>), the merges, 2 specials
START, END = "<start_of_text>", "<end_of_text>"


def open_clip_vocab_path() -> Path:
    """The vocabulary file shipped inside the installed open_clip package (found, not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed: its BPE vocabulary file is needed")
    return Path(list(spec.submodule_search_locations)[0]) / VOCAB_FILE


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """Reversible byte -> printable character table (OpenAI's `bytes_to_unicode`)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


_PLAIN = frozenset(chr(c) for c in range(0x20, 0x7F)) - {"&"} | {"\t", "\n", "\r"}


def _clean(text: str) -> str:
    """open_clip's 'lower' cleaning: fix mojibake, unescape HTML twice, collapse whitespace, lowercase.

    Printable ASCII without '&' is left unchanged by ftfy and by unescaping, so it skips both:
    importing ftfy costs a quarter of a cold search (the test compares on such strings too).
    """
    if not _PLAIN.issuperset(text):
        import ftfy
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.strip().split()).strip().lower()


class ClipTokenizer:
    """Callable like open_clip's tokenizer: texts -> (N, context_length) int64 numpy array."""

    def __init__(self, context_length: int = 77, vocab_path: Union[str, Path, None] = None) -> None:
        self.context_length = int(context_length)
        path = Path(vocab_path) if vocab_path else open_clip_vocab_path()
        merges = gzip.open(path).read().decode("utf-8").split("\n")[1:MERGES + 1]  # "first second" per line
        symbols = list(_byte_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.encoder.update({merge.replace(" ", ""): len(vocab) + i for i, merge in enumerate(merges)})
        self.encoder.update({START: len(vocab) + len(merges), END: len(vocab) + len(merges) + 1})
        self.ranks = {merge: i for i, merge in enumerate(merges)}  # keyed by the line: cheaper than tuples
        self.start_id, self.end_id = self.encoder[START], self.encoder[END]
        self._cache = {START: START, END: END}
        self._pattern = regex.compile(
            rf"{START}|{END}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+", regex.IGNORECASE)

    def bpe(self, token: str) -> str:
        """Merge the characters of one pre-token by rank until no known pair is left."""
        if token in self._cache:
            return self._cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            ranked = [(self.ranks[key], pair) for pair in set(zip(word, word[1:]))
                      if (key := f"{pair[0]} {pair[1]}") in self.ranks]
            if not ranked:
                break
            word = self._merge(word, min(ranked)[1])
        result = " ".join(word)
        self._cache[token] = result
        return result

    @staticmethod
    def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
        first, second = pair
        merged: list[str] = []
        i = 0
        while i < len(word):
            if word[i] == first and i + 1 < len(word) and word[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(word[i])
                i += 1
        return tuple(merged)

    def encode(self, text: str) -> list[int]:
        byte_map = _byte_to_unicode()
        ids: list[int] = []
        for piece in self._pattern.findall(_clean(text)):
            token = "".join(byte_map[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[part] for part in self.bpe(token).split(" "))
        return ids

    def __call__(self, texts: Union[str, Sequence[str]]) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        result = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.start_id] + self.encode(text) + [self.end_id]
            if len(ids) > self.context_length:  # truncate, keeping the end token last (open_clip's rule)
                ids = ids[:self.context_length]
                ids[-1] = self.end_id
            result[row, :len(ids)] = ids
        return result
