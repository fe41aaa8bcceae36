"""`p2pgrid up`: the whole market on one machine with embedded defaults."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from services.domain.intervals import Interval
from services.stack.defaults import DEFAULT_GRID, DEFAULT_METER_MAP, REPO

if TYPE_CHECKING:
    from services.stack.local_market import LocalMarket


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
        help=f"network YAML (default {DEFAULT_GRID.relative_to(REPO)} of the repository)",
    )
    parser.add_argument(
        "--workdir", default="", help="folder for databases, logs and NATS (default: a temporary one)"
    )
    parser.add_argument(
        "--meter-map",
        default=DEFAULT_METER_MAP,
        help=f"register map of the simulated household meters, an id in hw/meters (default {DEFAULT_METER_MAP})",
    )
    parser.add_argument(
        "--report-dir",
        default="",
        help="at the end, write the report here: report.md (per interval and per participant, ledger "
        "verified), summary.json and PNG charts",
    )
    parser.set_defaults(func=run_up)


def register_bench(benches: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    day = benches.add_parser(
        "day",
        help="a whole day of the local market (default 1,000 households, 96 intervals at 240x) against "
        "the 10-minute target",
        description="Run `p2pgrid up --report-dir` for a day and print one JSON line: wall seconds against the "
        "600 s target, intervals cleared and settled, acknowledged orders and those lost, ledger verified. "
        "Progress goes to stderr.",
    )
    day.add_argument("--prosumers", type=int, default=1000)
    day.add_argument("--intervals", type=int, default=96)
    day.add_argument("--speedup", type=float, default=240.0)
    day.add_argument("--workdir", default="", help="default: a temporary folder")
    day.set_defaults(func=_bench_day)


DAY_TARGET_WALL_S = 600.0


def _bench_day(args: argparse.Namespace) -> int:
    import contextlib
    import json
    import time

    if args.prosumers <= 0 or args.intervals <= 0 or args.speedup <= 0:
        print(
            "p2pgrid bench day: error: --prosumers, --intervals and --speedup must be positive",
            file=sys.stderr,
        )
        return 2
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="p2pgrid-day-"))
    run_args = argparse.Namespace(
        prosumers=args.prosumers,
        intervals=args.intervals,
        speedup=args.speedup,
        meter_map=DEFAULT_METER_MAP,
        report_dir=str(workdir / "report"),
    )
    outcome: dict[str, object] = {}
    began = time.monotonic()
    with contextlib.redirect_stdout(sys.stderr):
        code = asyncio.run(_run(run_args, DEFAULT_GRID, workdir, outcome))
    wall_s = time.monotonic() - began
    figures = {
        "part": "day",
        "prosumers": args.prosumers,
        "speedup": args.speedup,
        "wall_s": round(wall_s, 1),
        "target_wall_s": DAY_TARGET_WALL_S,
        "ratio_vs_target": round(wall_s / DAY_TARGET_WALL_S, 3),
        **outcome,
        "report": str(workdir / "report" / "report.md"),
    }
    figures["meets_target"] = bool(code == 0 and wall_s <= DAY_TARGET_WALL_S)
    print(json.dumps(figures), flush=True)
    return code


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
    if args.report_dir and Path(args.report_dir).exists() and not Path(args.report_dir).is_dir():
        return _error(f"--report-dir {args.report_dir} exists and is not a folder")
    try:
        load_grid(grid_path)
    except (OSError, ConsistencyError, ValueError) as exc:
        return _error(f"--grid {grid_path}: {exc}")
    from services.meter_ingest.domain.register_map import RegisterMapError
    from services.meter_ingest.maps import load_register_map

    try:
        load_register_map(args.meter_map)
    except (OSError, RegisterMapError, ValueError) as exc:
        return _error(f"--meter-map {args.meter_map}: {exc}")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="p2pgrid-up-"))
    return asyncio.run(_run(args, grid_path, workdir))


async def _run(
    args: argparse.Namespace, grid_path: Path, workdir: Path, outcome: dict[str, object] | None = None
) -> int:
    """Run the market; `outcome`, if given, receives the run's figures (for `p2pgrid bench day`)."""
    outcome = {} if outcome is None else outcome
    from services.stack.local_market import LocalMarket, MarketOptions

    def say(line: str) -> None:
        print(f"  {line}", flush=True)

    market = LocalMarket(
        MarketOptions(
            workdir=workdir,
            grid_path=grid_path,
            prosumers=args.prosumers,
            speedup=args.speedup,
            meter_map=args.meter_map,
        ),
        say,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"p2pgrid up: work folder {workdir}", flush=True)
    try:
        await market.start()
    except (RuntimeError, TimeoutError) as exc:
        print(f"p2pgrid up: error: {exc}", file=sys.stderr)
        return 1
    wanted = market.next_intervals(args.intervals)
    say(f"trading {len(wanted)} intervals from {Interval(wanted[0]).iso()} (Ctrl-C stops)")
    finished = await market.run_until_settled(wanted, stop)
    report_ok = True
    # The traded intervals are settled: the bots stop, so the report has the machine to itself.
    await market.stop_trading()
    if args.report_dir and not stop.is_set():
        report_ok = await _write_report(market, wanted, Path(args.report_dir), say, stop)
        outcome["ledger_verified"] = report_ok
    codes = await market.close()
    cleared, settled = market.progress.cleared(wanted), market.progress.settled(wanted)
    held, lost = market.lost_orders(wanted)
    outcome.update(
        intervals=len(wanted),
        cleared=cleared,
        settled=settled,
        acknowledged_orders=held,
        lost_orders=len(lost),
    )
    print(
        f"p2pgrid up: {cleared}/{len(wanted)} intervals cleared, {settled}/{len(wanted)} settled; "
        f"{held - len(lost)} of {held} acknowledged orders in their clearing ({len(lost)} lost)",
        flush=True,
    )
    if lost:
        print(
            f"p2pgrid up: acknowledged orders missing from their clearing: {', '.join(lost[:10])}",
            file=sys.stderr,
        )
    failed = {name: code for name, code in codes.items() if code != 0}
    if failed:
        print(
            f"p2pgrid up: services exited with errors: {failed}; logs in {workdir / 'logs'}", file=sys.stderr
        )
        return 1
    return 0 if finished and report_ok and not lost else 1


