"""An EV owner bot: buys a charging block of `need_wh` before a deadline, paying more as the deadline nears.

The car charges at most `max_power_w`, so each interval can take at most
`max_power_w * interval_s / 3600` Wh. On every tick the bot counts what it
has bought (fills) and what is still waiting to clear (orders placed for
intervals that have not cleared), and places buy orders for the missing
energy in the earliest open intervals before the deadline. Its limit price
rises linearly from `start_price` to `max_price` as the open slots before the
deadline run out, so energy it did not get early is bought later at a
higher limit.

    python -m examples.bots.ev --target 127.0.0.1:50051 --key-file var/keys/ev1.key --node n2 \\
        --need-wh 20000 --deadline-intervals 32
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass

from examples.bots.common import BotReport, BotRuntime, MarketTiming, connect, main, on_tick
from services.gen.p2pgrid.orderbook.v1 import order_book_pb2 as pb
from services.order_book.client import BotKey
from services.order_book.domain.orders import Side


@dataclass(frozen=True)
class EvParams:
    need_wh: int = 20_000
    max_power_w: int = 11_000
    # The deadline, as a number of intervals after the first open one when the bot starts.
    deadline_intervals: int = 32
    start_price_micro_per_kwh: int = 120_000
    max_price_micro_per_kwh: int = 300_000


def limit_price(params: EvParams, slots_left: int, slots_total: int) -> int:
    """From the start price with every slot ahead to the maximum with one slot left."""
    if slots_total <= 1:
        return params.max_price_micro_per_kwh
    urgency = 1 - (slots_left - 1) / (slots_total - 1)
    span = params.max_price_micro_per_kwh - params.start_price_micro_per_kwh
    return on_tick(params.start_price_micro_per_kwh + int(span * max(0.0, min(1.0, urgency))))


async def run(
    target: str,
    key: BotKey,
    node_id: str,
    timing: MarketTiming,
    stop: asyncio.Event,
    params: EvParams | None = None,
) -> BotReport:
    """Buy `need_wh` before the deadline, then idle until `stop` is set."""
    params = params or EvParams()
    client = await connect(target, key, node_id, "ev owner")
    runtime = BotRuntime(client, node_id, timing, stop)
    first_s = timing.open_starts()[0]
    deadline_s = first_s + params.deadline_intervals * timing.interval_s
    slot_wh = params.max_power_w * timing.interval_s // 3600
    # Energy asked for per interval start; fills replace asks with what was accepted.
    asked: dict[int, int] = {}
    accepted: dict[int, int] = {}

    def record(fill: pb.Fill) -> None:
        accepted[fill.interval_start_s] = accepted.get(fill.interval_start_s, 0) + fill.accepted_wh

    runtime.on_fill(record)

    async def tick() -> None:
        bought_wh = sum(accepted.values())
        # An order counts as pending until its interval starts: it cleared at the gate, so by then any fill
        # has arrived; without one, that energy is missing again and goes into a later slot.
        now_s = timing.clock.now_s()
        for start_s in [s for s in asked if s not in accepted and s < now_s]:
            del asked[start_s]
            accepted[start_s] = 0
        pending_wh = sum(wh for start_s, wh in asked.items() if start_s not in accepted)
        missing_wh = params.need_wh - bought_wh - pending_wh
        slots = [s for s in timing.open_starts() if s < deadline_s and s not in asked]
        for index, start_s in enumerate(slots):
            if missing_wh <= 0:
                break
            energy_wh = min(slot_wh, missing_wh)
            price = limit_price(params, len(slots) - index, params.deadline_intervals)
            receipt = await runtime.place(
                client.order(Side.BUY, node_id, start_s, energy_wh, price, f"ev-{start_s}")
            )
            if receipt is not None:
                asked[start_s] = energy_wh
                missing_wh -= energy_wh

    try:
        return await runtime.run(tick)
    finally:
        await client.close()


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--need-wh", type=int, default=EvParams.need_wh)
    parser.add_argument("--max-power-w", type=int, default=EvParams.max_power_w)
    parser.add_argument("--deadline-intervals", type=int, default=EvParams.deadline_intervals)
    parser.add_argument("--max-price-micro-per-kwh", type=int, default=EvParams.max_price_micro_per_kwh)


async def _start(
    args: argparse.Namespace, key: BotKey, timing: MarketTiming, stop: asyncio.Event
) -> BotReport:
    params = EvParams(
        need_wh=args.need_wh,
        max_power_w=args.max_power_w,
        deadline_intervals=args.deadline_intervals,
        max_price_micro_per_kwh=args.max_price_micro_per_kwh,
    )
    return await run(args.target, key, args.node, timing, stop, params)


if __name__ == "__main__":
    raise SystemExit(main(__doc__ or "", _arguments, _start))
