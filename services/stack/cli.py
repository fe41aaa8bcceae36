"""`p2pgrid up`: the whole market on one machine with embedded defaults."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from services.domain.intervals import DEFAULT_GATE_CLOSURE_S, DEFAULT_INTERVAL_S, Interval

# Wall seconds to wait for the last clearings and settlements once the simulated deadline has passed.
SETTLE_GRACE_WALL_S = 30.0
DEFAULT_GRID = Path(__file__).resolve().parents[2] / "deploy" / "grids" / "lv_feeder.yaml"
DEFAULT_METER_MAP = "eastron_sdm630_v2"
# Simulated seconds between two polls of a meter (at least one wall second, at most five).
POLL_SPACING_SIM_S = 150.0
LEDGER_METERING_DELAY_S = 900


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


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "up",
        help="run the whole market locally (nats-server, five services, prosumer bots, simulated clock)",
        description="Start nats-server from the wheel and the five services with SQLite in a work folder, "
        "on a simulated clock, with prosumer bots trading; show each interval as it clears and settles, "
        "until the intervals are done or Ctrl-C.",
    )
    parser.add_argument("--prosumers", type=int, default=12, help="prosumer bots (default 12)")
    parser.add_argument("--intervals", type=int, default=8, help="delivery intervals to run (default 8)")
    parser.add_argument(
        "--speedup", type=float, default=60.0, help="simulated seconds per wall second (default 60)"
    )
    parser.add_argument(
        "--grid",
        default="",
        help=f"network YAML (default {DEFAULT_GRID.relative_to(DEFAULT_GRID.parents[2])})",
    )
    parser.add_argument(
        "--workdir", default="", help="folder for databases, logs and NATS (default: a temporary one)"
    )
    parser.add_argument(
        "--meter-map",
        default=DEFAULT_METER_MAP,
        help=f"register map of the simulated household meters, an id in hw/meters (default {DEFAULT_METER_MAP})",
    )
    parser.set_defaults(func=run_up)


def _error(message: str) -> int:
    print(f"p2pgrid up: error: {message}", file=sys.stderr)
    return 2


def run_up(args: argparse.Namespace) -> int:
    from services.domain.grid import ConsistencyError, load_grid

    if args.intervals <= 0:
        return _error("--intervals must be positive")
    if args.speedup <= 0:
        return _error("--speedup must be positive")
    if args.prosumers < 0:
        return _error("--prosumers must not be negative")
    grid_path = Path(args.grid) if args.grid else DEFAULT_GRID
    try:
        grid = load_grid(grid_path)
    except (OSError, ConsistencyError, ValueError) as exc:
        return _error(f"--grid {grid_path}: {exc}")
    from services.meter_ingest.domain.register_map import RegisterMapError
    from services.meter_ingest.maps import load_register_map

    try:
        load_register_map(args.meter_map)
    except (OSError, RegisterMapError, ValueError) as exc:
        return _error(f"--meter-map {args.meter_map}: {exc}")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="p2pgrid-up-"))
    return asyncio.run(_run(args, grid, grid_path, workdir))


async def _run(args: argparse.Namespace, grid: object, grid_path: Path, workdir: Path) -> int:
    from services.domain.grid import Grid
    from services.domain.intervals import SimulatedClock
    from services.stack.market import (
        MarketProgress,
        follow_streams,
        prosumers_of,
        run_bots,
        write_meters_file,
    )
    from services.stack.supervisor import Stack, StackConfig

    assert isinstance(grid, Grid)
    interval_s = DEFAULT_INTERVAL_S
    # The simulated market opens at the next interval boundary of the wall clock.
    sim_start_s = float(Interval.containing(time.time()).next().start_s - interval_s)
    metering = Metering.at(args.speedup)
    stack = Stack(
        StackConfig(
            workdir=workdir,
            sim_start_s=sim_start_s,
            speedup=args.speedup,
            grid_path=str(grid_path),
            extra_env={
                "order_book": {"P2PGRID_ORDER_BOOK_GRID_FILE": str(grid_path)},
                "meter_ingest": {
                    "P2PGRID_METER_INGEST_READING_GAP_S": str(metering.reading_gap_s),
                    "P2PGRID_METER_INGEST_METERING_DELAY_S": str(metering.metering_delay_s),
                    "P2PGRID_METER_INGEST_MEASURED_SPAN_S": str(metering.measured_span_s),
                },
                "ledger": {"P2PGRID_LEDGER_METERING_DELAY_S": str(LEDGER_METERING_DELAY_S)},
            },
        )
    )
    households = prosumers_of(grid, args.prosumers)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"p2pgrid up: work folder {workdir}", flush=True)
    try:
        if households:
            gateways = await asyncio.to_thread(stack.start_meters, len(households), args.meter_map)
            meters_path = workdir / "meters.yaml"
            write_meters_file(
                meters_path, households, gateways, host="127.0.0.1", poll_interval_s=metering.poll_wall_s
            )
            stack.config.meters_path = str(meters_path)
            print(
                f"  {len(households)} simulated {args.meter_map} meters on Modbus TCP ports "
                f"{','.join(map(str, gateways.ports))}, polled every {metering.poll_wall_s:g} s",
                flush=True,
            )
        await asyncio.to_thread(stack.start)
    except (RuntimeError, TimeoutError) as exc:
        print(f"p2pgrid up: error: {exc}", file=sys.stderr)
        await asyncio.to_thread(stack.stop)
        return 1
    for name, service in stack.services.items():
        print(
            f"  {name:<13} gRPC 127.0.0.1:{service.grpc_port}  metrics http://127.0.0.1:{service.metrics_port}/metrics"
        )
    clock = SimulatedClock(sim_start_s, args.speedup, stack.anchor_wall_s)
    progress = MarketProgress()
    follower = asyncio.create_task(follow_streams(stack.nats.url, progress, stop))
    target = f"127.0.0.1:{stack.services['order_book'].grpc_port}"
    began = time.monotonic()
    bots = await run_bots(
        target,
        households,
        clock,
        stop,
        interval_s=interval_s,
        gate_closure_s=DEFAULT_GATE_CLOSURE_S,
    )
    print(
        f"  {args.prosumers} prosumer bots registered in {time.monotonic() - began:.1f} s, trading on "
        f"{grid_path.name} ({len(grid.nodes)} nodes)",
        flush=True,
    )
    # The first interval traded is the first whose gate closes at least a few wall seconds from now,
    # so that every bot has registered and bid, whatever the speed-up.
    bidding_s = DEFAULT_GATE_CLOSURE_S + 5.0 * args.speedup
    first_start_s = (int((clock.now_s() + bidding_s) // interval_s) + 1) * interval_s
    wanted = [first_start_s + i * interval_s for i in range(args.intervals)]
    # Give the last interval its gate closure, clearing and settlement, then a margin of one interval.
    deadline_sim_s = wanted[-1] + interval_s + LEDGER_METERING_DELAY_S
    shown: set[int] = set()
    give_up_wall_s = 0.0
    while not stop.is_set():
        for event in await asyncio.to_thread(stack.check):
            print(f"  ! {event}", flush=True)
        for start_s in wanted:
            summary = progress.intervals.get(start_s)
            if summary is not None and summary.cleared and start_s not in shown:
                shown.add(start_s)
                prices = sorted(summary.prices_micro_per_kwh.values()) or [0]
                print(
                    f"  {Interval(start_s).iso()}  orders {summary.orders:>4}  traded {summary.volume_wh / 1000:>9.3f} kWh"
                    f"  price {prices[0] / 1e6:.4f}..{prices[-1] / 1e6:.4f}/kWh"
                    f"  binding {','.join(summary.binding_lines) or '-'}",
                    flush=True,
                )
        cleared, settled = progress.cleared(wanted), progress.settled(wanted)
        if cleared == len(wanted) and settled == len(wanted):
            break
        if clock.now_s() >= deadline_sim_s + interval_s:
            # Past the simulated deadline, a busy machine still gets a little wall time to publish.
            give_up_wall_s = give_up_wall_s or time.monotonic() + SETTLE_GRACE_WALL_S
            if time.monotonic() >= give_up_wall_s:
                break
        await asyncio.sleep(0.5)
    stop.set()
    outcomes = await asyncio.gather(*bots, follower, return_exceptions=True)
    failures = [
        (task.get_name(), o)
        for task, o in zip([*bots, follower], outcomes, strict=True)
        if isinstance(o, BaseException) and not isinstance(o, asyncio.CancelledError)
    ]
    if failures:
        name, first = failures[0]
        print(f"  ! {len(failures)} bots failed; the first, {name}: {first!r}", flush=True)
    codes = await asyncio.to_thread(stack.stop)
    cleared, settled = progress.cleared(wanted), progress.settled(wanted)
    print(
        f"p2pgrid up: {cleared}/{len(wanted)} intervals cleared, {settled}/{len(wanted)} settled", flush=True
    )
    failed = {name: code for name, code in codes.items() if code != 0}
    if failed:
        print(
            f"p2pgrid up: services exited with errors: {failed}; logs in {workdir / 'logs'}", file=sys.stderr
        )
        return 1
    return 0 if cleared == len(wanted) and settled == len(wanted) else 1
