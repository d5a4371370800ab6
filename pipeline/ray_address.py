"""``cluster.address`` checked before ``ray.init``: the one-line errors for a Ray head that does
not listen, or that refuses this process's credentials, where Ray itself retries for minutes
or names no cause.

Without torch (imports Ray only when asked), so the data stages' Ray engine
(:mod:`pipeline.ray_data`) and the train stage (:mod:`pipeline.train`) share it without a
model edit re-running ingest. See README, "Running on a cluster".
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from pipeline.errors import UserError

SEE = "see README, Running on a cluster"


def check_address(address: str) -> None:
    """``cluster.address`` is a listening Ray head that accepts this process's credentials.

    A TCP probe (Ray itself retries for minutes where nothing listens), then a token check
    (``ray.init`` retries ~40 s and names no cause); each fails within seconds with one line.
    Raises UserError.
    """
    if address == "auto":
        return
    if address.startswith("ray://"):
        raise UserError(
            f"cluster.address: Ray Client addresses ({address}) are not supported; use the "
            "head's host:port (GCS, default port 6379), or submit the stage with `ray job "
            f"submit` - {SEE}"
        )
    parts = urlsplit(f"ray-gcs://{address}")
    if not parts.hostname or not parts.port:
        raise UserError(f"cluster.address: expected auto or host:port, got {address!r}")
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=5).close()
    except OSError as exc:
        raise UserError(
            f"cluster.address: Ray cluster at {address} is unreachable ({exc.strerror or exc}); "
            "start it with `ray start --head` or set cluster.address: null for a local Ray"
        ) from None
    if auth_refused(address) is not None:
        raise UserError(f"cluster.address: {_auth_advice(address)}")


def auth_refused(address: str) -> str | None:
    """Ray's message when the GCS at ``address`` (``host:port``, known to listen) refuses this
    process's credentials (token authentication), else None.

    One GCS client: a second or two, where ``ray.init`` retries for 20-40 s and then raises a
    ConnectionError that names no cause.
    """
    import ray.exceptions
    from ray._raylet import GcsClient

    try:
        GcsClient(address=address)
    except ray.exceptions.AuthenticationError as exc:
        return exc.message
    return None


def _auth_advice(address: str) -> str:
    token = "its token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return (
            f"the Ray cluster at {address} refused the connection: authentication required; "
            f"set RAY_AUTH_MODE=token and {token} here and on every node - {SEE}"
        )
    return (
        f"the Ray cluster at {address} refused the connection: authentication failed, this "
        f"process's token is not the cluster's; set {token} to the head's token - {SEE}"
    )
