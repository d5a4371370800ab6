"""The Makefile checks the interpreter before it installs anything (one line saying what to do)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _interpreter(path: Path, version: str) -> Path:
    """A stand-in interpreter that reports ``version`` (a 3.13 need not be installed here)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho {version}\n")
    path.chmod(0o755)
    return path


def _make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), *args], capture_output=True, text=True
    )


@pytest.mark.parametrize("version", ["3.13", "3.9"])
def test_an_unsupported_python_stops_before_anything_is_installed(tmp_path, version):
    python = _interpreter(tmp_path / "bin" / f"python{version}", version)
    venv = tmp_path / "venv"
    done = _make("install", f"PYTHON={python}", f"VENV={venv}")
    assert done.returncode != 0
    assert done.stdout.strip() == (
        f"make: {python} is Python {version} but retina-vae needs 3.10-3.12: run "
        "'make install PYTHON=python3.12' (or another 3.10-3.12 interpreter)"
    )
    assert not venv.exists()  # no venv made, no torch downloaded


def test_a_stale_venv_of_an_unsupported_python_says_make_clean(tmp_path):
    venv = tmp_path / "venv"
    _interpreter(venv / "bin" / "python", "3.13")  # left by an earlier `make` with python3.13
    done = _make("repro", f"PYTHON={sys.executable}", f"VENV={venv}")
    assert done.returncode != 0
    assert done.stdout.strip() == (
        f"make: {venv} has Python 3.13 but retina-vae needs 3.10-3.12: run 'make clean', "
        "then 'make repro PYTHON=python3.12'"
    )


def test_a_supported_python_passes_the_check(tmp_path):
    done = _make("python-check", f"PYTHON={sys.executable}", f"VENV={tmp_path / 'venv'}")
    assert done.returncode == 0 and done.stdout == ""
