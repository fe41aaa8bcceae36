"""One load run: against its own stack or a running one, the scenario for a bounded time, a short drain, the report.

The load lasts `duration_s` wall seconds. Then no new call starts; calls in
flight finish (an order call gives up at its interval's gate), and the run
waits at most `drain_s` more for the intervals that got orders to clear and
settle. What the system acknowledged and what it published are compared in
the report: every acknowledged order must be in its interval's clearing
request.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from loadtest.meters import PushGateway, gateway_key, plan_meters, write_meters_file
from loadtest.observer import Observer
from loadtest.report import iso, write_report
from loadtest.scenarios import DESCRIPTIONS, METER_FLOOD, Deadline, MarketCalendar
from loadtest.stats import Recorder, summarize, summarize_ms
from loadtest.traders import ClockMismatch, OrderFlow, trader_key, wall_s_of
from services.domain.grid import Grid
from services.domain.intervals import Clock, Interval, RealClock, SimulatedClock

PROGRESS_EVERY_S = 5.0
# Own stack: the ledger settles an interval this long (market seconds) after it ends, meter_ingest having
# published its energy after its own 60 s; the built-in 900 s would put every settlement past a short run.
OWN_STACK_METERING_DELAY_S = 120
# Own stack: the ledger looks for intervals to settle every second (the built-in 5 wall seconds are 10
# market minutes at 120x and would dominate the settlement lag).
OWN_STACK_SETTLE_PERIOD_S = 1.0
# Own stack: readings stamped this many wall seconds from meter_ingest's clock still count (at 120x the
# built-in 30 market seconds are a quarter of a wall second, less than a busy machine's scheduling delay).
OWN_STACK_CLOCK_SKEW_WALL_S = 5.0


@dataclass(frozen=True)
class ExternalStack:
    """Addresses of a running stack, and its clock (None: the real clock)."""

    nats_url: str
    order_book: str
    meter_ingest: str = ""
    sim_start_s: float | None = None
    sim_anchor_wall_s: float | None = None


@dataclass(frozen=True)
class LoadConfig:
    scenario: str
    duration_s: float
    report_dir: Path
    grid_path: Path
    prosumers: int = 50
    rate_per_s: float = 200.0
    speedup: float = 120.0
    meters: int = 50
    gateways: int = 4
    reading_period_s: float = 15.0
    messages_per_call: int = 10
    intervals_ahead: int = 2
    amend_share: float = 0.25
    drain_s: float = 30.0
    seed: int = 1
    interval_s: int = 900
    gate_closure_s: int = 300
    workdir: Path | None = None
    external: ExternalStack | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "duration_s": self.duration_s,
            "prosumers": self.prosumers,
            "rate_per_s": self.rate_per_s,
            "speedup": self.speedup,
            "meters": self.meters,
            "gateways": self.gateways,
            "reading_period_s": self.reading_period_s,
            "messages_per_call": self.messages_per_call,
            "intervals_ahead": self.intervals_ahead,
            "amend_share": self.amend_share,
            "drain_s": self.drain_s,
            "seed": self.seed,
            "interval_s": self.interval_s,
            "gate_closure_s": self.gate_closure_s,
            "grid": str(self.grid_path),
        }


@dataclass
class Endpoints:
    """Where the load goes and how the stack keeps time; `settings` describe the stack for the report."""

    nats_url: str
    order_book: str
    meter_ingest: str
    clock: Clock
    description: str
    settings: list[str]
    check: Callable[[], list[str]] | None = None
    events: list[str] = field(default_factory=list)


def household_nodes(grid: Grid) -> list[str]:
    from services.stack.market import household_nodes as nodes_of

    return nodes_of(grid)


def owners(config: LoadConfig, nodes: list[str]) -> list[tuple[str, str]]:
    """(participant_id, node_id) of each trader, in trader order."""
    return [
        (trader_key(config.seed, i).participant_id, nodes[i % len(nodes)]) for i in range(config.prosumers)
    ]


def write_meters_for(path: Path, config: LoadConfig, nodes: list[str]) -> None:
    write_meters_file(path, plan_meters(config.meters, config.gateways, owners(config, nodes)), config.seed)


async def run_load(
    config: LoadConfig,
    endpoints: Endpoints,
    nodes: list[str],
    say: Callable[[str], None],
    deadline: Deadline,
) -> tuple[dict[str, Any], bool]:
    """Drive the scenario against `endpoints`; returns the report document and whether the run is sound."""
    clock = endpoints.clock
    speedup = float(getattr(clock, "speedup", 1.0))
    calendar = MarketCalendar(config.interval_s, config.gate_closure_s, speedup)
    run_id = secrets.token_hex(3)
    recorder = Recorder()
    keys = [trader_key(config.seed, i) for i in range(config.prosumers)]
    observer = Observer({key.participant_id for key in keys})
    market = config.scenario != METER_FLOOD
    flow = OrderFlow(
        target=endpoints.order_book,
        keys=keys,
        nodes=nodes,
        clock=clock,
        calendar=calendar,
        recorder=recorder,
        scenario=config.scenario,
        rate_per_s=config.rate_per_s,
        intervals_ahead=config.intervals_ahead,
        amend_share=config.amend_share,
        run_id=run_id,
        seed=config.seed,
    )
    channels: list[grpc.aio.Channel] = []
    gateways: list[PushGateway] = []
    failure = ""
    try:
        await observer.start(endpoints.nats_url)
        if market:
            await flow.register_all()
        if endpoints.meter_ingest and config.meters > 0:
            planned = plan_meters(config.meters, config.gateways, owners(config, nodes))
            for number in range(min(config.gateways, config.meters)):
                channel = grpc.aio.insecure_channel(
                    endpoints.meter_ingest, options=[("grpc.max_send_message_length", 64 << 20)]
                )
                channels.append(channel)
                mine = [m for m in planned if m.gateway == number]
                gateways.append(
                    PushGateway(number, gateway_key(config.seed, number), mine, channel, clock, recorder)
                )
        say(
            f"p2pgrid loadtest: {config.scenario} for {config.duration_s:g} s: "
            + (f"{config.prosumers} traders at {config.rate_per_s:g} order actions/s, " if market else "")
            + f"{sum(g.meters for g in gateways)} push meters on {len(gateways)} gateways"
        )
        started_wall_s = time.time()
        started_market_s = clock.now_s()
        recorder.started_s = started_s = time.monotonic()
        deadline.set(started_s + config.duration_s)
        tasks: list[asyncio.Task[None]] = []
        if market:
            tasks.append(asyncio.create_task(flow.run(config.duration_s, started_s, deadline)))
        for gateway in gateways:
            if market:
                period_wall_s = config.reading_period_s / speedup
                tasks.append(asyncio.create_task(gateway.run_paced(period_wall_s, deadline)))
            else:
                tasks.append(asyncio.create_task(gateway.run_flood(config.messages_per_call, deadline)))
        progress = asyncio.create_task(_progress(recorder, observer, flow, endpoints, deadline, say))
        try:
            await asyncio.gather(*tasks)
            load_end_s = time.monotonic()
            await flow.finish()
            if flow.failure is not None:
                failure = f"{type(flow.failure).__name__}: {flow.failure}"
            drain_started_s = time.monotonic()
            if market and not failure:
                await _drain(flow, observer, drain_started_s + config.drain_s, deadline)
            drain_s = time.monotonic() - drain_started_s
        finally:
            progress.cancel()
    finally:
        await observer.stop()
        await flow.close()
        for channel in channels:
            await channel.close(None)
    if isinstance(flow.failure, ClockMismatch):
        raise flow.failure
    report = build_report(
        config=config,
        endpoints=endpoints,
        recorder=recorder,
        flow=flow,
        observer=observer,
        calendar=calendar,
        started_wall_s=started_wall_s,
        started_market_s=started_market_s,
        load_s=load_end_s - started_s,
        drain_s=drain_s,
        gateways=gateways,
        failure=failure,
    )
    sound = not failure and report["orders"]["lost"] == 0
    return report, sound


async def _progress(
    recorder: Recorder,
    observer: Observer,
    flow: OrderFlow,
    endpoints: Endpoints,
    deadline: Deadline,
    say: Callable[[str], None],
) -> None:
    last_orders = last_readings = 0
    last_s = recorder.started_s
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        if endpoints.check is not None:
            for event in await asyncio.to_thread(endpoints.check):
                endpoints.events.append(event)
                say(f"  ! {event}")
        now_s = time.monotonic()
        width_s = max(now_s - last_s, 1e-9)
        orders, readings = recorder.orders_acknowledged, recorder.readings_accepted
        traded = set(flow.tally.intervals())
        cleared = sum(1 for s, seen in observer.intervals.items() if s in traded and seen.result_seen_wall_s)
        settled = sum(1 for s, seen in observer.intervals.items() if s in traded and seen.settled_wall_s)
        phase = "load" if now_s < deadline.end_s else "drain"
        line = f"  [{now_s - recorder.started_s:5.0f} s {phase}]"
        if flow.traders and flow.tally.intervals():
            line += f"  orders {orders} ({(orders - last_orders) / width_s:.0f}/s)"
        if recorder.readings_sent:
            line += f"  readings {readings} ({(readings - last_readings) / width_s:.0f}/s)"
            if recorder.readings_rejected:
                line += f", {recorder.readings_rejected} rejected"
        line += f"  errors {recorder.error_count()}"
        if traded:
            line += f"  intervals cleared {cleared}, settled {settled} of {len(traded)}"
        say(line)
        last_orders, last_readings, last_s = orders, readings, now_s


async def _drain(flow: OrderFlow, observer: Observer, until_s: float, deadline: Deadline) -> None:
    """Wait until every interval that got orders is cleared and settled, or `until_s` (monotonic), or Ctrl-C."""
    while time.monotonic() < until_s and not deadline.interrupted:
        pending = [
            s
            for s in flow.tally.intervals()
            if s not in observer.intervals
            or observer.intervals[s].result_seen_wall_s is None
            or observer.intervals[s].settled_wall_s is None
        ]
        if not pending:
            return
        await asyncio.sleep(0.2)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def build_report(
    *,
    config: LoadConfig,
    endpoints: Endpoints,
    recorder: Recorder,
    flow: OrderFlow,
    observer: Observer,
    calendar: MarketCalendar,
    started_wall_s: float,
    started_market_s: float,
    load_s: float,
    drain_s: float,
    gateways: list[PushGateway],
    failure: str,
) -> dict[str, Any]:
    clock = endpoints.clock
    tally = flow.tally
    traded = tally.intervals()

    # The intervals of the run: those traded, and those whose gate closed after the load began and that the
    # services reported on. Notices about earlier intervals (a ledger catching up) are counted, not shown.
    def of_run(start_s: int) -> bool:
        return wall_s_of(clock, start_s - calendar.gate_closure_s) >= started_wall_s

    shown = sorted(set(traded) | {s for s in observer.intervals if of_run(s)})
    earlier = sorted(s for s in observer.intervals if s not in shown)
    intervals = []
    lost = checked = 0
    solver_ms: list[float] = []
    gate_to_result: list[float] = []
    lag_sim: list[float] = []
    lag_wall: list[float] = []
    for start_s in shown:
        seen = observer.intervals.get(start_s)
        live = tally.live_ids.get(start_s, set())
        gate_wall_s = wall_s_of(clock, start_s - calendar.gate_closure_s)
        end_wall_s = wall_s_of(clock, start_s + calendar.interval_s)
        row: dict[str, Any] = {
            "interval": Interval(start_s, calendar.interval_s).iso(),
            "start_s": start_s,
            "traded": start_s in tally.placed or start_s in tally.amended,
            "orders_placed": tally.placed.get(start_s, 0),
            "orders_amended": tally.amended.get(start_s, 0),
            "orders_unknown_outcome": tally.unknown.get(start_s, 0),
            "orders_live_acknowledged": len(live),
            "request_seen": False,
            "request_orders": None,
            "request_orders_of_run": None,
            "missing": None,
            "unacknowledged_in_request": None,
            "cleared": False,
            "result_orders": None,
            "solver_ms": None,
            "solver_status": None,
            "gate_to_result_wall_s": None,
            "traded_kwh": None,
            "trades": None,
            "settled": False,
            "settlement_lag_sim_s": None,
            "settlement_lag_wall_s": None,
        }
        if seen is not None and seen.request_seen_wall_s is not None:
            missing = len(live - seen.request_ids_of_run)
            row.update(
                request_seen=True,
                request_orders=seen.request_orders,
                request_orders_of_run=len(seen.request_ids_of_run),
                missing=missing,
                unacknowledged_in_request=len(seen.request_ids_of_run - live),
            )
            if row["traded"] or row["orders_unknown_outcome"]:
                lost += missing
                checked += 1
        if seen is not None and seen.result_seen_wall_s is not None and seen.solver_s is not None:
            row.update(
                cleared=True,
                result_orders=seen.result_orders,
                solver_ms=round(seen.solver_s * 1000, 3),
                solver_status=seen.solver_status,
                gate_to_result_wall_s=round(seen.result_seen_wall_s - gate_wall_s, 3),
                traded_kwh=round(seen.volume_wh / 1000, 3),
                trades=seen.trades,
            )
            solver_ms.append(seen.solver_s * 1000)
            gate_to_result.append(seen.result_seen_wall_s - gate_wall_s)
        if seen is not None and seen.settled_wall_s is not None:
            lag_wall_s = seen.settled_wall_s - end_wall_s
            row.update(
                settled=True,
                settlement_lag_wall_s=round(lag_wall_s, 3),
                settlement_lag_sim_s=round(lag_wall_s * calendar.speedup, 1),
            )
            lag_wall.append(lag_wall_s)
            lag_sim.append(lag_wall_s * calendar.speedup)
        intervals.append(row)
    unknown = recorder.orders_unknown
    meters_pushed = sum(g.meters for g in gateways)
    intervals_traded = sum(1 for s in traded if s in tally.placed or s in tally.amended)
    outcome = (
        "sound" if not failure and lost == 0 else f"FAILED: {failure or f'{lost} acknowledged orders lost'}"
    )
    exit_codes: dict[str, int] = {}
    return {
        "report": "p2pgrid loadtest",
        "version": 1,
        "scenario_description": DESCRIPTIONS[config.scenario][0].upper() + DESCRIPTIONS[config.scenario][1:],
        "outcome": outcome,
        "config": config.as_dict(),
        "run": {
            "started_at": iso(started_wall_s),
            "started_at_s": round(started_wall_s, 3),
            "load_s": round(load_s, 2),
            "drain_s": round(drain_s, 2),
            "run_id": flow.run_id,
            "market_clock_at_start": iso(started_market_s),
            "clock_deviation_max_s": round(tally.clock_deviation_s, 1),
        },
        "orders": {
            "acknowledged": recorder.orders_acknowledged,
            "placed": recorder.orders_placed,
            "amended": recorder.orders_amended,
            "acknowledged_per_s": round(recorder.orders_acknowledged / load_s, 1) if load_s > 0 else 0.0,
            "unknown_outcome": unknown,
            "actions_skipped": recorder.actions_skipped,
            "lost": lost,
            "intervals_traded": intervals_traded,
            "intervals_checked": checked,
        },
        "readings": {
            "meters": meters_pushed,
            "gateways": len(gateways),
            "sent": recorder.readings_sent,
            "accepted": recorder.readings_accepted,
            "rejected": recorder.readings_rejected,
            "in_failed_calls": recorder.readings_in_failed_calls,
            "accepted_per_s": round(recorder.readings_accepted / load_s, 1) if load_s > 0 else 0.0,
            "rejections": dict(recorder.reading_errors),
        },
        "latency_ms": {name: summarize_ms(values) for name, values in recorder.latencies_s.items()},
        "errors": {name: dict(codes) for name, codes in recorder.errors.items() if codes},
        "error_examples": {key: list(texts) for key, texts in recorder.error_examples.items()},
        "clearing": {
            "intervals_cleared": len(solver_ms),
            "solver_ms": summarize(solver_ms, 3),
            "gate_to_result_wall_s": summarize(gate_to_result, 3),
        },
        "settlement": {
            "intervals_settled": len(lag_wall),
            "settlement_lag_sim_s": summarize(lag_sim, 1),
            "settlement_lag_wall_s": summarize(lag_wall, 3),
        },
        "intervals": intervals,
        "earlier_intervals_reported": len(earlier),
        "timeline": recorder.timeline(recorder.started_s + load_s),
        "stack": {
            "description": endpoints.description,
            "order_book": endpoints.order_book,
            "meter_ingest": endpoints.meter_ingest or None,
            "nats_url": endpoints.nats_url,
            "settings": endpoints.settings,
            "events": list(endpoints.events),
            "exit_codes": exit_codes,
        },
    }


# ---------------------------------------------------------------------- the two ways to run


def external_endpoints(config: LoadConfig) -> Endpoints:
    external = config.external
    assert external is not None
    clock: Clock = RealClock()
    if external.sim_anchor_wall_s is not None and external.sim_start_s is not None:
        clock = SimulatedClock(external.sim_start_s, config.speedup, external.sim_anchor_wall_s)
        clock_text = f"simulated clock {config.speedup:g}x (start {external.sim_start_s:.0f}, anchor {external.sim_anchor_wall_s:.3f})"
    else:
        clock_text = "real clock"
    return Endpoints(
        nats_url=external.nats_url,
        order_book=external.order_book,
        meter_ingest=external.meter_ingest,
        clock=clock,
        description=f"external, order book {external.order_book}, "
        f"meter_ingest {external.meter_ingest or 'not driven'}, NATS {external.nats_url}, {clock_text}",
        settings=[
            f"clock: {clock_text}",
            f"interval {config.interval_s} s, gate closure {config.gate_closure_s} s before",
        ],
    )


async def run_against_own_stack(
    config: LoadConfig, nodes: list[str], say: Callable[[str], None], deadline: Deadline
) -> tuple[dict[str, Any], bool]:
    """Start nats-server and the five services (SQLite, simulated clock), run the load, stop them."""
    import shutil

    from services.stack.supervisor import Stack, StackConfig

    keep = config.workdir is not None
    workdir = (
        config.workdir if config.workdir is not None else Path(tempfile.mkdtemp(prefix="p2pgrid-loadtest-"))
    )
    workdir.mkdir(parents=True, exist_ok=True)
    meters_path = workdir / "meters.yaml"
    if config.meters > 0:
        write_meters_for(meters_path, config, nodes)
    # The market clock opens at the start of the wall clock's current interval.
    sim_start_s = float(Interval.containing(time.time(), config.interval_s).start_s)
    skew_s = max(30.0, OWN_STACK_CLOCK_SKEW_WALL_S * config.speedup)
    extra_env = {
        "order_book": {"P2PGRID_ORDER_BOOK_GRID_FILE": str(config.grid_path)},
        "ledger": {
            "P2PGRID_LEDGER_METERING_DELAY_S": str(OWN_STACK_METERING_DELAY_S),
            "P2PGRID_LEDGER_SETTLE_PERIOD_S": f"{OWN_STACK_SETTLE_PERIOD_S:g}",
        },
        "meter_ingest": {"P2PGRID_METER_INGEST_MAX_CLOCK_SKEW_S": f"{skew_s:g}"},
    }
    stack = Stack(
        StackConfig(
            workdir=workdir,
            sim_start_s=sim_start_s,
            speedup=config.speedup,
            grid_path=str(config.grid_path),
            meters_path=str(meters_path) if config.meters > 0 else "",
            extra_env=extra_env,
        )
    )
    say(
        f"p2pgrid loadtest: starting nats-server and five services in {workdir}"
        + ("" if keep else " (removed at the end)")
    )
    started_s = time.monotonic()
    try:
        await asyncio.to_thread(stack.start)
    except (RuntimeError, TimeoutError, OSError) as exc:
        await asyncio.to_thread(stack.stop)
        raise StackFailed(str(exc).splitlines()[0]) from None
    say(f"  stack serving after {time.monotonic() - started_s:.1f} s")
    clock = SimulatedClock(sim_start_s, config.speedup, stack.anchor_wall_s)
    endpoints = Endpoints(
        nats_url=stack.nats.url,
        order_book=f"127.0.0.1:{stack.services['order_book'].grpc_port}",
        meter_ingest=f"127.0.0.1:{stack.services['meter_ingest'].grpc_port}",
        clock=clock,
        description=f"own: nats-server and the five services on SQLite, simulated clock {config.speedup:g}x",
        settings=[
            f"simulated clock {config.speedup:g}x from {iso(sim_start_s)}",
            f"interval {config.interval_s} s, gate closure {config.gate_closure_s} s before",
            f"grid {config.grid_path.name}, {config.meters} push meters (meters file {meters_path.name})",
            f"ledger metering delay {OWN_STACK_METERING_DELAY_S} s (market), settle period "
            f"{OWN_STACK_SETTLE_PERIOD_S:g} s (wall); meter_ingest max clock skew {skew_s:g} s (market)",
            "everything else at the services' defaults",
        ],
        check=stack.check,
    )
    report: dict[str, Any] | None = None
    sound = False
    try:
        report, sound = await run_load(config, endpoints, nodes, say, deadline)
    finally:
        codes = await asyncio.to_thread(stack.stop)
        if report is not None:
            report["stack"]["exit_codes"] = codes
            if any(code != 0 for code in codes.values()):
                sound = False
                report["outcome"] = f"FAILED: services exited with errors {codes}; logs in {workdir / 'logs'}"
        if not keep and report is not None and sound:
            shutil.rmtree(workdir, ignore_errors=True)
    return report, sound


class StackFailed(RuntimeError):
    """The own stack did not come up."""


class Unreachable(RuntimeError):
    """An address given for an external stack does not answer."""


async def _reachable(option: str, target: str, timeout_s: float = 3.0) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout_s)
        except TimeoutError:
            raise Unreachable(f"{option} {target}: no gRPC server answered within {timeout_s:g} s") from None


async def run(config: LoadConfig, nodes: list[str], say: Callable[[str], None]) -> int:
    """The whole run: the report written to `config.report_dir`; 0 when sound, 1 otherwise.

    Ctrl-C (or SIGTERM) at any moment ends the load at once; a stack being started is stopped after it
    came up, and the report covers what ran.
    """
    deadline = Deadline()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, deadline.stop)
    try:
        if config.external is None:
            report, sound = await run_against_own_stack(config, nodes, say, deadline)
        else:
            endpoints = external_endpoints(config)
            await _reachable("--order-book", endpoints.order_book)
            if endpoints.meter_ingest:
                await _reachable("--meter-ingest", endpoints.meter_ingest)
            report, sound = await run_load(config, endpoints, nodes, say, deadline)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    json_path, markdown_path = write_report(config.report_dir, report)
    orders, readings = report["orders"], report["readings"]
    say(
        f"p2pgrid loadtest: {orders['acknowledged']} orders acknowledged ({orders['acknowledged_per_s']}/s), "
        f"{readings['accepted']} readings accepted ({readings['accepted_per_s']}/s), "
        f"{sum(sum(c.values()) for c in report['errors'].values())} errors; {report['outcome']}"
    )
    say(f"p2pgrid loadtest: report {markdown_path} and {json_path}")
    return 0 if sound else 1
