"""The canonical encoding of a transfer and the hash chain every transfer is appended to.

Entry (the bytes that are hashed), version 1, ASCII:

    p2pgrid-transfer-v1|<transfer_id>|<debit_account>|<credit_account>|<amount_nano>|<code>|<interval_start_s>|<linked_group>|<flags>

Integers are written in decimal without sign, leading zeros or separators;
`linked_group` is empty for a transfer that stands alone. No field can
contain `|` (see the patterns in `ledger.py`), so the encoding is
unambiguous, and it is the same in every language.

Chain, for the transfer with sequence number n = 1, 2, 3, …:

    entry_hash(n)   = SHA-256(0x00 || entry(n))              (the RFC 9162 leaf hash)
    chained_hash(0) = 32 zero bytes
    chained_hash(n) = SHA-256(chained_hash(n − 1) || entry_hash(n))

The leaf at index n − 1 of the ledger's Merkle tree is entry(n).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from services.ledger.domain.hashing import native, sha256
from services.ledger.domain.ledger import (
    ACCOUNT_ID_PATTERN,
    CODE_PATTERN,
    MAX_AMOUNT_NANO,
    MAX_FLAGS,
    TRANSFER_ID_PATTERN,
    Transfer,
    TransferError,
)

ENTRY_PREFIX = "p2pgrid-transfer-v1"
GENESIS_HASH = bytes(32)

_sha256 = sha256

_DECIMAL = r"(?:0|[1-9][0-9]{0,18})"
_ENTRY_RE = re.compile(
    rf"{ENTRY_PREFIX}\|({TRANSFER_ID_PATTERN})\|({ACCOUNT_ID_PATTERN})\|({ACCOUNT_ID_PATTERN})\|"
    rf"({_DECIMAL})\|({CODE_PATTERN})\|({_DECIMAL})\|((?:{TRANSFER_ID_PATTERN})?)\|({_DECIMAL})"
)


def entry_text(t: Transfer) -> str:
    return f"{ENTRY_PREFIX}|{t[0]}|{t[1]}|{t[2]}|{t[3]}|{t[4]}|{t[5]}|{t[6]}|{t[7]}"


def entry_bytes(transfer: Transfer) -> bytes:
    """The canonical entry of a (well-formed) transfer."""
    return entry_text(transfer).encode("ascii")


def parse_entry(entry: str) -> Transfer:
    """The transfer an entry encodes; raises TransferError if it is not a canonical v1 entry."""
    match = _ENTRY_RE.fullmatch(entry)
    if match is None:
        raise TransferError(f"not a canonical {ENTRY_PREFIX} entry: {entry[:200]!r}")
    tid, debit, credit, amount, code, start, group, flags = match.groups()
    transfer = Transfer(tid, debit, credit, int(amount), code, int(start), group, int(flags))
    if transfer.debit_account == transfer.credit_account:
        raise TransferError(f"entry {tid!r}: debit and credit account are the same")
    if not 1 <= transfer.amount_nano <= MAX_AMOUNT_NANO:
        raise TransferError(f"entry {tid!r}: amount_nano {amount} is out of range")
    if transfer.flags > MAX_FLAGS:
        raise TransferError(f"entry {tid!r}: flags {flags} is out of range")
    return transfer


def entry_hash(transfer: Transfer) -> bytes:
    return _sha256(b"\x00" + entry_bytes(transfer)).digest()


def chained_hash(previous: bytes, entry_hash_: bytes) -> bytes:
    return _sha256(previous + entry_hash_).digest()


def leaf_hashes(transfers: Sequence[Transfer]) -> list[bytes]:
    """The entry hashes (RFC 9162 leaf hashes) of well-formed transfers, in order."""
    sha = _sha256
    prefix = f"\x00{ENTRY_PREFIX}|"
    return [
        sha(f"{prefix}{tid}|{debit}|{credit}|{amount}|{code}|{start}|{group}|{flags}".encode()).digest()
        for tid, debit, credit, amount, code, start, group, flags in transfers
    ]


def chain_heads(previous: bytes, leaves: Sequence[bytes]) -> list[bytes]:
    """The chained hashes of the transfers with entry hashes `leaves`, after the chained hash `previous`."""
    sha = _sha256
    heads: list[bytes] = []
    push = heads.append
    for h in leaves:
        previous = sha(previous + h).digest()
        push(previous)
    return heads


def python_leaves_and_heads(transfers: Sequence[Transfer], previous: bytes) -> tuple[bytes, bytes]:
    """`leaf_hashes` and `chain_heads`, each joined into one byte string."""
    leaves = leaf_hashes(transfers)
    return b"".join(leaves), b"".join(chain_heads(previous, leaves))


def leaves_and_heads(transfers: Sequence[Transfer], previous: bytes) -> tuple[bytes, bytes]:
    """As `python_leaves_and_heads`; compiled when built. A field that is neither str nor a 64-bit
    int (which no well-formed transfer has) is written by Python."""
    if native is not None:
        try:
            return native.leaves_and_heads(transfers, previous)
        except (TypeError, OverflowError):
            pass
    return python_leaves_and_heads(transfers, previous)