async def _write_report(
    market: LocalMarket,
    wanted: list[int],
    report_dir: Path,
    say: Callable[[str], None],
    stop: asyncio.Event,
) -> bool:
    """The report folder; False (and why, on stderr) if it could not be written or the ledger fails."""
    from services.stack.report import ReportError, write_report

    say(f"writing the report to {report_dir}")
    writing = asyncio.ensure_future(
        write_report(
            report_dir,
            nats_url=market.stack.nats.url,
            ledger_database_url=market.stack.database_url("ledger"),
            grid=market.grid,
            intervals=wanted,
            labels=market.labels,
            network_name=market.options.grid_path.name,
            progress=lambda step: say(f"report: {step}"),
            read_timeout_s=300.0,
        )
    )
    interrupted = asyncio.ensure_future(stop.wait())
    await asyncio.wait((writing, interrupted), return_when=asyncio.FIRST_COMPLETED)
    interrupted.cancel()
    if not writing.done():
        writing.cancel()
        print("p2pgrid up: the report was interrupted", file=sys.stderr)
        return False
    try:
        summary = writing.result()
    except (ReportError, OSError) as exc:
        print(f"p2pgrid up: error: the report could not be written: {exc}", file=sys.stderr)
        return False
    say(f"ledger {'verified' if summary.ledger_verified else 'NOT verified'}: {summary.ledger_message}")
    for problem in summary.problems:
        say(f"! {problem}")
    say(f"report: {report_dir / 'report.md'}")
    return summary.ok
