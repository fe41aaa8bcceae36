"""An independent check of a clearing result: a certificate anyone can run without the solver.

`verify_result(request, grid, document)` recomputes everything from the
orders, the grid and the result's own numbers, and raises
`VerificationError` naming the first violation of:

1. orders: every order listed once (the utility's standing orders too, see
   `rules.with_standing_orders`), 0 <= accepted_wh <= energy_wh, whole Wh;
2. balance: accepted sells = accepted buys;
3. lines: the flows of the accepted orders (PTDF x net injections) within
   every limit, the reported `flow_w` equal to them and within `capacity_w`;
   a line marked `binding` within its rounding allowance of the limit (1 Wh
   on a radial network, whose flows are whole Wh; 2 x (lines + 1) x the
   line's largest |PTDF| Wh on a meshed one, what whole-Wh rounding of the
   few marginal steps can leave);
4. equilibrium, order by order against its node's price: a fully accepted
   buy has limit >= price, a rejected buy <=, a partly accepted one =, and the
   mirror for sells;
5. prices differ only through binding lines: pi_n = pi_slack - sum_l
   PTDF[l, n] mu_l within 1 micro (the rounding of the prices), with
   mu_l = `shadow_price_micro_per_kwh` non-zero only on binding lines and
   signed like the line's flow; and where no line has a shadow price, the
   one price is the midpoint rule's (see `services.matcher.domain.prices`);
6. trades: a buy and a sell order each, positive whole Wh, summing per order
   to its accepted energy, at most accepted buys + accepted sells - 1;
7. `welfare_nano` and `congestion_rent_nano` recomputed exactly.

These conditions make the allocation welfare-optimal for the grid whose
binding lines are limited to the flows they carry: by LP duality it is
within sum_l |mu_l| x (limit_l - |flow_l|) of the optimum, which the report
states as `welfare_gap_bound_nano`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from services.domain.grid import Grid
from services.domain.units import price_decimal_from_micro
from services.matcher.domain.orders import ClearingInput
from services.matcher.domain.rules import midpoint_rule, rounding_allowance_wh, with_standing_orders

FloatArray = npt.NDArray[np.float64]

FLOW_TOLERANCE_WH = 1e-6
FLOW_REPORT_TOLERANCE_W = 0.002
PRICE_TOLERANCE_MICRO = 1.0


class VerificationError(ValueError):
    """The first rule a result breaks, named with the order, node or line concerned."""


@dataclass(frozen=True, slots=True)
class VerificationReport:
    orders: int
    trades: int
    binding_lines: int
    welfare_nano: int
    welfare_gap_bound_nano: float


def verify_result(request: ClearingInput, grid: Grid, document: Mapping[str, Any]) -> VerificationReport:
    """Check `document` (a parsed RESULT.json) against the orders and the grid; raise on the first violation."""
    for key in ("welfare_nano", "congestion_rent_nano", "nodes", "lines", "orders", "trades"):
        if key not in document:
            raise VerificationError(f"result: the field {key!r} is missing")
    request = with_standing_orders(request, grid)
    count = len(request)
    order_ids = list(request.order_ids)
    row_of = {order_id: row for row, order_id in enumerate(order_ids)}
    energy = np.asarray(request.energy_wh, dtype=np.int64)
    price = np.asarray(request.price_micro_per_kwh, dtype=np.int64)
    is_buy = np.asarray(request.is_buy, dtype=bool)
    node = np.asarray(request.node_index, dtype=np.int64)

    # 1. Orders.
    accepted = np.full(count, -1, dtype=np.int64)
    for entry in _entries(document, "orders", ("order_id", "accepted_wh")):
        order_id = entry["order_id"]
        if order_id not in row_of:
            raise VerificationError(f"order {order_id!r}: not in the order book")
        row = row_of[order_id]
        if accepted[row] != -1:
            raise VerificationError(f"order {order_id!r}: listed twice")
        value = _whole(entry["accepted_wh"], f"order {order_id!r}: accepted_wh")
        if value < 0:
            raise VerificationError(f"order {order_id!r}: accepted_wh {value} is negative")
        if value > energy[row]:
            raise VerificationError(
                f"order {order_id!r}: accepted_wh {value} exceeds its energy_wh {int(energy[row])} (over-filled)"
            )
        accepted[row] = value
    missing = np.flatnonzero(accepted < 0)
    if missing.size:
        raise VerificationError(f"order {order_ids[int(missing[0])]!r}: missing from the result")

    # 2. Balance.
    bought = int(accepted[is_buy].sum())
    sold = int(accepted[~is_buy].sum())
    if bought != sold:
        raise VerificationError(f"balance: accepted buys total {bought} Wh but accepted sells {sold} Wh")

    # 3. Lines.
    node_count = len(grid.nodes)
    injection = np.bincount(node, weights=np.where(is_buy, -accepted, accepted), minlength=node_count)
    flows_wh = grid.flows_wh(injection) if len(grid.lines) else np.zeros(0)
    limits = grid.line_limits_wh
    to_w = 60.0 / grid.interval_minutes
    allowance = rounding_allowance_wh(grid)
    reported_lines = _by_id(document, "lines", "line_id", grid.line_ids, ("flow_w", "binding"))
    binding = np.zeros(len(grid.lines), dtype=bool)
    shadow = np.zeros(len(grid.lines))
    for index, line in enumerate(grid.lines):
        entry = reported_lines[line.id]
        reported_w = _number(entry["flow_w"], f"line {line.id}: flow_w")
        if abs(flows_wh[index]) > limits[index] + FLOW_TOLERANCE_WH:
            raise VerificationError(
                f"line {line.id}: the accepted orders make it carry {flows_wh[index]:.6f} Wh "
                f"({flows_wh[index] * to_w:.3f} W), beyond its limit of {limits[index]:.6f} Wh "
                f"(capacity_w {line.capacity_w}) (overloaded)"
            )
        if abs(reported_w) > line.capacity_w + 1e-3:
            raise VerificationError(
                f"line {line.id}: flow_w {entry['flow_w']} exceeds its capacity_w {line.capacity_w} (overloaded)"
            )
        if abs(reported_w - flows_wh[index] * to_w) > FLOW_REPORT_TOLERANCE_W:
            raise VerificationError(
                f"line {line.id}: flow_w {reported_w} does not match the accepted orders' "
                f"{flows_wh[index] * to_w:.3f} W"
            )
        if not isinstance(entry["binding"], bool):
            raise VerificationError(f"line {line.id}: binding must be true or false")
        binding[index] = entry["binding"]
        shadow[index] = _number(entry.get("shadow_price_micro_per_kwh", 0), f"line {line.id}: shadow price")
        gap = limits[index] - abs(flows_wh[index])
        if binding[index] and gap > allowance[index] + FLOW_TOLERANCE_WH:
            raise VerificationError(
                f"line {line.id}: marked binding but its flow is {gap:.6f} Wh below its limit "
                f"(allowance {allowance[index]:.6f} Wh)"
            )

    # 4. Equilibrium per order.
    reported_nodes = _by_id(document, "nodes", "node_id", grid.node_ids, ("price_micro_per_kwh",))
    node_price = np.array(
        [
            _whole(reported_nodes[node_id]["price_micro_per_kwh"], f"node {node_id}: price_micro_per_kwh")
            for node_id in grid.node_ids
        ],
        dtype=np.int64,
    )
    at_node = node_price[node] if count else np.zeros(0, dtype=np.int64)
    full = accepted == energy
    rejected = accepted == 0
    partial = ~(full | rejected)
    # For a buy the limit must be >= the price when filled, <= when rejected; mirrored for sells.
    above = np.where(is_buy, price - at_node, at_node - price)
    broken = (full & (above < 0)) | (rejected & (above > 0)) | (partial & (above != 0))
    if broken.any():
        row = int(np.flatnonzero(broken)[0])
        state = "fully accepted" if full[row] else "rejected" if rejected[row] else "partly accepted"
        side = "buy" if is_buy[row] else "sell"
        relation = {True: "below", False: "above"}[bool(price[row] < at_node[row])]
        if partial[row]:
            relation = "not equal to"
        raise VerificationError(
            f"order {order_ids[row]!r}: {side} {state} with limit {price_decimal_from_micro(int(price[row]))} "
            f"per kWh {relation} its node {grid.node_ids[int(node[row])]}'s price "
            f"{price_decimal_from_micro(int(at_node[row]))} (not an equilibrium)"
        )

    # 5. Price differences explained by binding lines.
    for index, line in enumerate(grid.lines):
        if shadow[index] == 0:
            continue
        if not binding[index]:
            raise VerificationError(f"line {line.id}: has a shadow price but is not binding")
        if abs(flows_wh[index]) > FLOW_TOLERANCE_WH and np.sign(shadow[index]) != np.sign(flows_wh[index]):
            raise VerificationError(
                f"line {line.id}: shadow price {shadow[index]} has the opposite sign of its flow {flows_wh[index]:.3f} Wh"
            )
    if len(grid.lines):
        explained = node_price[grid.slack_index] - grid.ptdf().T @ shadow
    else:
        explained = np.full(node_count, float(node_price[grid.slack_index]))
    # Shadow prices are reported to 1e-3 micro: allow that rounding through the PTDF too.
    slack_room = (
        PRICE_TOLERANCE_MICRO + 1e-6 + 0.0005 * np.abs(grid.ptdf()).sum(axis=0) if len(grid.lines) else 1.0
    )
    mismatch = np.abs(node_price - explained) > slack_room
    if np.any(mismatch):
        index = int(np.flatnonzero(mismatch)[0])
        raise VerificationError(
            f"node {grid.node_ids[index]}: price {int(node_price[index])} micro per kWh is not explained by the "
            f"binding lines (slack price minus PTDF x shadow prices gives {explained[index]:.3f})"
        )
    if not np.any(shadow):
        if np.any(node_price != node_price[0]):
            index = int(np.flatnonzero(node_price != node_price[0])[0])
            raise VerificationError(
                f"node {grid.node_ids[index]}: price differs from node {grid.node_ids[0]}'s "
                "although no line has a shadow price"
            )
        floors = np.where(is_buy, rejected, full) | partial
        ceilings = np.where(is_buy, full, rejected) | partial
        low = int(price[floors].max()) if floors.any() else None
        high = int(price[ceilings].min()) if ceilings.any() else None
        expected = midpoint_rule(low, high)
        if node_count and int(node_price[0]) != expected:
            raise VerificationError(
                f"prices: the uncongested price {int(node_price[0])} is not the midpoint rule's {expected} "
                f"(admissible interval {low}..{high} micro per kWh)"
            )

    # 6. Trades.
    trades = _entries(document, "trades", ("buyer_order_id", "seller_order_id", "energy_wh"))
    filled = np.zeros(count, dtype=np.int64)
    rent = 0
    pairs: Counter[tuple[str, str]] = Counter()
    for number, trade in enumerate(trades, start=1):
        buyer, seller = trade["buyer_order_id"], trade["seller_order_id"]
        if buyer not in row_of or not is_buy[row_of[buyer]]:
            raise VerificationError(f"trade {number}: buyer {buyer!r} is not a buy order of the book")
        if seller not in row_of or is_buy[row_of[seller]]:
            raise VerificationError(f"trade {number}: seller {seller!r} is not a sell order of the book")
        amount = _whole(trade["energy_wh"], f"trade {number}: energy_wh")
        if amount <= 0:
            raise VerificationError(f"trade {number}: energy_wh {amount} is not positive")
        pairs[(buyer, seller)] += 1
        if pairs[(buyer, seller)] > 1:
            raise VerificationError(f"trade {number}: {buyer!r} and {seller!r} trade twice")
        filled[row_of[buyer]] += amount
        filled[row_of[seller]] += amount
        rent += amount * (int(at_node[row_of[buyer]]) - int(at_node[row_of[seller]]))
    unequal = np.flatnonzero(filled != accepted)
    if unequal.size:
        row = int(unequal[0])
        raise VerificationError(
            f"order {order_ids[row]!r}: its trades total {int(filled[row])} Wh but it has {int(accepted[row])} Wh accepted"
        )
    accepted_orders = int(np.count_nonzero(accepted))
    if trades and len(trades) > accepted_orders - 1:
        raise VerificationError(
            f"trades: {len(trades)} trades for {accepted_orders} accepted orders (at most {accepted_orders - 1})"
        )

    # 7. Welfare and congestion rent.
    signed_price = np.where(is_buy, price, -price)
    welfare = sum(int(p) * int(a) for p, a in zip(signed_price.tolist(), accepted.tolist(), strict=True) if a)
    if _whole(document["welfare_nano"], "welfare_nano") != welfare:
        raise VerificationError(
            f"welfare_nano {document['welfare_nano']} differs from the recomputed {welfare}"
        )
    if _whole(document["congestion_rent_nano"], "congestion_rent_nano") != rent:
        raise VerificationError(
            f"congestion_rent_nano {document['congestion_rent_nano']} differs from the recomputed {rent}"
        )
    gaps = np.maximum(0.0, limits - np.abs(flows_wh)) if len(grid.lines) else np.zeros(0)
    gap_bound = float(np.sum(np.abs(shadow) * gaps))
    return VerificationReport(count, len(trades), int(binding.sum()), welfare, gap_bound)


def _entries(document: Mapping[str, Any], key: str, fields: Sequence[str]) -> list[Mapping[str, Any]]:
    entries = document[key]
    if not isinstance(entries, list):
        raise VerificationError(f"result: {key} must be a list")
    for position, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise VerificationError(f"result: {key}[{position}] must be an object")
        for name in fields:
            if name not in entry:
                raise VerificationError(f"result: {key}[{position}] lacks {name!r}")
    return entries


def _by_id(
    document: Mapping[str, Any], key: str, id_field: str, expected: Sequence[str], fields: Sequence[str]
) -> dict[str, Mapping[str, Any]]:
    found: dict[str, Mapping[str, Any]] = {}
    for entry in _entries(document, key, (id_field, *fields)):
        identifier = entry[id_field]
        if identifier not in expected:
            raise VerificationError(f"{key}: {identifier!r} is not in the grid")
        if identifier in found:
            raise VerificationError(f"{key}: {identifier!r} is listed twice")
        found[identifier] = entry
    for identifier in expected:
        if identifier not in found:
            raise VerificationError(f"{key}: {identifier!r} is missing from the result")
    return found


def _whole(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise VerificationError(f"{what} must be a whole number, got {value!r}")
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise VerificationError(f"{what} must be a number, got {value!r}")
    return float(value)
