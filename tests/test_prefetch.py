"""The Prefetcher behind the adapter's overlapped downloads: each element fetched once, ahead of its
use but never more than `ahead` past what was asked for (memory stays bounded), unknown keys left to
the caller, nothing running after close. Real threads; the fetch function records what it was given."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from adapters.clip.prefetch import Prefetcher


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


class Recorder:
    def __init__(self):
        self.fetched: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, element: int) -> str:
        with self.lock:
            self.fetched.append(element)
        time.sleep(0.01)
        return f"data of {element}"


def test_elements_are_fetched_once_ahead_of_use_and_never_further_than_ahead():
    fetch = Recorder()
    with Prefetcher(list(range(20)), fetch, key=lambda e: e, ahead=4, workers=3) as prefetcher:
        assert fetch.fetched == []                        # nothing before the first take
        assert prefetcher.take(0) == "data of 0"
        wait_for(lambda: len(fetch.fetched) >= 5)
        time.sleep(0.1)
        assert sorted(fetch.fetched) == [0, 1, 2, 3, 4]   # 0 and the next `ahead`, no more
        with ThreadPoolExecutor(4) as pool:               # the caller's own threads, in batches
            assert list(pool.map(prefetcher.take, range(1, 8))) == [f"data of {i}" for i in range(1, 8)]
        wait_for(lambda: len(fetch.fetched) >= 12)
        time.sleep(0.1)
        assert sorted(fetch.fetched) == list(range(12))
        assert prefetcher.take(7) is None                 # taken already: the caller fetches it itself
        assert prefetcher.take(99) is None                # not one of this prefetcher's
    assert sorted(fetch.fetched) == list(range(12))       # close cancelled the rest


def test_a_repeated_element_is_prefetched_once_and_close_stops_everything():
    fetch = Recorder()
    prefetcher = Prefetcher([1, 2, 1, 3], fetch, key=lambda e: e, ahead=10)
    assert prefetcher.take(1) == "data of 1"
    prefetcher.close()
    after_close = list(fetch.fetched)
    assert 1 in after_close and set(after_close) <= {1, 2, 3} and len(after_close) == len(set(after_close))
    assert prefetcher.take(2) is None and prefetcher.take(3) is None
    time.sleep(0.05)
    assert fetch.fetched == after_close                   # nothing runs after close
