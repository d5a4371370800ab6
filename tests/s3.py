"""A local S3-compatible server for checkpoint tests: moto's server mode (PyPI ``moto[server]``),
one fresh process per use, listening on a given address (127.0.0.1, or a test-bed namespace's
address: tests/netns.py), with one bucket made. Nothing leaves the machine.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent
BUCKET = "retina-ckpt"
# made-up credentials: moto accepts any; the stage must still pass them to every Ray worker
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": secrets.token_hex(8),
    "AWS_DEFAULT_REGION": "us-east-1",
}
MAKE_BUCKET = f"""
import time, boto3
for _ in range(240):  # until the server answers
    try:
        boto3.client("s3").create_bucket(Bucket={BUCKET!r}); break
    except Exception as exc:
        last = exc; time.sleep(0.25)
else:
    raise SystemExit(f"moto server did not answer: {{last}}")
"""


@contextmanager
def moto_s3(host: str, port: int, wrap=lambda argv: argv) -> Iterator[dict[str, str]]:
    """Run ``moto_server`` on host:port (``wrap`` prefixes the argv, e.g. ``ip netns exec``);
    yield the AWS_* variables a client needs (endpoint included); stop it afterwards."""
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    proc = subprocess.Popen(
        wrap([str(BIN / "moto_server"), "-H", host, "-p", str(port)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        subprocess.run(
            wrap([sys.executable, "-c", MAKE_BUCKET]),
            env={**os.environ, **env},
            check=True,
            timeout=120,
        )
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
