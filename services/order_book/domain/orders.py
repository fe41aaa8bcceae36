"""Orders as the order book sees them: the signed body, its canonical bytes, its states and its receipt.

The canonical bytes are what a participant signs with its Ed25519 key. They
are a fixed binary layout, never a protobuf serialisation (which is not
canonical), with every integer big-endian:

    b"p2pgrid/order/v1\\x00"                  17 bytes, domain separation
    u16 length, UTF-8 bytes of client_order_id
    u8  side (1 = buy, 2 = sell)
    u16 length, UTF-8 bytes of node_id
    i64 interval_start_s
    i64 energy_wh
    i64 price_micro_per_kwh

The participant is not part of the bytes: the key that signs them is the
participant (its id is derived from the key), and the acting participant of a
call must be that key's owner.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

ORDER_MAGIC = b"p2pgrid/order/v1\x00"
CLIENT_ORDER_ID_MAX_CHARS = 64
_CLIENT_ORDER_ID = re.compile(r"[A-Za-z0-9._:\-]{1,64}")
# One packer per (client_order_id, node_id) length pair: the whole layout in one call.
_LAYOUTS: dict[tuple[int, int], struct.Struct] = {}
_I64_MIN = -(2**63)
_I64_MAX = 2**63 - 1


class Side(IntEnum):
    """Buy or sell; the values are those of `p2pgrid.common.v1.Side`."""

    BUY = 1
    SELL = 2


class OrderState(IntEnum):
    """Where an order is in its life; the values are those of `p2pgrid.orderbook.v1.OrderState`."""

    LIVE = 1
    CANCELLED = 2
    FROZEN = 3
    FILLED = 4


class OrderBody(NamedTuple):
    """The part of an order its owner signs (a tuple: immutable and cheap to make, thousands a second)."""

    client_order_id: str
    side: Side
    node_id: str
    interval_start_s: int
    energy_wh: int
    price_micro_per_kwh: int


def canonical_order_bytes(body: OrderBody) -> bytes:
    """The bytes an order's signature covers (layout in the module docstring)."""
    return encode_order(
        body.client_order_id,
        int(body.side),
        body.node_id,
        body.interval_start_s,
        body.energy_wh,
        body.price_micro_per_kwh,
    )


def encode_order(
    client_order_id: str,
    side: int,
    node_id: str,
    interval_start_s: int,
    energy_wh: int,
    price_micro_per_kwh: int,
) -> bytes:
    """`canonical_order_bytes` from plain values; raises ValueError for values the layout cannot hold."""
    cid = client_order_id.encode()
    node = node_id.encode()
    cid_len = len(cid)
    node_len = len(node)
    if cid_len > 0xFFFF or node_len > 0xFFFF or not 0 <= side <= 0xFF:
        raise ValueError("client_order_id and node_id must be shorter than 65536 bytes, side one byte")
    layout = _LAYOUTS.get((cid_len, node_len))
    if layout is None:
        layout = _LAYOUTS[(cid_len, node_len)] = struct.Struct(
            f">{len(ORDER_MAGIC)}sH{cid_len}sBH{node_len}sqqq"
        )
    return layout.pack(
        ORDER_MAGIC, cid_len, cid, side, node_len, node, interval_start_s, energy_wh, price_micro_per_kwh
    )


def is_valid_client_order_id(value: str) -> bool:
    return _CLIENT_ORDER_ID.fullmatch(value) is not None


def fits_i64(value: int) -> bool:
    return _I64_MIN <= value <= _I64_MAX


@dataclass(frozen=True, slots=True)
class Receipt:
    """The answer to an accepted order; repeats of its client_order_id get the same receipt."""

    order_id: str
    client_order_id: str
    book_seq: int
    accepted_at_s: int


class SignedOrder(NamedTuple):
    """An order body with its signature, as received; stored once checked and verified."""

    body: OrderBody
    signature: bytes


@dataclass(frozen=True, slots=True)
class OrderRecord:
    """An order as stored in the book."""

    order_id: str
    participant_id: str
    body: OrderBody
    signature: bytes
    state: OrderState
    book_seq: int
    accepted_at_s: int
    accepted_wh: int | None = None
    fill_price_micro_per_kwh: int | None = None
    replaces_order_id: str | None = None
    replaced_by_order_id: str | None = None

    def receipt(self) -> Receipt:
        return Receipt(self.order_id, self.body.client_order_id, self.book_seq, self.accepted_at_s)


@dataclass(frozen=True, slots=True)
class Participant:
    """A registered key at a grid node."""

    participant_id: str
    public_key: bytes
    node_id: str
    display_name: str
    registered_at_s: int


@dataclass(frozen=True, slots=True)
class Meter:
    meter_id: str
    participant_id: str
    node_id: str
    registered_at_s: int


@dataclass(frozen=True, slots=True)
class Fill:
    """What one order got in its interval's clearing; `fill_seq` increases across the market."""

    fill_seq: int
    order_id: str
    participant_id: str
    client_order_id: str
    interval_start_s: int
    side: Side
    node_id: str
    energy_wh: int
    accepted_wh: int
    price_micro_per_kwh: int
