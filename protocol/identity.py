"""Ed25519 identities (pynacl): key files, printable public keys, signing and verification.

A peer's identity is an Ed25519 key pair. Its public key is printed and parsed as ``ed25519:<64 lowercase hex>``
(:func:`format_public_key` / :func:`parse_public_key`), the form used on command lines, in logs and as the DHT
subkey that names a record's owner.

Key files are small text files written with mode 0600 (created atomically; an existing file that is readable by
group or others is refused, like OpenSSH does)::

    # gepo-swarm Ed25519 identity - KEEP SECRET
    # public key: ed25519:3b6a27bc...
    9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60

The last line is the 32-byte secret seed in hex. Comment lines are informational only.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Union

import nacl.bindings
import nacl.exceptions
import nacl.signing

from .errors import ProtocolError, Reason

__all__ = [
    "PUBLIC_KEY_BYTES",
    "SIGNATURE_BYTES",
    "PUBLIC_KEY_PREFIX",
    "Identity",
    "IdentityFileError",
    "format_public_key",
    "parse_public_key",
    "short_key",
    "verify_signature",
    "require_signature",
]

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
SEED_BYTES = 32
PUBLIC_KEY_PREFIX = "ed25519:"
_HEX = frozenset("0123456789abcdefABCDEF")


class IdentityFileError(Exception):
    """A key file cannot be read, parsed, or has unsafe permissions (a local problem, not a protocol rejection)."""


def format_public_key(public_key: bytes) -> str:
    """32 raw bytes -> ``"ed25519:<64 hex>"``."""
    if not isinstance(public_key, (bytes, bytearray)) or len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes")
    return PUBLIC_KEY_PREFIX + bytes(public_key).hex()


def parse_public_key(text: Union[str, bytes]) -> bytes:
    """``"ed25519:<64 hex>"`` -> 32 raw bytes. Raises ``ProtocolError(MALFORMED)`` with a clear message otherwise.

    Hex digits may be upper or lower case; surrounding whitespace is ignored. The key is not checked to be a valid
    curve point here (a bad point simply never verifies a signature).
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError(Reason.MALFORMED, "public key is not ASCII") from None
    if not isinstance(text, str):
        raise ProtocolError(Reason.MALFORMED, f"public key must be a string, got {type(text).__name__}")
    s = text.strip()
    if not s.startswith(PUBLIC_KEY_PREFIX):
        raise ProtocolError(
            Reason.MALFORMED, f"public key must look like 'ed25519:<64 hex chars>', got {_preview(s)!r}"
        )
    hexpart = s[len(PUBLIC_KEY_PREFIX):]
    if len(hexpart) != 2 * PUBLIC_KEY_BYTES or not set(hexpart) <= _HEX:
        raise ProtocolError(
            Reason.MALFORMED,
            f"public key must have exactly {2 * PUBLIC_KEY_BYTES} hex chars after 'ed25519:', got {_preview(s)!r}",
        )
    return bytes.fromhex(hexpart)


def short_key(public_key: bytes) -> str:
    """Short form for logs: ``ed25519:3b6a27bc``."""
    return PUBLIC_KEY_PREFIX + bytes(public_key[:4]).hex()


def _preview(s: str, n: int = 24) -> str:
    return s if len(s) <= n else s[:n] + "..."


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is a valid Ed25519 signature of ``message`` by ``public_key``. Never raises."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        nacl.bindings.crypto_sign_open(bytes(signature) + bytes(message), bytes(public_key))
        return True
    except Exception:  # BadSignatureError, or a ValueError/TypeError/RuntimeError for a bad point
        return False


def require_signature(public_key: bytes, message: bytes, signature: bytes, what: str = "message") -> None:
    """Like :func:`verify_signature` but raises ``ProtocolError(BAD_SIGNATURE)``."""
    if not verify_signature(public_key, message, signature):
        raise ProtocolError(Reason.BAD_SIGNATURE, f"{what} signature does not verify")


