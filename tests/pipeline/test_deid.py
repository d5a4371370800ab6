"""Pseudonymous ids: keyed, stable, salt-dependent, never containing the source value."""

from __future__ import annotations

from pipeline import deid


def test_subject_id_stable_and_keyed(monkeypatch):
    monkeypatch.delenv(deid.SALT_ENV, raising=False)
    salt = deid.resolve_salt()
    a = deid.subject_id("1234567", salt)
    assert a == deid.subject_id(" 1234567 ", salt)  # stable, whitespace-insensitive
    assert a != deid.subject_id("1234568", salt)
    monkeypatch.setenv(deid.SALT_ENV, "clinic-secret")
    assert a != deid.subject_id("1234567", deid.resolve_salt())
    assert a.startswith("s-") and len(a) == 18 and "1234567" not in a


def test_salt_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(deid.SALT_ENV, "from-env")
    assert deid.resolve_salt() == b"from-env"
    monkeypatch.setenv(deid.SALT_ENV, "")  # empty is unset: the built-in key, never b""
    assert deid.resolve_salt() not in (b"", b"from-env") and deid.is_builtin(deid.resolve_salt())


def test_image_id_depends_on_source_and_frame():
    salt = b"k"
    ids = {deid.image_id("CNV/CNV-6875371-1.jpeg", f, salt) for f in range(3)}
    ids.add(deid.image_id("CNV/CNV-6875371-2.jpeg", 0, salt))
    assert len(ids) == 4 and not any("6875371" in i for i in ids)
