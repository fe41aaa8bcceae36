"""The whole market on one machine: nats-server, the five services, simulated meters and prosumer bots.

`p2pgrid up` is this module with a command line; the live-dashboard test
and the load tests run the same market. One `LocalMarket` owns a `Stack`
(services/stack/supervisor.py), the simulated Modbus gateways serving one
meter per household, the households' bots trading through the order book,
and a follower of the CLEARING and LEDGER streams that records what each
interval came to (`progress`).

    market = LocalMarket(MarketOptions(workdir=..., grid_path=..., prosumers=50, speedup=60))
    await market.start()
    wanted = market.next_intervals(8)
    done = await market.run_until_settled(wanted, stop)
    codes = await market.close()
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from examples.bots.common import BotReport
from services.domain.grid import Grid, load_grid
from services.domain.intervals import DEFAULT_GATE_CLOSURE_S, DEFAULT_INTERVAL_S, Interval, SimulatedClock
from services.stack.defaults import DEFAULT_GRID, DEFAULT_METER_MAP
from services.stack.market import (
    IntervalSummary,
    MarketProgress,
    Prosumer,
    follow_streams,
    prosumers_of,
    run_bots,
    write_meters_file,
)
from services.stack.supervisor import Stack, StackConfig

# Simulated seconds between two polls of a meter (at least one wall second, at most five).
POLL_SPACING_SIM_S = 150.0
LEDGER_METERING_DELAY_S = 900
# Wall seconds to wait for the last clearings and settlements once the simulated deadline has passed.
SETTLE_GRACE_WALL_S = 30.0
# Wall seconds the bots get to bid for the first interval traded.
BIDDING_WALL_S = 5.0


@dataclass(frozen=True)
class Metering:
    """How the simulated meters are polled at a speed-up: wall seconds between polls, the rest simulated."""

    poll_wall_s: float
    reading_gap_s: int
    metering_delay_s: int
    measured_span_s: int

    @classmethod
    def at(cls, speedup: float) -> Metering:
        """Polls every POLL_SPACING_SIM_S of simulated time where the machine allows it (no more than once
        a wall second per meter); the gap, the metering delay and the span of a measured boundary stretch
        with the real spacing, so a fast clock neither flags every reading as a gap, nor publishes interval
        energy before the next poll, nor calls polled boundaries interpolated."""
        poll_wall_s = max(1.0, min(5.0, POLL_SPACING_SIM_S / speedup))
        spacing = poll_wall_s * speedup
        return cls(
            poll_wall_s,
            reading_gap_s=int(max(300.0, 3 * spacing)),
            metering_delay_s=int(max(60.0, 1.5 * spacing)),
            measured_span_s=int(max(120.0, 1.5 * spacing)),
        )


@dataclass(frozen=True)
class MarketOptions:
    workdir: Path
    grid_path: Path = DEFAULT_GRID
    prosumers: int = 12
    speedup: float = 60.0
    meter_map: str = DEFAULT_METER_MAP
    # Extra environment per service (name → variables), applied last.
    extra_env: dict[str, dict[str, str]] = field(default_factory=dict)


def _quiet(_line: str) -> None:
    pass


class LocalMarket:
    """A running local market; `say` receives one line per thing worth showing (progress, restarts)."""

    def __init__(self, options: MarketOptions, say: Callable[[str], None] = _quiet) -> None:
        self.options = options
        self.say = say
        self.grid: Grid = load_grid(options.grid_path)
        self.interval_s = DEFAULT_INTERVAL_S
        # The simulated market opens at the start of the wall clock's current interval.
        self.sim_start_s = float(Interval.containing(time.time()).start_s)
        self.metering = Metering.at(options.speedup)
        extra_env: dict[str, dict[str, str]] = {
            "order_book": {"P2PGRID_ORDER_BOOK_GRID_FILE": str(options.grid_path)},
            "meter_ingest": {
                "P2PGRID_METER_INGEST_READING_GAP_S": str(self.metering.reading_gap_s),
                "P2PGRID_METER_INGEST_METERING_DELAY_S": str(self.metering.metering_delay_s),
                "P2PGRID_METER_INGEST_MEASURED_SPAN_S": str(self.metering.measured_span_s),
            },
            "ledger": {"P2PGRID_LEDGER_METERING_DELAY_S": str(LEDGER_METERING_DELAY_S)},
        }
        for name, env in options.extra_env.items():
            extra_env.setdefault(name, {}).update(env)
        self.stack = Stack(
            StackConfig(
                workdir=options.workdir,
                sim_start_s=self.sim_start_s,
                speedup=options.speedup,
                grid_path=str(options.grid_path),
                extra_env=extra_env,
            )
        )
        self.households: list[Prosumer] = prosumers_of(self.grid, options.prosumers)
        self.clock = SimulatedClock(self.sim_start_s, options.speedup, self.stack.anchor_wall_s)
        self.progress = MarketProgress()
        self.stop_event = asyncio.Event()
        self._bots: list[asyncio.Task[object]] = []
        self._follower: asyncio.Task[None] | None = None
        # Filled by close(): every order a bot holds a receipt for, order id → interval start.
        self.acknowledged: dict[str, int] = {}

    @property
    def order_book_target(self) -> str:
        return f"127.0.0.1:{self.stack.services['order_book'].grpc_port}"

    @property
    def labels(self) -> dict[str, str]:
        """Participant id → a readable name of the household (`pv-3`)."""
        return {p.key.participant_id: p.label for p in self.households}

    async def start(self) -> None:
        """Meters, services, the stream follower and the bots; raises RuntimeError or TimeoutError if a part
        does not start (everything started so far is stopped again)."""
        options = self.options
        try:
            if self.households:
                gateways = await asyncio.to_thread(
                    self.stack.start_meters, len(self.households), options.meter_map
                )
                meters_path = options.workdir / "meters.yaml"
                write_meters_file(
                    meters_path,
                    self.households,
                    gateways,
                    host="127.0.0.1",
                    poll_interval_s=self.metering.poll_wall_s,
                )
                self.stack.config.meters_path = str(meters_path)
                self.say(
                    f"{len(self.households)} simulated {options.meter_map} meters on Modbus TCP ports "
                    f"{','.join(map(str, gateways.ports))}, polled every {self.metering.poll_wall_s:g} s"
                )
            await asyncio.to_thread(self.stack.start)
        except (RuntimeError, TimeoutError):
            await asyncio.to_thread(self.stack.stop)
            raise
        for name, service in self.stack.services.items():
            self.say(
                f"{name:<13} gRPC 127.0.0.1:{service.grpc_port}  "
                f"metrics http://127.0.0.1:{service.metrics_port}/metrics"
            )
        self._follower = asyncio.create_task(
            follow_streams(self.stack.nats.url, self.progress, self.stop_event), name="stream-follower"
        )
        began = time.monotonic()
        self._bots = await run_bots(
            self.order_book_target,
            self.households,
            self.clock,
            self.stop_event,
            interval_s=self.interval_s,
            gate_closure_s=DEFAULT_GATE_CLOSURE_S,
        )
        for task in self._bots:
            task.add_done_callback(self._bot_ended)
        self.say(
            f"{len(self.households)} prosumer bots registered in {time.monotonic() - began:.1f} s, trading on "
            f"{options.grid_path.name} ({len(self.grid.nodes)} nodes)"
        )

    def _bot_ended(self, task: asyncio.Task[object]) -> None:
        """A bot that ends before the market stops is an error worth showing (at the stop, calls in flight
        are cancelled: that is not one)."""
        if self.stop_event.is_set() or task.cancelled():
            return
        error = task.exception()
        self.say(f"! bot {task.get_name()} stopped: {error!r}")

    def next_intervals(self, count: int) -> list[int]:
        """The next `count` intervals whose gate closes at least BIDDING_WALL_S wall seconds from now."""
        bidding_s = DEFAULT_GATE_CLOSURE_S + BIDDING_WALL_S * self.options.speedup
        first_start_s = (int((self.clock.now_s() + bidding_s) // self.interval_s) + 1) * self.interval_s
        return [first_start_s + i * self.interval_s for i in range(count)]

    def done(self, wanted: list[int]) -> bool:
        return self.progress.cleared(wanted) == len(wanted) and self.progress.settled(wanted) == len(wanted)

    async def run_until_settled(self, wanted: list[int], stop: asyncio.Event | None = None) -> bool:
        """Show each wanted interval as it clears; True once all are cleared and settled, False if `stop` is
        set first or the last one is not settled in time (its settlement deadline plus one interval of
        simulated time, then SETTLE_GRACE_WALL_S wall seconds)."""
        deadline_sim_s = wanted[-1] + 2 * self.interval_s + LEDGER_METERING_DELAY_S
        shown: set[int] = set()
        give_up_wall_s = 0.0
        while stop is None or not stop.is_set():
            for event in await asyncio.to_thread(self.stack.check):
                self.say(f"! {event}")
            for start_s in wanted:
                summary = self.progress.intervals.get(start_s)
                if summary is not None and summary.cleared and start_s not in shown:
                    shown.add(start_s)
                    self.say(describe(summary))
            if self.done(wanted):
                return True
            if self.clock.now_s() >= deadline_sim_s:
                # Past the simulated deadline, a busy machine still gets a little wall time to publish.
                give_up_wall_s = give_up_wall_s or time.monotonic() + SETTLE_GRACE_WALL_S
                if time.monotonic() >= give_up_wall_s:
                    return False
            await asyncio.sleep(0.5)
        return False

    async def stop_trading(self) -> None:
        """Stop the bots and the stream follower (the services keep running); collects the bots' receipts."""
        self.stop_event.set()
        tasks: list[asyncio.Future[object]] = [*self._bots]
        if self._follower is not None:
            tasks.append(self._follower)  # type: ignore[arg-type]
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        self._bots, self._follower = [], None
        for outcome in outcomes:
            if isinstance(outcome, BotReport):
                self.acknowledged.update(outcome.acknowledged)

    async def close(self) -> dict[str, int]:
        """Stop trading, then the services, meters and NATS; each service's exit code."""
        await self.stop_trading()
        return await asyncio.to_thread(self.stack.stop)

    def lost_orders(self, wanted: list[int]) -> tuple[int, list[str]]:
        """(orders the bots hold receipts for in the cleared wanted intervals, those missing from their
        interval's clearing result); valid after `stop_trading()`."""
        cleared = {
            start_s: summary.order_ids
            for start_s, summary in self.progress.intervals.items()
            if start_s in wanted and summary.cleared
        }
        held = [(order_id, start_s) for order_id, start_s in self.acknowledged.items() if start_s in cleared]
        lost = sorted(order_id for order_id, start_s in held if order_id not in cleared[start_s])
        return len(held), lost


def describe(summary: IntervalSummary) -> str:
    """One progress line for a cleared interval."""
    prices = sorted(summary.prices_micro_per_kwh.values()) or [0]
    return (
        f"{Interval(summary.start_s).iso()}  orders {summary.orders:>5}  traded {summary.volume_wh / 1000:>9.3f} kWh"
        f"  price {prices[0] / 1e6:.4f}..{prices[-1] / 1e6:.4f}/kWh"
        f"  binding {','.join(summary.binding_lines) or '-'}"
    )
