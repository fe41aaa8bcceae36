"""A PV prosumer bot: sells its forecast surplus (PV output minus household load) in each upcoming interval.

The forecast is a clear-sky bell between 06:00 and 18:00 UTC scaled to the
panel's peak power, with an error that shrinks as the interval approaches
(deterministic per interval, so a restarted bot computes the same numbers).
The bot offers the surplus at its floor price (the feed-in tariff plus a
margin) or the last cleared price at its node if higher, and amends the
offer (cancel-replace) when the forecast moves by more than 5 %.

    python -m examples.bots.pv --target 127.0.0.1:50051 --key-file var/keys/pv1.key --node n1
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
from dataclasses import dataclass

from examples.bots.common import BotReport, BotRuntime, MarketTiming, connect, main, on_tick
from services.order_book.client import BotKey
from services.order_book.domain.orders import Side

SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class PvParams:
    peak_w: int = 5_000
    base_load_w: int = 400
    floor_price_micro_per_kwh: int = 80_000
    lookahead_intervals: int = 8
    # Relative forecast error a full lookahead ahead; it shrinks linearly to 0 at the gate.
    forecast_error: float = 0.2


def clear_sky_w(peak_w: int, t_s: float) -> float:
    """PV output at time `t_s`: a half sine between 06:00 and 18:00 UTC."""
    hour = (t_s % SECONDS_PER_DAY) / 3600
    return peak_w * max(0.0, math.sin(math.pi * (hour - 6) / 12))


def surplus_wh(params: PvParams, start_s: int, interval_s: int) -> int:
    """Expected export of the interval: PV minus load, at the interval's midpoint, never negative."""
    surplus_w = clear_sky_w(params.peak_w, start_s + interval_s / 2) - params.base_load_w
    return max(0, int(surplus_w * interval_s / 3600))


def forecast_wh(params: PvParams, start_s: int, interval_s: int, leads: int) -> int:
    """The forecast `leads` intervals ahead: the true surplus times a deterministic error factor."""
    digest = hashlib.sha256(f"pv-forecast-{start_s}".encode()).digest()
    noise = digest[0] / 255 * 2 - 1  # in [-1, 1]
    shrink = min(1.0, leads / max(1, params.lookahead_intervals))
    return max(0, int(surplus_wh(params, start_s, interval_s) * (1 + params.forecast_error * noise * shrink)))


@dataclass
class Offer:
    order_id: str
    energy_wh: int
    version: int


async def run(
    target: str,
    key: BotKey,
    node_id: str,
    timing: MarketTiming,
    stop: asyncio.Event,
    params: PvParams | None = None,
) -> BotReport:
    """Offer the forecast surplus of the next intervals until `stop` is set."""
    params = params or PvParams()
    client = await connect(target, key, node_id, "pv prosumer")
    runtime = BotRuntime(client, node_id, timing, stop)
    offers: dict[int, Offer] = {}

    async def tick() -> None:
        starts = timing.open_starts()
        for leads, start_s in enumerate(starts[: params.lookahead_intervals]):
            energy_wh = forecast_wh(params, start_s, timing.interval_s, leads)
            offer = offers.get(start_s)
            price = on_tick(max(params.floor_price_micro_per_kwh, runtime.last_price(0)))
            if offer is None:
                if energy_wh < 1:
                    continue
                order = client.order(Side.SELL, node_id, start_s, energy_wh, price, f"pv-{start_s}-v0")
                receipt = await runtime.place(order)
                if receipt is not None:
                    offers[start_s] = Offer(receipt.order_id, energy_wh, 0)
            elif energy_wh >= 1 and abs(energy_wh - offer.energy_wh) > 0.05 * offer.energy_wh:
                version = offer.version + 1
                order = client.order(
                    Side.SELL, node_id, start_s, energy_wh, price, f"pv-{start_s}-v{version}"
                )
                amended = await runtime.amend(offer.order_id, order)
                if amended is not None:
                    offers[start_s] = Offer(amended.order_id, energy_wh, version)
        for start_s in [s for s in offers if s < starts[0]]:
            del offers[start_s]

    try:
        return await runtime.run(tick)
    finally:
        await client.close()


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peak-w", type=int, default=PvParams.peak_w)
    parser.add_argument("--base-load-w", type=int, default=PvParams.base_load_w)
    parser.add_argument("--floor-price-micro-per-kwh", type=int, default=PvParams.floor_price_micro_per_kwh)


async def _start(
    args: argparse.Namespace, key: BotKey, timing: MarketTiming, stop: asyncio.Event
) -> BotReport:
    params = PvParams(args.peak_w, args.base_load_w, args.floor_price_micro_per_kwh)
    return await run(args.target, key, args.node, timing, stop, params)


if __name__ == "__main__":
    raise SystemExit(main(__doc__ or "", _arguments, _start))
