"""``parallel_map``: the one process pool every data stage uses (demo, ingest, preprocess)."""

from __future__ import annotations

import multiprocessing as mp
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from tqdm import tqdm


def parallel_map(
    fn: Callable[[Any], Any], items: Sequence[Any], workers: int, desc: str | None = None
) -> list[Any]:
    """``[fn(x) for x in items]`` over a process pool of ``workers``, in order, with a progress bar.

    One worker runs in-process. Workers start from a fork server (not a plain fork) so a
    parent holding threads (Ray, tqdm, torch) cannot deadlock them.
    """
    return list(parallel_imap(fn, items, workers, desc))


def parallel_imap(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    workers: int,
    desc: str | None = None,
    total: int | None = None,
) -> Iterator[Any]:
    """:func:`parallel_map` as a generator: results in order, as they come, so a caller that
    writes each one out never holds them all (memory flat in the number of items). ``items``
    may be an iterator (``total``: its length), taken as the workers need them.

    At most a fixed window of items is out at once (sent, or done but not yet taken): when the
    caller is slower than the workers, finished results wait in the pool, not pile up in it.
    """
    n = len(items) if total is None else total
    bar = {"total": n, "desc": desc, "disable": None, "file": sys.stderr, "leave": False}
    if workers <= 1 or n <= 1:
        yield from (fn(x) for x in tqdm(items, **bar))
        return
    chunk = max(1, min(64, n // (workers * 8)))
    window = threading.Semaphore(4 * workers * chunk)  # > chunk: a part-built chunk never blocks
    stop = threading.Event()

    def feed() -> Iterator[Any]:  # runs in the pool's task thread
        for x in items:
            while not window.acquire(timeout=0.1):
                if stop.is_set():  # the caller is gone: let the pool shut down
                    return
            yield x

    ctx = mp.get_context("forkserver")
    # the server imports the decoding modules once; each worker forks from it ready to go
    ctx.set_forkserver_preload(["pipeline.ingest", "pipeline.preprocess", "pipeline.demo"])
    with ctx.Pool(min(workers, n)) as pool:
        try:
            for result in tqdm(pool.imap(fn, feed(), chunksize=chunk), **bar):
                window.release()
                yield result
        finally:
            stop.set()
