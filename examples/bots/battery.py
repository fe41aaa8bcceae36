"""A home battery bot: price arbitrage around the moving average of cleared prices at its node.

For each of the next `lookahead_intervals` open intervals the bot bids to
charge below the reference price and offers to discharge above it, by half
of `spread` each way. The reference is the average of the last cleared
prices at its node (or `initial_price` before any clearing). Bids never
exceed what the battery can still take, offers never exceed its charge
(minus what is already committed), and fills update the state of charge;
charging loses `1 - efficiency` of the energy bought.

    python -m examples.bots.battery --target 127.0.0.1:50051 --key-file var/keys/bat1.key --node n1
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass

from examples.bots.common import BotReport, BotRuntime, MarketTiming, connect, main, on_tick
from services.gen.p2pgrid.common.v1 import common_pb2
from services.gen.p2pgrid.orderbook.v1 import order_book_pb2 as pb
from services.order_book.client import BotKey
from services.order_book.domain.orders import Side


@dataclass(frozen=True)
class BatteryParams:
    capacity_wh: int = 10_000
    power_w: int = 5_000
    initial_soc_wh: int = 5_000
    efficiency: float = 0.9
    spread_micro_per_kwh: int = 40_000
    initial_price_micro_per_kwh: int = 150_000
    lookahead_intervals: int = 2
    average_over: int = 8


@dataclass
class BatteryState:
    soc_wh: float
    # Energy committed in orders not yet cleared, per interval and side.
    charging_wh: dict[int, int]
    discharging_wh: dict[int, int]


def reference_price(prices: dict[int, int], params: BatteryParams) -> int:
    recent = [prices[s] for s in sorted(prices)[-params.average_over :]]
    return sum(recent) // len(recent) if recent else params.initial_price_micro_per_kwh


async def run(
    target: str,
    key: BotKey,
    node_id: str,
    timing: MarketTiming,
    stop: asyncio.Event,
    params: BatteryParams | None = None,
) -> BotReport:
    """Trade the battery until `stop` is set; the state of charge never leaves [0, capacity]."""
    params = params or BatteryParams()
    client = await connect(target, key, node_id, "home battery")
    runtime = BotRuntime(client, node_id, timing, stop)
    state = BatteryState(float(params.initial_soc_wh), {}, {})
    slot_wh = params.power_w * timing.interval_s // 3600

    def record(fill: pb.Fill) -> None:
        if fill.side == common_pb2.SIDE_BUY:
            state.charging_wh.pop(fill.interval_start_s, None)
            state.soc_wh = min(params.capacity_wh, state.soc_wh + fill.accepted_wh * params.efficiency)
        else:
            state.discharging_wh.pop(fill.interval_start_s, None)
            state.soc_wh = max(0.0, state.soc_wh - fill.accepted_wh)

    runtime.on_fill(record)

    async def tick() -> None:
        reference = reference_price(runtime.prices, params)
        for start_s in timing.open_starts()[: params.lookahead_intervals]:
            if start_s in state.charging_wh or start_s in state.discharging_wh:
                continue
            room_wh = params.capacity_wh - state.soc_wh - sum(state.charging_wh.values()) * params.efficiency
            charge_wh = int(min(slot_wh, room_wh / params.efficiency))
            stored_wh = state.soc_wh - sum(state.discharging_wh.values())
            discharge_wh = int(min(slot_wh, stored_wh))
            if charge_wh >= 1:
                bid = on_tick(reference - params.spread_micro_per_kwh // 2)
                if await runtime.place(
                    client.order(Side.BUY, node_id, start_s, charge_wh, bid, f"bat-{start_s}-buy")
                ):
                    state.charging_wh[start_s] = charge_wh
            if discharge_wh >= 1:
                ask = on_tick(reference + params.spread_micro_per_kwh // 2)
                if await runtime.place(
                    client.order(Side.SELL, node_id, start_s, discharge_wh, ask, f"bat-{start_s}-sell")
                ):
                    state.discharging_wh[start_s] = discharge_wh

    try:
        report = await runtime.run(tick)
    finally:
        await client.close()
    report.state_of_charge_wh = state.soc_wh
    return report


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--capacity-wh", type=int, default=BatteryParams.capacity_wh)
    parser.add_argument("--power-w", type=int, default=BatteryParams.power_w)
    parser.add_argument("--spread-micro-per-kwh", type=int, default=BatteryParams.spread_micro_per_kwh)


async def _start(
    args: argparse.Namespace, key: BotKey, timing: MarketTiming, stop: asyncio.Event
) -> BotReport:
    params = BatteryParams(
        capacity_wh=args.capacity_wh, power_w=args.power_w, spread_micro_per_kwh=args.spread_micro_per_kwh
    )
    return await run(args.target, key, args.node, timing, stop, params)


if __name__ == "__main__":
    raise SystemExit(main(__doc__ or "", _arguments, _start))
