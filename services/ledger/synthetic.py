"""A reproducible synthetic market day (clearing results and meter data) for the settlement benchmark and tests.

Each interval has node prices (a system price plus congestion at some
nodes), bilateral trades between random participants at their home nodes,
trades with the utility's standing orders, and per participant a meter reading
that deviates a little from what it contracted. A few meters are missing or
estimated at the deadline; their measured data comes later, in `late`.
Everything is in the recorded JSON form that `SettlementInputs.from_json` reads.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from services.domain.intervals import DEFAULT_INTERVAL_S

UTILITY_PARTICIPANT = "utility-standing-orders"


@dataclass(frozen=True, slots=True)
class SyntheticDay:
    participants: tuple[str, ...]
    node_of: dict[str, str]
    rules: dict[str, Any]
    recorded: list[dict[str, Any]]
    """One recorded settlement input per interval, as delivered by the metering deadline."""
    late: list[dict[str, Any]]
    """Re-deliveries with measured data for the intervals that had missing or estimated meters."""


def synthetic_day(
    *,
    participants: int = 1000,
    intervals: int = 96,
    start_s: int = 1_748_736_000,  # 2025-06-01T00:00Z
    interval_s: int = DEFAULT_INTERVAL_S,
    nodes: int = 12,
    seed: int = 7,
    market_id: str = "demo",
    missing_per_interval: int = 3,
    estimated_per_interval: int = 3,
) -> SyntheticDay:
    rng = random.Random(seed)
    node_names = [f"n{i:02d}" for i in range(nodes)]
    feeders = {node: f"f{i % 3}" for i, node in enumerate(node_names)}
    pids = tuple(f"p{rng.getrandbits(160):040x}" for _ in range(participants))
    node_of = {p: node_names[rng.randrange(nodes)] for p in pids}
    rules = {
        "utility_participant_id": UTILITY_PARTICIPANT,
        "retail_tariff_micro_per_kwh": 290_000,
        "feed_in_tariff_micro_per_kwh": 75_000,
        "grid_fee_micro_per_kwh": 61_000,
        "grid_fee_same_feeder_micro_per_kwh": 33_000,
        "grid_fee_same_node_micro_per_kwh": 12_000,
        "feeders": feeders,
        "metering_delay_s": 900,
    }
    recorded: list[dict[str, Any]] = []
    late: list[dict[str, Any]] = []
    for k in range(intervals):
        interval_start_s = start_s + k * interval_s
        system_micro = rng.randrange(90_000, 250_000)
        prices = {node: system_micro for node in node_names}
        for node in rng.sample(node_names, 2):
            prices[node] = system_micro + rng.randrange(-20_000, 40_000)
        order = list(pids)
        rng.shuffle(order)
        half = len(order) // 2
        buyers = order[:half]
        sellers = order[half:]
        trades: list[list[Any]] = []
        for i, buyer in enumerate(buyers):
            seller = sellers[i % len(sellers)]
            trades.append([buyer, node_of[buyer], seller, node_of[seller], rng.randrange(10, 2_000)])
            if i % 7 == 0:  # some buyers also take from a second seller
                other = sellers[(i * 31 + 5) % len(sellers)]
                trades.append([buyer, node_of[buyer], other, node_of[other], rng.randrange(10, 500)])
        for i in range(max(1, participants // 50)):
            buyer = buyers[(i * 13) % len(buyers)]
            trades.append([buyer, node_of[buyer], UTILITY_PARTICIPANT, node_names[0], rng.randrange(10, 800)])
        bought: dict[str, int] = {}
        sold: dict[str, int] = {}
        for b, _bn, s, _sn, energy_wh in trades:
            bought[b] = bought.get(b, 0) + energy_wh
            sold[s] = sold.get(s, 0) + energy_wh
        accepted = [[p, bought.get(p, 0), sold.get(p, 0)] for p in sorted(bought.keys() | sold.keys())]
        measured: dict[str, list[Any]] = {}
        for p in pids:
            net_wh = bought.get(p, 0) - sold.get(p, 0) + rng.randrange(-300, 301)
            spill_wh = rng.randrange(0, 50)
            measured[p] = [p, max(net_wh, 0) + spill_wh, max(-net_wh, 0) + spill_wh, "measured"]
        unsure = rng.sample(pids, missing_per_interval + estimated_per_interval)
        missing = set(unsure[:missing_per_interval])
        estimated = set(unsure[missing_per_interval:])
        first_delivery = []
        for p in pids:
            if p in missing:
                continue
            if p in estimated:
                row = measured[p]
                first_delivery.append([p, row[1] + rng.randrange(0, 200), row[2], "estimated"])
            else:
                first_delivery.append(measured[p])
        base = {
            "market_id": market_id,
            "interval_start_s": interval_start_s,
            "interval_s": interval_s,
            "node_prices_micro_per_kwh": prices,
            "trades": trades,
            "accepted": accepted,
        }
        recorded.append({**base, "meter_energy": first_delivery})
        if missing or estimated:
            late.append({**base, "meter_energy": [measured[p] for p in sorted(missing | estimated)]})
    return SyntheticDay(participants=pids, node_of=node_of, rules=rules, recorded=recorded, late=late)
