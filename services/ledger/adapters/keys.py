"""The ledger's Ed25519 key on disk, and public keys as users pass them on the command line."""

from __future__ import annotations

import base64
import binascii
import os
import re
from pathlib import Path

from nacl.signing import SigningKey


class LedgerKeyError(ValueError):
    """A key that cannot be read; the message says what was expected."""


def load_or_create_signing_key(path: str | Path) -> SigningKey:
    """The signing key whose 32-byte seed is stored as hex in `path`; created (mode 0600) if missing."""
    path = Path(path)
    if path.exists():
        text = path.read_text().strip()
        if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
            raise LedgerKeyError(f"{path}: expected a 32-byte Ed25519 seed as 64 hex digits")
        return SigningKey(bytes.fromhex(text))
    path.parent.mkdir(parents=True, exist_ok=True)
    key = SigningKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(bytes(key).hex() + "\n")
    return key


def public_key_hex(key: SigningKey) -> str:
    return bytes(key.verify_key).hex()


def parse_public_key(value: str) -> bytes:
    """A 32-byte Ed25519 public key from hex, base64, or a file holding either."""
    text = value.strip()
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        candidate = Path(text)
        if candidate.is_file():
            text = candidate.read_text().strip()
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) == 32:
        return raw
    raise LedgerKeyError(
        f"{value!r} is not an Ed25519 public key: give 64 hex digits, base64 of 32 bytes, or a file holding one"
    )
