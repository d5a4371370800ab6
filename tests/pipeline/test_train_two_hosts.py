"""Issue 18 on a real two-host Ray cluster (tests/netns.py): auth, Gloo's interface, Jobs."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_bed_has_two_nodes_on_two_addresses(two_hosts):
    probe = "import ray; ray.init(); print(sorted(n['NodeManagerAddress'] for n in ray.nodes()))"
    out = two_hosts.worker.run(
        ["python", "-c", probe], env=two_hosts.env(RAY_ADDRESS=two_hosts.address), timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str([two_hosts.head.ip, two_hosts.worker.ip])
