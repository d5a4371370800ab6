"""The Ray Data engine of ingest and preprocess (``data.engine: ray``).

Same stages, same semantics, same outputs row for row as the local process pool; only where
the decoding runs changes. Both stages make a dataset of the file paths and read and decode each
file in ``map_batches`` tasks spread over the cluster (Pillow / pydicom, through the very
functions the local engine uses, so a file that cannot be read or decoded gets the same
reason), while the driver keeps everything that needs the whole
collection at once: the listing, quarantine and duplicate decisions, pseudonymisation, the
subject split, the tables. Decoded pixels never pass through the driver: ingest's tasks write
the training pixels they make from their own decode into part files of the prepared-pixel cache
(:mod:`pipeline.pixel_cache`; the driver only merges the index), preprocess copies those
(small, at the training size) into place and its tasks decode only the rest, writing each
image straight into its place in the output shards (``{split}_images/00000.npy`` ...,
``data.shard_size`` images each, see :mod:`pipeline.processed`), which on a multi-node cluster must
be on storage every node mounts at the same path (as ``paths.processed`` already must be for
training).

Ray: an embedded local one when ``cluster.address`` is null, else that cluster (with
``pipeline/`` shipped as a ``py_module`` when ``cluster.ship_code``); a session the caller opened
is reused.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pipeline import libwarn, pixel_cache, pixels, ray_address
from pipeline.errors import UserError
from pipeline.params import Params

log = logging.getLogger("retina_vae.ray_data")

REPO = Path(__file__).resolve().parents[1]
FILES_PER_BATCH = 32  # files per map_batches call: each call costs ~20 ms of Ray overhead


def engine(params: Params) -> str:
    """``data.engine``: local (process pool) or ray (Ray Data)."""
    return params.data.engine


@contextmanager
def session(params: Params) -> Iterator[None]:
    """Ray for the length of a data stage: started (and stopped) here unless already up."""
    started = connect(params)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def connect(params: Params) -> bool:
    """Start or join Ray for a data stage; True when this call started it (shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = params.cluster.address
    quiet = {"logging_config": ray.LoggingConfig(log_level="ERROR")}
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        if address is None:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
        else:
            ray_address.check_address(address)  # seconds, where ray.init stalls or names no cause
            env = {"py_modules": [str(REPO / "pipeline")]} if params.cluster.ship_code else None
            ray.init(address=address, runtime_env=env, **quiet)
    except ConnectionError as exc:
        raise UserError(f"cluster.address: cannot connect to Ray at {address} ({exc})") from None
    finally:  # ray.LoggingConfig reconfigures the root logger: the stage keeps its own
        root.setLevel(level)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        logging.getLogger("ray").setLevel(logging.ERROR)
    return True


def _context() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Each stage is one map over a list of paths whose results are small (JSON rows, error
    # strings: the pixels go to files), so per-operator reservations have nothing to protect;
    # they held a 2-CPU node to one task for the first ~1 s of every stage (1.45x -> 1.05x the
    # local engine's wall time, bench/bench_preprocess.py --ray).
    ctx.op_resource_reservation_enabled = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # the stage logs its own summary


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _files(rows: list[dict], cpus: int):
    """One dataset row per file (``i``: its place in the caller's list, ``path``, ...), split
    across the cluster. The tasks read each file themselves, as the local engine's workers do:
    a file that cannot be read is that file's error (quarantined, or the stage's one line),
    never a failed read task that stops the whole dataset."""
    import ray.data

    _context()
    # enough blocks to keep every CPU busy, and at scale ~200 files each, not a few huge ones
    blocks = max(1, min(len(rows), max(8 * cpus, len(rows) // 200)))
    return ray.data.from_items(rows, override_num_blocks=blocks)


def _log_nodes(stage: str, nodes: Counter) -> None:
    here = nodes.get(_node(), 0)
    log.info(
        "%s on Ray Data: %d files over %d node(s) (%d on the driver's node)",
        stage,
        sum(nodes.values()),
        len(nodes),
        here,
    )


def _cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


# ----------------------------------------------------------------------------- ingest


Inspect = Callable[[tuple], dict]  # ingest's worker: task -> JSON-able result


def _inspect_batch(batch: dict, inspect: Inspect, args: tuple, cache: str | None) -> dict:
    """map_batches: each file's ingest result (``inspect``) as JSON; its prepared pixels, if
    any, go to a part file of the prepared-pixel cache being written in folder ``cache``."""
    found = [inspect((str(path), *args)) for path in batch["path"]]
    if cache is not None:
        pixel_cache.write_part(Path(cache), pixel_cache.shape_of(args[-1]), found)
    results = [json.dumps(r) for r in found]
    return {
        "i": batch["i"],
        "result": np.asarray(results, dtype=object),
        "node": np.asarray([_node()] * len(results), dtype=object),
    }


def inspect_files(tasks: list[tuple], inspect: Inspect, cache: Path | None = None) -> list[dict]:
    """ingest's ``inspect(task)`` for every task, on Ray Data; results in task order, the same
    as the local engine's (a file that cannot be read or decoded gets its reason there).

    Tasks share everything but the path (oct_central, min_size, max_pixels, burned-in switch,
    salt, spec). With
    ``cache`` (a :class:`pipeline.pixel_cache.CacheWriter`'s folder) and a spec, each task
    writes its files' prepared pixels there (:func:`pipeline.pixel_cache.write_part`) and its
    results carry ``part`` instead of ``prepared``.
    """
    if not tasks:
        return []
    rows = [{"i": i, "path": t[0]} for i, t in enumerate(tasks)]
    ds = _files(rows, _cpus()).map_batches(
        _inspect_batch,
        batch_size=FILES_PER_BATCH,
        batch_format="numpy",
        fn_args=(inspect, tuple(tasks[0][1:]), str(cache) if cache and tasks[0][-1] else None),
    )
    results: list[dict | None] = [None] * len(tasks)
    nodes: Counter = Counter()
    for row in ds.iter_rows():
        results[int(row["i"])] = json.loads(row["result"])
        nodes[row["node"]] += 1
    _log_nodes("ingest", nodes)
    return results


# ----------------------------------------------------------------------------- preprocess


def _prepare_batch(batch: dict, spec: tuple) -> dict:
    """map_batches: decode each file's listed frames, write each image into its shard slot."""
    errors, warned = [], []
    for path, frames, slots in zip(batch["path"], batch["frames"], batch["slots"], strict=True):
        with libwarn.caught() as noted:  # counted on the driver, never printed by the worker
            res = pixels.prepare_frames((str(path), json.loads(frames), *spec))
        warned.append(json.dumps(noted))
        if isinstance(res, str):
            errors.append(res)
            continue
        for (target, offset), arr in zip(json.loads(slots), res, strict=True):
            fd = os.open(target, os.O_WRONLY)
            try:
                os.pwrite(fd, np.ascontiguousarray(arr, dtype=np.uint8).tobytes(), offset)
            finally:
                os.close(fd)
        errors.append("")
    return {
        "i": batch["i"],
        "error": np.asarray(errors, dtype=object),
        "warnings": np.asarray(warned, dtype=object),
        "node": np.asarray([_node()] * len(errors), dtype=object),
    }


def prepare_files(groups: list[tuple[str, list[int], list[tuple[str, int]]]], spec: tuple) -> int:
    """Decode and write every file's frames on Ray Data.

    ``groups``: (absolute path, frames, [(shard file, byte offset) per frame]); ``spec``: the
    rest of :func:`pipeline.pixels.prepare_frames`'s task (modality, size, aspect,
    illumination, burned-in switch). A file that cannot be read or decoded stops the stage
    with one line, as with the local engine.
    """
    rows = [
        {"i": i, "path": path, "frames": json.dumps(frames), "slots": json.dumps(slots)}
        for i, (path, frames, slots) in enumerate(groups)
    ]
    ds = _files(rows, _cpus()).map_batches(
        _prepare_batch, batch_size=FILES_PER_BATCH, batch_format="numpy", fn_args=(spec,)
    )
    nodes: Counter = Counter()
    warned: Counter = Counter()  # library warnings per kind, as the local engine counts them
    done = 0
    for row in ds.iter_rows():
        nodes[row["node"]] += 1
        warned.update(json.loads(row["warnings"]))
        if row["error"]:
            path = groups[int(row["i"])][0]
            raise UserError(
                f"{path}: {row['error']} (changed since ingest? re-run retina-vae ingest)"
            )
        done += 1
    libwarn.report(warned, log)
    _log_nodes("preprocess", nodes)
    return done
