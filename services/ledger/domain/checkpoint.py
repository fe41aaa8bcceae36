"""Signed checkpoints: the ledger's Ed25519 signature over its Merkle root, chain head and size.

Signed bytes, version 1: seven lines, each ending in a single `\\n`, ASCII:

    p2pgrid-ledger-checkpoint-v1
    origin <origin>
    tree_size <number of transfers covered>
    root_hash <RFC 9162 Merkle root, 64 lower-case hex digits>
    chain_head <chained_hash of the last covered transfer, 64 hex digits>
    time_ms <milliseconds since the Unix epoch, UTC>
    previous <SHA-256 of the previous checkpoint's signed bytes, or 64 zeros for the first>

The signature is Ed25519 (RFC 8032) over exactly these bytes. Because every
checkpoint names its predecessor, the checkpoints form a chain of their own:
one removed from the middle, or a history rewritten and re-signed, shows.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from services.ledger.domain.merkle import ProofError, verify_consistency

CHECKPOINT_FORMAT = "p2pgrid-ledger-checkpoint-v1"
ORIGIN_PATTERN = r"[A-Za-z0-9._:/\-]{1,100}"
_ORIGIN_RE = re.compile(ORIGIN_PATTERN)
NO_PREVIOUS = bytes(32)


class CheckpointError(ValueError):
    """A checkpoint that is malformed, badly signed, or signed by another key."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    origin: str
    tree_size: int
    root_hash: bytes
    chain_head: bytes
    time_ms: int
    previous_hash: bytes
    public_key: bytes
    signature: bytes

    def signed_bytes(self) -> bytes:
        return checkpoint_body(
            self.origin, self.tree_size, self.root_hash, self.chain_head, self.time_ms, self.previous_hash
        )

    def checkpoint_hash(self) -> bytes:
        """What the next checkpoint names as `previous`."""
        return hashlib.sha256(self.signed_bytes()).digest()

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "origin": self.origin,
            "tree_size": self.tree_size,
            "root_hash": self.root_hash.hex(),
            "chain_head": self.chain_head.hex(),
            "time_ms": self.time_ms,
            "previous": self.previous_hash.hex(),
            "public_key": self.public_key.hex(),
            "signature": self.signature.hex(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Checkpoint:
        """Parse the JSON form; raises CheckpointError naming the first bad field."""
        if not isinstance(data, Mapping):
            raise CheckpointError("checkpoint must be a JSON object")
        if data.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"checkpoint.format must be {CHECKPOINT_FORMAT!r}, got {data.get('format')!r}"
            )
        return cls(
            origin=_text(data, "origin"),
            tree_size=_int(data, "tree_size"),
            root_hash=_hex(data, "root_hash", 32),
            chain_head=_hex(data, "chain_head", 32),
            time_ms=_int(data, "time_ms"),
            previous_hash=_hex(data, "previous", 32),
            public_key=_hex(data, "public_key", 32),
            signature=_hex(data, "signature", 64),
        )


def _text(data: Mapping[str, Any], field: str) -> str:
    value = data.get(field)
    if not isinstance(value, str):
        raise CheckpointError(f"checkpoint.{field} must be a string")
    return value


def _int(data: Mapping[str, Any], field: str) -> int:
    value = data.get(field)
    if type(value) is not int or value < 0:
        raise CheckpointError(f"checkpoint.{field} must be a non-negative integer, got {value!r}")
    return value


def _hex(data: Mapping[str, Any], field: str, size: int) -> bytes:
    value = _text(data, field)
    if not re.fullmatch(r"[0-9a-f]*", value) or len(value) != 2 * size:
        raise CheckpointError(f"checkpoint.{field} must be {2 * size} lower-case hex digits")
    return bytes.fromhex(value)


def checkpoint_body(
    origin: str, tree_size: int, root_hash: bytes, chain_head: bytes, time_ms: int, previous_hash: bytes
) -> bytes:
    """The exact bytes a checkpoint's signature covers."""
    if not _ORIGIN_RE.fullmatch(origin):
        raise CheckpointError(f"origin {origin!r} must match {ORIGIN_PATTERN}")
    if tree_size < 0 or time_ms < 0:
        raise CheckpointError("tree_size and time_ms must not be negative")
    if len(root_hash) != 32 or len(chain_head) != 32 or len(previous_hash) != 32:
        raise CheckpointError("root_hash, chain_head and previous must be 32 bytes")
    return (
        f"{CHECKPOINT_FORMAT}\n"
        f"origin {origin}\n"
        f"tree_size {tree_size}\n"
        f"root_hash {root_hash.hex()}\n"
        f"chain_head {chain_head.hex()}\n"
        f"time_ms {time_ms}\n"
        f"previous {previous_hash.hex()}\n"
    ).encode("ascii")


def sign_checkpoint(
    key: SigningKey,
    *,
    origin: str,
    tree_size: int,
    root_hash: bytes,
    chain_head: bytes,
    time_ms: int,
    previous_hash: bytes,
) -> Checkpoint:
    body = checkpoint_body(origin, tree_size, root_hash, chain_head, time_ms, previous_hash)
    return Checkpoint(
        origin=origin,
        tree_size=tree_size,
        root_hash=root_hash,
        chain_head=chain_head,
        time_ms=time_ms,
        previous_hash=previous_hash,
        public_key=bytes(key.verify_key),
        signature=key.sign(body).signature,
    )


def verify_checkpoint(checkpoint: Checkpoint, trusted_public_key: bytes | None = None) -> None:
    """Raise CheckpointError unless the checkpoint is well formed and signed by its (trusted) key."""
    if trusted_public_key is not None and checkpoint.public_key != trusted_public_key:
        raise CheckpointError(
            f"checkpoint of size {checkpoint.tree_size} is signed by key {checkpoint.public_key.hex()}, "
            f"not by the trusted ledger key {trusted_public_key.hex()}"
        )
    try:
        body = checkpoint.signed_bytes()
        VerifyKey(checkpoint.public_key).verify(body, checkpoint.signature)
    except BadSignatureError as exc:
        raise CheckpointError(
            f"checkpoint of size {checkpoint.tree_size}: signature does not verify"
        ) from exc
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint of size {checkpoint.tree_size}: {exc}") from exc


def verify_checkpoint_consistency(
    old: Checkpoint, new: Checkpoint, proof: Sequence[bytes], trusted_public_key: bytes
) -> None:
    """Raise CheckpointError unless both checkpoints are the trusted ledger's and `new` extends `old`.

    This is what a participant holding an older checkpoint runs on a newer one:
    a ledger that rewrote or forked its history cannot produce a proof that passes.
    """
    verify_checkpoint(old, trusted_public_key)
    verify_checkpoint(new, trusted_public_key)
    if old.origin != new.origin:
        raise CheckpointError(f"checkpoints of different ledgers: {old.origin!r} and {new.origin!r}")
    try:
        verify_consistency(old.tree_size, new.tree_size, old.root_hash, new.root_hash, proof)
    except ProofError as exc:
        raise CheckpointError(
            f"checkpoint of size {new.tree_size} does not extend the checkpoint of size {old.tree_size}: {exc}"
        ) from exc
