"""The market traffic of `p2pgrid up`: prosumer bots trading through the order book, and progress read from the streams.

Prosumers sit at the grid's household nodes (the leaves of the network, the
slack excepted). Every fourth is a home battery, every fourth an EV owner and
the rest PV prosumers; their keys derive from their number, so a rerun in the
same work folder is the same market. Each has a simulated Modbus meter
(household load and PV on the simulated clock) that meter_ingest polls; the
ledger settles on what the meters measured. Progress comes from what the services
publish: one clearing result per interval on the CLEARING stream and one
settlement notice per interval on the LEDGER stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from services.domain.grid import Grid
from services.domain.intervals import SimulatedClock
from services.gen.p2pgrid.events.v1 import events_pb2
from services.order_book.client import BotKey
from services.platform.nats_bus import NatsBus
from services.platform.subjects import CLEARING_RESULT, LEDGER_SETTLED
from services.stack.supervisor import MeterGateways

log = logging.getLogger(__name__)


@dataclass
class IntervalSummary:
    """What one interval came to, as the services published it."""

    start_s: int
    cleared: bool = False
    orders: int = 0
    volume_wh: int = 0
    welfare_nano: int = 0
    prices_micro_per_kwh: dict[str, int] = field(default_factory=dict)
    binding_lines: list[str] = field(default_factory=list)
    # The ids of the orders in the interval's clearing result.
    order_ids: set[str] = field(default_factory=set)
    settled_transfers: int | None = None
    traded_amount_nano: int | None = None


@dataclass
class MarketProgress:
    intervals: dict[int, IntervalSummary] = field(default_factory=dict)

    def summary(self, start_s: int) -> IntervalSummary:
        return self.intervals.setdefault(start_s, IntervalSummary(start_s))

    def cleared(self, among: list[int]) -> int:
        return sum(1 for s in among if s in self.intervals and self.intervals[s].cleared)

    def settled(self, among: list[int]) -> int:
        return sum(
            1 for s in among if s in self.intervals and self.intervals[s].settled_transfers is not None
        )


def household_nodes(grid: Grid) -> list[str]:
    """The leaves of the network other than the slack: where households connect."""
    degree = {node_id: 0 for node_id in grid.node_ids}
    for line in grid.lines:
        degree[line.from_node] += 1
        degree[line.to_node] += 1
    leaves = [node_id for node_id, d in degree.items() if d == 1 and node_id != grid.slack]
    return leaves or [node_id for node_id in grid.node_ids if node_id != grid.slack] or [grid.slack]


def prosumer_roles(count: int) -> list[str]:
    return ["battery" if i % 4 == 3 else "ev" if i % 4 == 2 else "pv" for i in range(count)]


@dataclass(frozen=True)
class Prosumer:
    """One household of the local market: its bot's key and role, its node and its meter."""

    number: int
    role: str
    key: BotKey
    node_id: str

    @property
    def label(self) -> str:
        return f"{self.role}-{self.number}"

    @property
    def meter_id(self) -> str:
        return f"m-{self.number:04d}"


def prosumers_of(grid: Grid, count: int) -> list[Prosumer]:
    """The market's households: keys derive from their number, so a rerun is the same market."""
    nodes = household_nodes(grid)
    return [
        Prosumer(
            number,
            role,
            BotKey.from_seed(hashlib.sha256(f"p2pgrid-prosumer-{number}".encode()).digest()),
            nodes[number % len(nodes)],
        )
        for number, role in enumerate(prosumer_roles(count))
    ]


def write_meters_file(
    path: Path, prosumers: list[Prosumer], gateways: MeterGateways, *, host: str, poll_interval_s: float
) -> None:
    """The meters file for meter_ingest (and grid_check's meter map): each household's meter, polled."""
    meters = []
    for prosumer in prosumers:
        port, unit = gateways.address(prosumer.number)
        meters.append(
            {
                "meter_id": prosumer.meter_id,
                "participant_id": prosumer.key.participant_id,
                "node_id": prosumer.node_id,
                "map": gateways.map_id,
                "modbus": {
                    "host": host,
                    "port": port,
                    "unit": unit,
                    "framer": "socket",
                    "poll_interval_s": poll_interval_s,
                },
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"meters": meters}, sort_keys=False))


