"""The clearing result and its canonical JSON form.

`result_to_dict` gives the JSON document; `result_canonical_bytes` the bytes a
service publishes or hashes: sorted keys, no spaces, UTF-8, and without the
`timings` key, so the same input gives the same bytes on every run and in any
row order. `result_to_json` adds the timings (for files and humans).

Fields: `welfare_nano` (sum over buys of limit price x accepted energy minus
the same over sells), `congestion_rent_nano` (what buyers pay minus what
sellers receive at their node prices), `traded_wh`, `nodes`
(`node_id`, `price_micro_per_kwh`), `lines` (`line_id`, `flow_w`: the
interval's energy flow as average power, `flow_wh * 60 / interval_minutes`,
positive from `from` to `to`, to the milliwatt; `binding`;
`shadow_price_micro_per_kwh`: mu, to a thousandth of a micro), `orders` (`order_id`,
`accepted_wh`, in book order), `trades` (`buyer_order_id`,
`seller_order_id`, `energy_wh`), `solver` (deterministic statistics) and
`timings` (seconds per clearing step).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

FORMAT: Final = "p2pgrid.clearing.v1"

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, eq=False)
class ClearingResult:
    """Everything one clearing decided, as columns (orders in book order)."""

    interval_minutes: int
    order_ids: Sequence[str]
    participant_ids: Sequence[str]
    is_buy: BoolArray
    node_index: npt.NDArray[np.integer]
    accepted_wh: IntArray
    node_ids: tuple[str, ...]
    node_price_micro_per_kwh: IntArray
    line_ids: tuple[str, ...]
    flow_wh: FloatArray
    binding: BoolArray
    shadow_price_micro_per_kwh: FloatArray
    trade_buyer_row: IntArray
    trade_seller_row: IntArray
    trade_energy_wh: IntArray
    welfare_nano: int
    congestion_rent_nano: int
    traded_wh: int
    solver: Mapping[str, int | str] = field(default_factory=dict)
    timings_s: Mapping[str, float] = field(default_factory=dict)

    @property
    def flow_w(self) -> FloatArray:
        """Line flows as average power over the interval: Wh * 60 / interval_minutes."""
        return self.flow_wh * (60.0 / self.interval_minutes)


def result_to_dict(result: ClearingResult, *, timings: bool = True) -> dict[str, Any]:
    order_ids = list(result.order_ids)
    accepted = result.accepted_wh.tolist()
    prices = result.node_price_micro_per_kwh.tolist()
    document: dict[str, Any] = {
        "format": FORMAT,
        "interval_minutes": result.interval_minutes,
        "welfare_nano": int(result.welfare_nano),
        "congestion_rent_nano": int(result.congestion_rent_nano),
        "traded_wh": int(result.traded_wh),
        "nodes": [
            {"node_id": node_id, "price_micro_per_kwh": price}
            for node_id, price in zip(result.node_ids, prices, strict=True)
        ],
        "lines": [
            {
                "line_id": line_id,
                "flow_w": _number(flow, 3),
                "binding": bool(binding),
                "shadow_price_micro_per_kwh": _number(shadow, 3),
            }
            for line_id, flow, binding, shadow in zip(
                result.line_ids,
                result.flow_w.tolist(),
                result.binding.tolist(),
                result.shadow_price_micro_per_kwh.tolist(),
                strict=True,
            )
        ],
        "orders": [
            {"order_id": order_id, "accepted_wh": energy}
            for order_id, energy in zip(order_ids, accepted, strict=True)
        ],
        "trades": [
            {"buyer_order_id": order_ids[buyer], "seller_order_id": order_ids[seller], "energy_wh": energy}
            for buyer, seller, energy in zip(
                result.trade_buyer_row.tolist(),
                result.trade_seller_row.tolist(),
                result.trade_energy_wh.tolist(),
                strict=True,
            )
        ],
        "solver": dict(result.solver),
    }
    if timings:
        document["timings"] = {name: round(seconds, 6) for name, seconds in result.timings_s.items()}
    return document


def result_canonical_bytes(result: ClearingResult) -> bytes:
    """The deterministic bytes of a result (no timings): what a service publishes."""
    return canonical_json(result_to_dict(result, timings=False)).encode("utf-8")


def result_digest(result: ClearingResult) -> str:
    """SHA-256 (hex) of the canonical bytes: equal for equal results, whatever the timings."""
    return hashlib.sha256(result_canonical_bytes(result)).hexdigest()


def result_to_json(result: ClearingResult, *, timings: bool = True) -> str:
    """The result as canonical JSON text, with the timings unless told otherwise."""
    return canonical_json(result_to_dict(result, timings=timings))


def canonical_json(document: Mapping[str, Any]) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _number(value: float, decimals: int) -> int | float:
    """A float rounded to `decimals`, written as an integer when it is whole (no "-0.0", no "1e-07")."""
    rounded = round(value, decimals)
    if rounded == int(rounded):
        return int(rounded)
    return rounded
