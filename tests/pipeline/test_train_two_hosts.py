"""Issue 18 on a real two-host Ray cluster (tests/netns.py): token auth, Gloo's interface, Ray
Jobs, object-storage checkpoints. Each stage runs as the user would, `retina-vae train`, inside
one of the two network namespaces."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.slow


def _train(host, params, env) -> tuple[int, list[str], float]:
    """`retina-vae train` on ``host``: (exit code, stderr lines, seconds)."""
    start = time.monotonic()
    done = host.run(["retina-vae", "train", "--params", params], env=env, timeout=300)
    return done.returncode, done.stderr.strip().splitlines(), time.monotonic() - start


def test_bed_has_two_nodes_on_two_addresses(two_hosts):
    probe = "import ray; ray.init(); print(sorted(n['NodeManagerAddress'] for n in ray.nodes()))"
    out = two_hosts.worker.run(
        ["python", "-c", probe], env=two_hosts.env(RAY_ADDRESS=two_hosts.address), timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str([two_hosts.head.ip, two_hosts.worker.ip])


@pytest.mark.parametrize(
    "auth, extra, says",
    [
        # the token file alone (RAY_AUTH_TOKEN_PATH set, RAY_AUTH_MODE not): Ray sends no token
        (False, {}, "authentication required; set RAY_AUTH_MODE=token"),
        (True, {"RAY_AUTH_TOKEN": "0" * 64}, "authentication failed"),
    ],
    ids=["no-auth-mode", "wrong-token"],
)
def test_driver_refused_by_token_auth_says_authentication_in_one_line(
    two_hosts, processed, params_file, auth, extra, says
):
    path = params_file(cluster={"address": two_hosts.address})
    rc, err, seconds = _train(two_hosts.worker, path, two_hosts.env(auth=auth, **extra))
    print(f"one-line auth error after {seconds:.1f} s (stage start included)")
    assert rc == 1
    assert err[-1].startswith("retina-vae train: error: cluster.address: the Ray cluster at ")
    assert says in err[-1] and "\n" not in err[-1]


def test_loopback_collective_address_is_one_line_naming_gloo_socket_ifname(
    two_hosts, processed, params_file
):
    # /etc/hosts on both hosts: "127.0.1.1 <hostname>", Debian's stock line (tests/netns.py)
    path = params_file(cluster={"address": two_hosts.address})
    rc, err, seconds = _train(two_hosts.head, path, two_hosts.env())
    print(f"one-line Gloo error after {seconds:.1f} s")
    assert rc == 1
    assert err[-1].startswith("retina-vae train: error: GLOO_SOCKET_IFNAME: on Ray node ")
    assert "would advertise 127.0.1.1" in err[-1] and "cluster.worker_env" in err[-1]