class Identity:
    """An Ed25519 key pair.

    >>> me = Identity.generate()
    >>> sig = me.sign(b"hello")
    >>> verify_signature(me.public_key, b"hello", sig)
    True
    """

    __slots__ = ("_signing_key", "public_key", "public_key_str")

    def __init__(self, signing_key: nacl.signing.SigningKey):
        if not isinstance(signing_key, nacl.signing.SigningKey):
            raise TypeError("Identity wraps a nacl.signing.SigningKey; use generate()/from_seed()/load()")
        self._signing_key = signing_key
        #: 32 raw bytes
        self.public_key: bytes = bytes(signing_key.verify_key)
        #: ``"ed25519:<hex>"``
        self.public_key_str: str = format_public_key(self.public_key)

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def generate(cls) -> "Identity":
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> "Identity":
        """Deterministic identity from a 32-byte seed (tests, or keys kept in a secret store)."""
        if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
            raise ValueError(f"seed must be {SEED_BYTES} bytes")
        return cls(nacl.signing.SigningKey(bytes(seed)))

    @property
    def seed(self) -> bytes:
        """The 32-byte secret seed. Handle with care."""
        return bytes(self._signing_key)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Identity":
        """Load a key file. Raises :class:`IdentityFileError` if missing, unparsable, or group/other-accessible."""
        p = Path(path)
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            raise IdentityFileError(f"key file {p} does not exist") from None
        except OSError as e:
            raise IdentityFileError(f"cannot open key file {p}: {e}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IdentityFileError(f"key file {p} is not a regular file")
            if os.name == "posix" and st.st_mode & 0o077:
                raise IdentityFileError(
                    f"key file {p} has permissions {stat.S_IMODE(st.st_mode):04o}; it must not be accessible by "
                    f"group or others. Fix with: chmod 600 {p}"
                )
            raw = os.read(fd, 4096)
        finally:
            os.close(fd)
        lines = [ln.strip() for ln in raw.decode("utf-8", errors="replace").splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
        if len(lines) != 1 or len(lines[0]) != 2 * SEED_BYTES or not set(lines[0]) <= _HEX:
            raise IdentityFileError(f"key file {p} is not a gepo-swarm Ed25519 key file (expected one line of hex)")
        return cls.from_seed(bytes.fromhex(lines[0]))

    @classmethod
    def load_or_create(cls, path: Union[str, os.PathLike]) -> "Identity":
        """Load the key file at ``path``, or create it (mode 0600, parent dirs 0700) with a fresh key.

        Creation is atomic and race-safe: a temporary file is written, fsynced and hard-linked into place; if
        another process created the file first, that file is loaded instead.
        """
        p = Path(path)
        if p.exists():
            return cls.load(p)
        try:
            cls.generate().save(p)
        except FileExistsError:  # lost a creation race: use the winner's key
            pass
        return cls.load(p)

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write this identity to a new key file with mode 0600. Never overwrites (FileExistsError if present)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        text = (
            "# gepo-swarm Ed25519 identity - KEEP SECRET\n"
            f"# public key: {self.public_key_str}\n"
            f"{self.seed.hex()}\n"
        ).encode()
        fd, tmp = tempfile.mkstemp(prefix=".tmp-key-", dir=p.parent)  # mkstemp creates with 0600
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, text)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            try:
                os.link(tmp, p)  # atomic, fails if p exists
            except FileExistsError:
                raise
            except OSError:  # filesystem without hard links: fall back to exclusive create
                fd2 = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.fchmod(fd2, 0o600)
                    os.write(fd2, text)
                    os.fsync(fd2)
                finally:
                    os.close(fd2)
        finally:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    # --- signing ------------------------------------------------------------------------------------------------
    def sign(self, message: bytes) -> bytes:
        """64-byte detached Ed25519 signature of ``message``."""
        return self._signing_key.sign(bytes(message)).signature

    def verify(self, message: bytes, signature: bytes) -> bool:
        return verify_signature(self.public_key, message, signature)

    def __repr__(self) -> str:
        return f"Identity({short_key(self.public_key)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Identity) and other.public_key == self.public_key

    def __hash__(self) -> int:
        return hash(self.public_key)
