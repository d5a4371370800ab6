"""Pseudonymous identifiers: keyed hashes, so no source identifier reaches an output.

``subject_id`` groups a patient's images for splitting without revealing who they are:
HMAC-SHA256 of the source patient ID, keyed with a salt, truncated. The key comes from the
environment variable ``RETINA_VAE_SALT``, else a built-in constant (then the mapping is stable
but guessable by anyone with this code: set a secret salt for real data). Never from params:
DVC copies those into dvc.lock and every experiment.
``image_id`` is the same keyed hash of the relative source path and frame, because file names
(e.g. Kermany's ``CNV-<patient>-<n>.jpeg``) may embed patient numbers.
"""

from __future__ import annotations

import hashlib
import hmac
import os

SALT_ENV = "RETINA_VAE_SALT"
_BUILTIN_SALT = "retina-vae/builtin-salt/v1"


def resolve_salt() -> bytes:
    """The pseudonymisation key: env ``RETINA_VAE_SALT``, else the built-in one."""
    return (os.environ.get(SALT_ENV) or _BUILTIN_SALT).encode()


def salt_fingerprint(salt: bytes) -> str:
    """16 hex of a keyed hash of a fixed text: changes with the key, reveals no more of it
    than any ``subject_id`` does (the sources stage records it, so a new key re-runs ingest)."""
    return _keyed(salt, "salt", "", 16)


def is_builtin(salt: bytes) -> bool:
    """True for the built-in key, with which anyone holding this code can test a guessed
    patient ID against a ``subject_id`` (IDs are short: all of them can be tried)."""
    return salt == _BUILTIN_SALT.encode()


def _keyed(salt: bytes, kind: str, value: str, length: int) -> str:
    digest = hmac.new(salt, f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()
    return digest[:length]


def subject_id(patient_id: str, salt: bytes) -> str:
    """Pseudonymous subject id ``s-<16 hex>`` for a source patient ID (stable for a salt)."""
    return "s-" + _keyed(salt, "subject", patient_id.strip(), 16)


def image_id(source: str, frame: int, salt: bytes) -> str:
    """Pseudonymous image id ``i-<16 hex>`` for a relative source path and frame index."""
    return "i-" + _keyed(salt, "image", f"{source}#{frame}", 16)
