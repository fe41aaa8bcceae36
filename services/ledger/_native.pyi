"""Types of the compiled module built from _native.c (see services/ledger/domain/hashing.py)."""

from collections.abc import Sequence
from typing import Any

IMPLEMENTATION: str

def sha256(data: bytes, /) -> bytes: ...
def leaves_and_heads(transfers: Sequence[Sequence[Any]], previous: bytes, /) -> tuple[bytes, bytes]: ...
def pair_up(nodes: bytes, /) -> bytes: ...
def short_hex_digests(messages: Sequence[str], digits: int, /) -> list[str]: ...
def use_implementation(name: str, /) -> None: ...
def add_totals(
    transfers: Sequence[Sequence[Any]], debited: dict[str, int], credited: dict[str, int], /
) -> None: ...
def copy_rows(first_seq: int, transfers: Sequence[Sequence[Any]], /) -> bytes: ...
def first_settlement_transfers(
    order: list[tuple[str, int, Any, int]],
    transfer_type: type,
    start_s: int,
    limit: int,
    error_type: type[Exception],
    accounts: dict[str, str],
    account_of: Any,
    fee_rates: dict[tuple[str, str], int],
    fee_rate: Any,
    prices: Any,
    state: Any,
    measured: Any,
    fee_by_buyer: bool,
    market: str,
    grid: str,
    utility: str,
    codes: tuple[str, str, str, str, str],
    tags: tuple[str, str, str, str, str],
    estimated_flag: int,
    /,
) -> list[Any]: ...
def plain_json(obj: object, /) -> bytes: ...
def settlement_rows_pass(
    trades: Any,
    accepted: Any,
    meter_energy: Any,
    prices: Any,
    max_energy_wh: int,
    measured: Any,
    estimated: Any,
    /,
) -> bool: ...
