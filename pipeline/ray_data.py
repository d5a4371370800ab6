"""The Ray Data engine of ingest and preprocess (``data.engine: ray``).

Same stages, same semantics, same outputs row for row as the local process pool; only where
the decoding runs changes. Both stages read the files with ``ray.data.read_binary_files`` and
decode them in ``map_batches`` tasks spread over the cluster (Pillow / pydicom, through the very
functions the local engine uses), while the driver keeps everything that needs the whole
collection at once: the listing, quarantine and duplicate decisions, pseudonymisation, the
subject split, the tables. Pixels never pass through the driver: preprocess's tasks write each
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

from pipeline import pixels
from pipeline.errors import UserError
from pipeline.params import Params

log = logging.getLogger("retina_vae.ray_data")

REPO = Path(__file__).resolve().parents[1]
FILES_PER_BATCH = 8


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
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # the stage logs its own summary


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _read(paths: list[str], cpus: int):
    """The files' bytes as a dataset (columns ``bytes``, ``path``), split across the cluster."""
    import ray.data

    _context()
    # enough read tasks to keep every CPU busy, and at scale ~200 files each, not a few huge ones
    blocks = max(1, min(len(paths), max(8 * cpus, len(paths) // 200)))
    return ray.data.read_binary_files(paths, include_paths=True, override_num_blocks=blocks)


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


def _key(path: str) -> str:
    """Ray Data reports local paths without a scheme and normalised: match them that way."""
    return os.path.normpath(os.path.abspath(path))


# ----------------------------------------------------------------------------- ingest


Inspect = Callable[..., dict]  # ingest's worker: (task, data=bytes) -> JSON-able result


def _inspect_batch(batch: dict, inspect: Inspect, args: tuple) -> dict:
    """map_batches: each file's ingest result (``inspect``) as JSON."""
    results = []
    for path, data in zip(batch["path"], batch["bytes"], strict=True):
        results.append(json.dumps(inspect((str(path), *args, None), data=bytes(data))))
    return {
        "path": np.asarray(batch["path"], dtype=object),
        "result": np.asarray(results, dtype=object),
        "node": np.asarray([_node()] * len(results), dtype=object),
    }


def inspect_files(tasks: list[tuple], inspect: Inspect) -> list[dict]:
    """ingest's ``inspect(task, data=bytes)`` for every task, on Ray Data; results in task order.

    Tasks share everything but the path (oct_central, min_size, max_pixels, salt). A file
    that is gone gets a reason here (the caller names it "listed but file not found").
    """
    if not tasks:
        return []
    args = tuple(tasks[0][1:5])
    present = [t[0] for t in tasks if os.path.isfile(t[0])]
    found: dict[str, dict] = {}
    nodes: Counter = Counter()
    if present:
        ds = _read(present, _cpus()).map_batches(
            _inspect_batch,
            batch_size=FILES_PER_BATCH,
            batch_format="numpy",
            fn_args=(inspect, args),
        )
        for row in ds.iter_rows():
            found[_key(row["path"])] = json.loads(row["result"])
            nodes[row["node"]] += 1
    _log_nodes("ingest", nodes)
    gone = {"reason": "file not found", "kind": "file not found"}
    return [found.get(_key(t[0]), gone) for t in tasks]


# ----------------------------------------------------------------------------- preprocess


def _prepare_batch(batch: dict, plan: dict, spec: tuple) -> dict:
    """map_batches: decode each file's listed frames, write each image into its shard slot."""
    errors = []
    for path, data in zip(batch["path"], batch["bytes"], strict=True):
        frames, slots = plan[_key(str(path))]
        res = pixels.prepare_frames((str(path), frames, *spec), data=bytes(data))
        if isinstance(res, str):
            errors.append(f"{path}\t{res}")
            continue
        for (target, offset), arr in zip(slots, res, strict=True):
            fd = os.open(target, os.O_WRONLY)
            try:
                os.pwrite(fd, np.ascontiguousarray(arr, dtype=np.uint8).tobytes(), offset)
            finally:
                os.close(fd)
        errors.append("")
    return {
        "path": np.asarray(batch["path"], dtype=object),
        "error": np.asarray(errors, dtype=object),
        "node": np.asarray([_node()] * len(errors), dtype=object),
    }


def prepare_files(groups: list[tuple[str, list[int], list[tuple[str, int]]]], spec: tuple) -> int:
    """Decode and write every file's frames on Ray Data.

    ``groups``: (absolute path, frames, [(shard file, byte offset) per frame]); ``spec``: the
    rest of :func:`pipeline.pixels.prepare_frames`'s task (modality, size, aspect,
    illumination). A file that cannot be decoded stops the stage, as with the local engine.
    """
    plan = {_key(path): (frames, slots) for path, frames, slots in groups}
    missing = [path for path, _, _ in groups if not os.path.isfile(path)]
    if missing:
        raise UserError(f"{missing[0]}: not found (changed since ingest? re-run retina-vae ingest)")
    ds = _read([g[0] for g in groups], _cpus()).map_batches(
        _prepare_batch,
        batch_size=FILES_PER_BATCH,
        batch_format="numpy",
        fn_kwargs={"plan": plan, "spec": spec},
    )
    nodes: Counter = Counter()
    done = 0
    for row in ds.iter_rows():
        nodes[row["node"]] += 1
        if row["error"]:
            path, reason = row["error"].split("\t", 1)
            raise UserError(f"{path}: {reason} (changed since ingest? re-run retina-vae ingest)")
        done += 1
    _log_nodes("preprocess", nodes)
    return done
