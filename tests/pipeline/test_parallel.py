"""The process pool: results in order, from an iterator too, and a caller may stop early."""

from __future__ import annotations

import time

from pipeline.parallel import parallel_imap


def _square(x: int) -> int:
    return x * x


def test_an_iterator_of_more_items_than_the_window_comes_back_whole_and_in_order():
    n = 600  # 2 workers: chunks of 37, a window of 296 items out at once
    results = parallel_imap(_square, iter(range(n)), 2, total=n)
    assert list(results) == [x * x for x in range(n)]


def test_a_caller_that_stops_early_does_not_hang_the_pool():
    start = time.monotonic()
    results = parallel_imap(_square, iter(range(10_000)), 2, total=10_000)
    assert [next(results) for _ in range(3)] == [0, 1, 4]
    results.close()  # the pool shuts down with items still unsent
    assert time.monotonic() - start < 60
