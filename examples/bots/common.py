"""What every example bot shares: market timing, the client, fills and prices in the background, and a command line.

A bot is an async `run(target, key, node_id, timing, stop, ...)` that
registers its key, then on every tick (an interval opening or clearing, or a
quarter interval passing) looks at the open intervals and places, amends or
cancels its orders. Client order ids are derived from the bot's plan (e.g.
`pv-<interval>-v<n>`), so a retried call or a restarted bot re-sends the same
ids and never places an order twice.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services.domain.intervals import Clock, RealClock, SimulatedClock
from services.gen.p2pgrid.common.v1 import common_pb2
from services.gen.p2pgrid.orderbook.v1 import order_book_pb2 as pb
from services.order_book.client import BotKey, OrderBookClient, OrderBookError

log = logging.getLogger("p2pgrid.bots")
TICK_MICRO_PER_KWH = 100


class SharedMarketData:
    """One market-data stream fanned out to every bot of a process that runs many (as `p2pgrid up` does).

    Market data is public and the same for everyone, so a thousand bots need not
    hold a thousand streams; a bot subscribing late first gets the recent events.
    """

    def __init__(self, client: OrderBookClient, stop: asyncio.Event, recent: int = 400) -> None:
        self.client = client
        self.stop = stop
        self._handlers: list[Callable[[pb.MarketData], None]] = []
        self._recent: deque[pb.MarketData] = deque(maxlen=recent)

    def subscribe(self, handler: Callable[[pb.MarketData], None]) -> Callable[[], None]:
        """Call `handler` with each event (the recent ones first); returns the unsubscribe function."""
        for event in self._recent:
            handler(event)
        self._handlers.append(handler)
        return lambda: self._handlers.remove(handler)

    async def run(self) -> None:
        async for event in self.client.market_data(stop=self.stop):
            self._recent.append(event)
            for handler in list(self._handlers):
                handler(event)


@dataclass(frozen=True)
class MarketTiming:
    """The market's calendar as the bot sees it; the clock must match the order book's."""

    clock: Clock = field(default_factory=RealClock)
    interval_s: int = 900
    gate_closure_s: int = 300
    horizon_intervals: int = 96
    # Many bots in one process share one market-data stream; None: each bot opens its own.
    shared_market: SharedMarketData | None = None

    def open_starts(self) -> list[int]:
        """The intervals that accept orders now (the next gate first)."""
        now_s = self.clock.now_s()
        first = (int((now_s + self.gate_closure_s) // self.interval_s) + 1) * self.interval_s
        return [first + i * self.interval_s for i in range(self.horizon_intervals)]

    def wall_s(self, sim_s: float) -> float:
        """Wall seconds for `sim_s` seconds of market time."""
        return sim_s / float(getattr(self.clock, "speedup", 1.0))


def on_tick(price_micro_per_kwh: int) -> int:
    """Round a price down to the market tick (100 micro-currency per kWh)."""
    return max(TICK_MICRO_PER_KWH, price_micro_per_kwh // TICK_MICRO_PER_KWH * TICK_MICRO_PER_KWH)


@dataclass
class BotReport:
    """What a bot did, for logs and tests."""

    placed: int = 0
    amended: int = 0
    cancelled: int = 0
    refused: int = 0
    fills: int = 0
    bought_wh: int = 0
    sold_wh: int = 0
    # Batteries only: the state of charge when the bot stopped.
    state_of_charge_wh: float | None = None
    # Orders whose receipt the bot holds and has not replaced: order id → interval start.
    acknowledged: dict[str, int] = field(default_factory=dict)


class BotRuntime:
    """A connected bot: its client, the fills and node prices seen so far, and the tick loop."""

    def __init__(
        self, client: OrderBookClient, node_id: str, timing: MarketTiming, stop: asyncio.Event
    ) -> None:
        self.client = client
        self.node_id = node_id
        self.timing = timing
        self.stop = stop
        self.report = BotReport()
        # Cleared price at this bot's node per interval, as the market data reported it.
        self.prices: dict[int, int] = {}
        self.fills: list[pb.Fill] = []
        self._wake = asyncio.Event()
        self._fill_handlers: list[Callable[[pb.Fill], None]] = []

    def on_fill(self, handler: Callable[[pb.Fill], None]) -> None:
        self._fill_handlers.append(handler)

    def last_price(self, default: int) -> int:
        return self.prices[max(self.prices)] if self.prices else default

    async def place(self, order: pb.PlaceOrderRequest) -> pb.OrderReceipt | None:
        try:
            receipt = await self.client.place(order)
        except OrderBookError as exc:
            self.report.refused += 1
            log.info("order %s refused: %s", order.body.client_order_id, exc)
            return None
        self.report.placed += 1
        self.report.acknowledged[receipt.order_id] = order.body.interval_start_s
        return receipt

    async def amend(self, order_id: str, replacement: pb.PlaceOrderRequest) -> pb.OrderReceipt | None:
        try:
            receipt = await self.client.amend(order_id, replacement)
        except OrderBookError as exc:
            self.report.refused += 1
            log.info("amend of %s refused: %s", order_id, exc)
            return None
        self.report.amended += 1
        self.report.acknowledged.pop(order_id, None)
        self.report.acknowledged[receipt.order_id] = replacement.body.interval_start_s
        return receipt

    async def _follow_fills(self) -> None:
        async for fill in self.client.fills(stop=self.stop):
            self.fills.append(fill)
            self.report.fills += 1
            if fill.side == common_pb2.SIDE_BUY:
                self.report.bought_wh += fill.accepted_wh
            else:
                self.report.sold_wh += fill.accepted_wh
            for handler in self._fill_handlers:
                handler(fill)
            self._wake.set()

    def _on_market(self, event: pb.MarketData) -> None:
        kind = event.WhichOneof("event")
        if kind == "interval_cleared":
            for node in event.interval_cleared.nodes:
                if node.node_id == self.node_id:
                    self.prices[event.interval_cleared.interval_start_s] = node.price_micro_per_kwh
        if kind in ("interval_cleared", "interval_opened"):
            self._wake.set()

    async def _follow_market(self) -> None:
        async for event in self.client.market_data(stop=self.stop):
            self._on_market(event)

    async def run(self, tick: Callable[[], Awaitable[None]]) -> BotReport:
        """Call `tick` on every wake-up until `stop` is set."""
        followers = [asyncio.ensure_future(self._follow_fills())]
        unsubscribe: Callable[[], None] | None = None
        if self.timing.shared_market is not None:
            unsubscribe = self.timing.shared_market.subscribe(self._on_market)
        else:
            followers.append(asyncio.ensure_future(self._follow_market()))
        try:
            while not self.stop.is_set():
                try:
                    await tick()
                except OrderBookError as exc:
                    log.warning("bot tick failed: %s", exc)
                self._wake.clear()
                waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(self.stop.wait())]
                await asyncio.wait(
                    waiters,
                    timeout=max(0.05, self.timing.wall_s(self.timing.interval_s / 4)),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for waiter in waiters:
                    waiter.cancel()
        finally:
            if unsubscribe is not None:
                unsubscribe()
            for follower in followers:
                follower.cancel()
            await asyncio.gather(*followers, return_exceptions=True)
        return self.report


async def connect(target: str, key: BotKey, node_id: str, display_name: str) -> OrderBookClient:
    client = OrderBookClient(target, key)
    await client.register(node_id, display_name)
    return client


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="order book gRPC address, e.g. 127.0.0.1:50051")
    parser.add_argument("--key-file", required=True, help="Ed25519 key file (created if missing)")
    parser.add_argument("--node", required=True, help="grid node the bot is connected at")
    parser.add_argument("--interval-s", type=int, default=900)
    parser.add_argument("--gate-closure-s", type=int, default=300)
    parser.add_argument("--horizon-intervals", type=int, default=96)
    parser.add_argument("--clock", choices=("real", "sim"), default="real")
    parser.add_argument("--sim-start-s", type=float, default=0.0)
    parser.add_argument("--sim-speedup", type=float, default=1.0)
    parser.add_argument(
        "--sim-anchor-wall-s",
        type=float,
        default=0.0,
        help="wall time at which the clock reads --sim-start-s",
    )


def timing_from_args(args: argparse.Namespace) -> MarketTiming:
    clock: Clock = RealClock()
    if args.clock == "sim":
        if not args.sim_anchor_wall_s:
            raise SystemExit("--sim-anchor-wall-s is required with --clock sim (use the order book's)")
        clock = SimulatedClock(args.sim_start_s, args.sim_speedup, args.sim_anchor_wall_s)
    return MarketTiming(clock, args.interval_s, args.gate_closure_s, args.horizon_intervals)


def main(
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    start: Callable[[argparse.Namespace, BotKey, MarketTiming, asyncio.Event], Awaitable[BotReport]],
) -> int:
    """Parse the command line, load or create the key, and run the bot until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(description=description)
    add_common_arguments(parser)
    add_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    key = BotKey.load_or_create(args.key_file)
    timing = timing_from_args(args)

    async def _main() -> BotReport:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        return await start(args, key, timing, stop)

    report = asyncio.run(_main())
    log.info("bot %s finished: %s", key.participant_id, report)
    return 0
