"""Where Ray Train keeps a training's checkpoints (``paths.checkpoints``): a local folder, or an
object-store URI (``s3://bucket/prefix``, ``gs://bucket/prefix``) reached through pyarrow's
file systems, as Ray Train itself reaches it. Credentials and endpoint come from the
environment (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION and, for an
S3-compatible server, AWS_ENDPOINT_URL), here and, through ``cluster.forward_env``, on the
workers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pyarrow import fs

from pipeline.io import write_json as write_local_json


def is_uri(location: str) -> bool:
    return "://" in location


def location(value: str) -> str:
    """``paths.checkpoints`` as Ray's ``storage_path``: a URI as given (``Path.resolve`` would
    turn ``s3://b/x`` into ``/cwd/s3:/b/x``), a local path made absolute."""
    return value.rstrip("/") if is_uri(value) else str(Path(value).resolve())


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _split(target: str) -> tuple[fs.FileSystem, str]:
    return fs.FileSystem.from_uri(target) if is_uri(target) else (fs.LocalFileSystem(), target)


def read_json(target: str) -> dict[str, Any]:
    """The JSON object at ``target``; {} when it is missing or unreadable."""
    filesystem, path = _split(target)
    try:
        with filesystem.open_input_stream(path) as f:
            value = json.loads(f.read())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write_json(target: str, obj: Any) -> None:
    """Write ``obj`` as JSON: a local file atomically (pipeline.io), an object in one PUT (an
    object store never shows a half-written object)."""
    if not is_uri(target):
        write_local_json(target, obj)
        return
    filesystem, path = _split(target)
    with filesystem.open_output_stream(path) as f:
        f.write(json.dumps(obj, indent=2).encode())


def remove_tree(target: str) -> None:
    """Delete the folder (or prefix) ``target`` and everything under it, if it exists."""
    if not is_uri(target):
        shutil.rmtree(target, ignore_errors=True)
        return
    filesystem, path = _split(target)
    if filesystem.get_file_info(path).type != fs.FileType.NotFound:
        filesystem.delete_dir(path)
