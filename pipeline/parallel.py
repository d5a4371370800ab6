"""``parallel_map``: the one process pool every data stage uses (demo, ingest, preprocess)."""

from __future__ import annotations

import multiprocessing as mp
import sys
from collections.abc import Callable, Iterator, Sequence
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
    fn: Callable[[Any], Any], items: Sequence[Any], workers: int, desc: str | None = None
) -> Iterator[Any]:
    """:func:`parallel_map` as a generator: results in order, as they come, so a caller that
    writes each one out never holds them all (memory flat in the number of items)."""
    bar = {"total": len(items), "desc": desc, "disable": None, "file": sys.stderr, "leave": False}
    if workers <= 1 or len(items) <= 1:
        yield from (fn(x) for x in tqdm(items, **bar))
        return
    chunk = max(1, min(64, len(items) // (workers * 8)))
    ctx = mp.get_context("forkserver")
    # the server imports the decoding modules once; each worker forks from it ready to go
    ctx.set_forkserver_preload(["pipeline.ingest", "pipeline.preprocess", "pipeline.demo"])
    with ctx.Pool(min(workers, len(items))) as pool:
        yield from tqdm(pool.imap(fn, items, chunksize=chunk), **bar)
