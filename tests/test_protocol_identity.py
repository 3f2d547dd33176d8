"""Identities: key files (0600, atomic, refused when too open), printable keys, signatures."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from protocol.errors import ProtocolError, Reason
from protocol.identity import (
    Identity,
    IdentityFileError,
    format_public_key,
    parse_public_key,
    short_key,
    verify_signature,
)


def test_load_or_create_writes_0600_and_reloads(tmp_path):
    path = tmp_path / "keys" / "sampler.key"
    a = Identity.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) & 0o077 == 0
    b = Identity.load_or_create(path)
    assert a == b and a.public_key == b.public_key
    text = path.read_text()
    assert a.public_key_str in text  # informational comment
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-key-")]  # no temp file left


def test_load_or_create_under_umask_0(tmp_path):
    old = os.umask(0)
    try:
        Identity.load_or_create(tmp_path / "k")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "k").st_mode) == 0o600


def test_refuses_group_readable_key(tmp_path):
    path = tmp_path / "k"
    Identity.load_or_create(path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityFileError, match="chmod 600"):
        Identity.load(path)
    with pytest.raises(IdentityFileError):
        Identity.load_or_create(path)


def test_bad_key_files(tmp_path):
    with pytest.raises(IdentityFileError, match="does not exist"):
        Identity.load(tmp_path / "missing")
    p = tmp_path / "garbage"
    p.write_text("not a key\n")
    os.chmod(p, 0o600)
    with pytest.raises(IdentityFileError, match="not a gepo-swarm"):
        Identity.load(p)
    with pytest.raises(IdentityFileError, match="not a regular file"):
        Identity.load(tmp_path)


def test_save_never_overwrites(tmp_path):
    p = tmp_path / "k"
    Identity.generate().save(p)
    with pytest.raises(FileExistsError):
        Identity.generate().save(p)


def test_concurrent_creation_agrees(tmp_path):
    p = tmp_path / "k"
    out = []
    ts = [threading.Thread(target=lambda: out.append(Identity.load_or_create(p))) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len({i.public_key for i in out}) == 1


def test_printable_public_key_round_trip():
    me = Identity.generate()
    s = me.public_key_str
    assert s.startswith("ed25519:") and len(s) == 8 + 64
    assert parse_public_key(s) == me.public_key
    assert parse_public_key(s.upper().replace("ED25519:", "ed25519:")) == me.public_key
    assert parse_public_key(f"  {s}\n") == me.public_key
    assert parse_public_key(s.encode()) == me.public_key
    assert format_public_key(me.public_key) == s
    assert short_key(me.public_key) == s[:16]


@pytest.mark.parametrize(
    "bad", ["", "ed25519:", "ed25519:abc", "rsa:" + "00" * 32, "ed25519:" + "zz" * 32, "ed25519:" + "00" * 33,
            "00" * 32, None, 5, b"\xff\xfe"],
)
def test_parse_public_key_errors(bad):
    with pytest.raises(ProtocolError) as ei:
        parse_public_key(bad)
    assert ei.value.reason == Reason.MALFORMED
    assert "ed25519" in str(ei.value) or "ASCII" in str(ei.value) or "string" in str(ei.value)


def test_sign_verify():
    me, other = Identity.generate(), Identity.generate()
    sig = me.sign(b"msg")
    assert len(sig) == 64
    assert verify_signature(me.public_key, b"msg", sig) and me.verify(b"msg", sig)
    assert not verify_signature(other.public_key, b"msg", sig)
    assert not verify_signature(me.public_key, b"msg!", sig)
    assert not verify_signature(me.public_key, b"msg", sig[:-1] + bytes([sig[-1] ^ 1]))
    assert not verify_signature(me.public_key, b"msg", sig[:63])
    assert not verify_signature(b"\x00" * 31, b"msg", sig)
    assert not verify_signature(b"\xff" * 32, b"msg", sig)  # not a curve point: False, no exception


def test_from_seed_is_deterministic():
    assert Identity.from_seed(b"\x01" * 32).public_key == Identity.from_seed(b"\x01" * 32).public_key
    with pytest.raises(ValueError):
        Identity.from_seed(b"short")