async def register_all(target: str, prosumers: list[Prosumer], in_flight: int = 32) -> None:
    """Register every household's key at its node before any bot starts, so all trade from the first interval."""
    from services.order_book.client import OrderBookClient

    slots = asyncio.Semaphore(in_flight)

    async def register(prosumer: Prosumer) -> None:
        async with slots, OrderBookClient(target, prosumer.key) as client:
            await client.register(prosumer.node_id, prosumer.label)

    await asyncio.gather(*(register(p) for p in prosumers))


async def run_bots(
    target: str,
    prosumers: list[Prosumer],
    clock: SimulatedClock,
    stop: asyncio.Event,
    *,
    interval_s: int,
    gate_closure_s: int,
) -> list[asyncio.Task[object]]:
    """Start one bot task per prosumer; they run until `stop` is set."""
    from examples.bots import battery, ev, pv
    from examples.bots.common import MarketTiming, SharedMarketData
    from services.order_book.client import OrderBookClient

    await register_all(target, prosumers)
    tasks: list[asyncio.Task[object]] = []
    shared: SharedMarketData | None = None
    if prosumers:
        # Market data is public: the households share one stream instead of holding one each.
        shared = SharedMarketData(OrderBookClient(target, prosumers[0].key), stop)
        tasks.append(asyncio.create_task(shared.run(), name="market-data"))
    timing = MarketTiming(
        clock=clock,
        interval_s=interval_s,
        gate_closure_s=gate_closure_s,
        horizon_intervals=8,
        shared_market=shared,
    )
    runners: dict[str, Callable[..., object]] = {"pv": pv.run, "ev": ev.run, "battery": battery.run}
    for prosumer in prosumers:
        coroutine = runners[prosumer.role](target, prosumer.key, prosumer.node_id, timing, stop)
        tasks.append(asyncio.create_task(coroutine, name=prosumer.label))  # type: ignore[arg-type]
    return tasks


async def follow_streams(nats_url: str, progress: MarketProgress, stop: asyncio.Event) -> None:
    """Record every clearing result and settlement notice into `progress` until `stop` is set."""
    bus = await NatsBus.connect(nats_url, name="p2pgrid-up")
    await bus.ensure_streams()

    async def clearing() -> None:
        async for deliveries in bus.pull("CLEARING", "p2pgrid-up-results", f"{CLEARING_RESULT}.>", stop=stop):
            for delivery in deliveries:
                result = events_pb2.ClearingResultEvent.FromString(delivery.data).result
                summary = progress.summary(int(result.interval.start_s))
                summary.orders = len(result.orders)
                summary.order_ids = {order.order_id for order in result.orders}
                summary.volume_wh = sum(t.energy_wh for t in result.trades)
                summary.welfare_nano = result.welfare_nano
                summary.prices_micro_per_kwh = {n.node_id: n.price_micro_per_kwh for n in result.nodes}
                summary.binding_lines = [line.line_id for line in result.lines if line.binding]
                summary.cleared = True
                await delivery.ack()

    async def settlement() -> None:
        async for deliveries in bus.pull("LEDGER", "p2pgrid-up-settled", f"{LEDGER_SETTLED}.>", stop=stop):
            for delivery in deliveries:
                settled = events_pb2.IntervalSettled.FromString(delivery.data)
                summary = progress.summary(int(settled.interval_start_s))
                summary.settled_transfers = int(settled.transfers)
                summary.traded_amount_nano = int(settled.traded_amount_nano)
                await delivery.ack()

    try:
        await asyncio.gather(clearing(), settlement())
    finally:
        await bus.close()
