"""The per-deployment secret that drives hardening. Never printed, logged or exported; only its fingerprint is."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from ..errors import QcbguardError
from .rng import tensor_key

__all__ = ["SEED_BYTES", "DeploymentSeed", "SeedFileError"]

SEED_BYTES = 32
_FINGERPRINT_DOMAIN = b"qcbguard-seed-fingerprint\x00"


class SeedFileError(QcbguardError):
    """A seed file that is missing, malformed or readable by others."""


class DeploymentSeed:
    """256 bits of secret randomness. Fresh from the OS by default; a seed file makes a run reproducible."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if len(secret) != SEED_BYTES:
            raise SeedFileError(f"a deployment seed holds {SEED_BYTES} bytes, got {len(secret)}")
        self._secret = bytes(secret)

    @classmethod
    def fresh(cls) -> DeploymentSeed:
        return cls(os.urandom(SEED_BYTES))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> DeploymentSeed:
        """Read a seed file: 64 hex characters (whitespace ignored). Refused when group or others can read it."""
        p = Path(path)
        try:
            mode = p.stat().st_mode
            text = p.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SeedFileError(f"cannot read seed file {str(p)!r}: {exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SeedFileError(
                f"seed file {str(p)!r} is accessible to group or others (mode {stat.filemode(mode)}); "
                f"run `chmod 600 {p}` first"
            )
        try:
            secret = bytes.fromhex(text)
        except ValueError:
            raise SeedFileError(f"seed file {str(p)!r} must hold {2 * SEED_BYTES} hex characters") from None
        return cls(secret)

    def write(self, path: str | os.PathLike[str]) -> None:
        """Create a new seed file readable by its owner only; an existing file is never overwritten."""
        p = Path(path)
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise SeedFileError(f"seed file {str(p)!r} already exists; remove it or choose another path") from None
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(self._secret.hex() + "\n")

    @property
    def fingerprint(self) -> str:
        """A public identifier of the seed (16 hex digits of a domain-separated SHA-256): safe to log and export."""
        return hashlib.sha256(_FINGERPRINT_DOMAIN + self._secret).hexdigest()[:16]

    def key_for(self, tensor_name: str) -> int:
        """The Philox key of one tensor."""
        return tensor_key(self._secret, tensor_name)

    def __repr__(self) -> str:
        return f"DeploymentSeed(fingerprint={self.fingerprint})"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a DeploymentSeed is not serializable: pass the seed file path instead")
