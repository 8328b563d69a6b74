"""Fetch a known sequence ahead of its use: the next batch downloads while the current one computes.

A caller that walks a list in batches (dtlpy's `embed_items`: download a batch in 16 threads, then
embed it, then the next) leaves the network idle while it computes and the CPU idle while it
downloads. A `Prefetcher` over the same list, asked for element i, makes sure elements up to
i + `ahead` are being fetched in its own threads, so by the time the caller asks for the next batch
it is (mostly) there. Memory stays bounded: at most `ahead` + 1 fetched elements wait to be taken.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, Hashable, Optional, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Prefetcher(Generic[T, R]):
    """`fetch(element)` for each element of `elements`, started before it is asked for.

    `take(key)` returns the fetched result of the element with that key (blocking until it is
    ready), or None when the key is not one of this prefetcher's (or was taken already): the caller
    then fetches it itself. Taking element i starts fetching every element up to i + `ahead`.
    Thread-safe: many threads may take at once. `close()` cancels what was not started.
    """

    def __init__(self, elements: Sequence[T], fetch: Callable[[T], R], key: Callable[[T], Hashable], *,
                 ahead: int, workers: int = 16):
        self._elements = list(elements)
        self._fetch = fetch
        self._position: dict[Hashable, int] = {}
        for index, element in enumerate(self._elements):
            self._position.setdefault(key(element), index)  # a repeated element is fetched once, then directly
        self._wanted = set(self._position.values())
        self._ahead = max(0, int(ahead))
        self._futures: dict[int, Future] = {}
        self._submitted = 0                      # elements [0, _submitted) have been handed to the pool
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="prefetch")
        self._closed = False

    def take(self, key: Hashable) -> Optional[R]:
        with self._lock:
            index = self._position.pop(key, None)
            if index is None or self._closed:
                return None
            self._submit_through(index + self._ahead)
            future = self._futures.pop(index)
        return future.result()

    def _submit_through(self, last: int) -> None:
        """Hand elements up to `last` (inclusive) to the pool; the caller holds the lock."""
        stop = min(last + 1, len(self._elements))
        while self._submitted < stop:
            index = self._submitted
            if index in self._wanted:
                self._futures[index] = self._pool.submit(self._fetch, self._elements[index])
            self._submitted += 1

    def close(self) -> None:
        """Cancel fetches not started, wait for those running (nothing outlives the caller's call)."""
        with self._lock:
            self._closed = True
            self._futures.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "Prefetcher[T, R]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
