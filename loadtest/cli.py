"""`p2pgrid loadtest`: drive a scenario against the market for a bounded time and write a JSON and a markdown report."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from loadtest.scenarios import DESCRIPTIONS, METER_FLOOD, SCENARIOS, STEADY
from services.stack.defaults import DEFAULT_GRID

if TYPE_CHECKING:
    from loadtest.runner import LoadConfig

DEFAULT_SPEEDUP = 120.0
DEFAULT_FLOOD_METERS = 1000
PROG = "p2pgrid loadtest"


def _usage_error(message: str) -> NoReturn:
    """argparse's usage errors as one line on stderr and exit code 2 (instead of the usage text)."""
    sys.stderr.write(f"{PROG}: error: {message}\n")
    raise SystemExit(2)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    scenarios = "; ".join(f"{name}: {text}" for name, text in DESCRIPTIONS.items())
    parser = commands.add_parser(
        "loadtest",
        help="run a load scenario against the market and write a report (throughput, latency, clearing, settlement)",
        description="Drive traders and push meters through the public gRPC API for --duration wall seconds, "
        "then wait a short drain for clearing and settlement, and write loadtest-report.json and "
        "loadtest-report.md. By default it starts its own stack (nats-server and the five services on "
        f"SQLite, simulated clock) and stops it at the end. Scenarios: {scenarios}.",
    )
    parser.error = _usage_error  # type: ignore[method-assign]
    # Unknown options would otherwise reach the top-level parser, which prints its usage text first.
    parse_known_args = parser.parse_known_args

    def parse_strictly(
        args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = parse_known_args(args, namespace)
        if extras:
            _usage_error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras

    parser.parse_known_args = parse_strictly  # type: ignore[method-assign,assignment]
    parser.add_argument(
        "--scenario", default=STEADY, help=f"one of {', '.join(SCENARIOS)} (default {STEADY})"
    )
    parser.add_argument("--duration", default="60", help="wall seconds of load (default 60)")
    parser.add_argument(
        "--report-dir",
        default="",
        help="where the report goes (default loadtest-reports/<scenario>-<UTC time>)",
    )
    parser.add_argument(
        "--prosumers", default="50", help="traders, each a participant with its key (default 50)"
    )
    parser.add_argument(
        "--rate", default="200", help="order actions per second asked for, all traders (default 200)"
    )
    parser.add_argument(
        "--speedup",
        default="",
        help=f"market seconds per wall second (own stack: default {DEFAULT_SPEEDUP:g}; an external stack's "
        "simulated clock: its value)",
    )
    parser.add_argument(
        "--meters",
        default="",
        help=f"push meters (default: one per trader; {METER_FLOOD}: {DEFAULT_FLOOD_METERS})",
    )
    parser.add_argument(
        "--gateways", default="4", help="gateway keys the push meters are spread over (default 4)"
    )
    parser.add_argument(
        "--reading-period-s",
        default="15",
        help="market scenarios: market seconds between a meter's readings (15)",
    )
    parser.add_argument(
        "--messages-per-call",
        default="10",
        help=f"{METER_FLOOD}: messages in one PushReadings call (default 10)",
    )
    parser.add_argument(
        "--intervals-ahead", default="2", help="traders address the next N intervals to close (2)"
    )
    parser.add_argument(
        "--amend-share", default="0.25", help="share of actions that amend a live order (0.25)"
    )
    parser.add_argument(
        "--drain",
        default="30",
        help="at most this many wall seconds after the load for clearing and settlement (30)",
    )
    parser.add_argument("--seed", default="1", help="derives the traders' and gateways' keys (default 1)")
    parser.add_argument(
        "--grid",
        default="",
        help=f"network YAML whose household nodes the traders use (default {DEFAULT_GRID.name})",
    )
    parser.add_argument(
        "--workdir", default="", help="own stack: keep its databases, logs and NATS store here"
    )
    external = parser.add_argument_group(
        "an already running stack (instead of starting one)",
        "Give --nats-url and --order-book (and --meter-ingest to push readings). That meter_ingest must read "
        "the meters file that --write-meters-file writes for the same --meters, --gateways, --prosumers, "
        "--seed and --grid. Its clock: the real clock, or --speedup with --sim-start-s and --sim-anchor-wall-s "
        "as the stack was started with.",
    )
    external.add_argument("--nats-url", default="", help="the stack's NATS, e.g. nats://127.0.0.1:4222")
    external.add_argument("--order-book", default="", help="order book gRPC address, e.g. 127.0.0.1:50051")
    external.add_argument("--meter-ingest", default="", help="meter_ingest gRPC address")
    external.add_argument("--sim-start-s", default="", help="the stack's simulated clock: its start (Unix s)")
    external.add_argument(
        "--sim-anchor-wall-s", default="", help="the stack's simulated clock: its anchor (Unix s)"
    )
    external.add_argument("--interval-s", default="900", help="the market's interval length (default 900)")
    external.add_argument(
        "--gate-closure-s", default="300", help="the market's gate closure lead (default 300)"
    )
    parser.add_argument(
        "--write-meters-file",
        default="",
        metavar="PATH",
        help="write the meters file the push meters need (for an external meter_ingest) and exit",
    )
    parser.set_defaults(func=run_loadtest)


class BadInput(ValueError):
    """One line naming the option and the rule."""


def _number(
    args: argparse.Namespace, name: str, kind: type[int] | type[float], minimum: float, *, above: bool
) -> float:
    raw = getattr(args, name.replace("-", "_"))
    try:
        value = kind(raw)
    except ValueError:
        raise BadInput(f"--{name} {raw!r} is not {'an integer' if kind is int else 'a number'}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise BadInput(f"--{name} {raw!r} is not a finite number")
    if (above and value <= minimum) or (not above and value < minimum):
        raise BadInput(f"--{name} must be {'greater than' if above else 'at least'} {minimum:g}, got {raw}")
    return value


def parse_config(args: argparse.Namespace) -> tuple[LoadConfig, list[str]]:
    """The LoadConfig and the traders' nodes, or BadInput."""
    from loadtest.runner import ExternalStack, LoadConfig, household_nodes
    from services.domain.grid import ConsistencyError, load_grid

    if args.scenario not in SCENARIOS:
        raise BadInput(f"--scenario {args.scenario!r} is not one of {', '.join(SCENARIOS)}")
    duration_s = _number(args, "duration", float, 0, above=True)
    prosumers = int(_number(args, "prosumers", int, 1, above=False))
    rate_per_s = _number(args, "rate", float, 0, above=True)
    gateways = int(_number(args, "gateways", int, 1, above=False))
    reading_period_s = _number(args, "reading-period-s", float, 0, above=True)
    messages_per_call = int(_number(args, "messages-per-call", int, 1, above=False))
    intervals_ahead = int(_number(args, "intervals-ahead", int, 1, above=False))
    amend_share = _number(args, "amend-share", float, 0, above=False)
    if amend_share > 1:
        raise BadInput(f"--amend-share must be at most 1, got {args.amend_share}")
    drain_s = _number(args, "drain", float, 0, above=False)
    seed = int(_number(args, "seed", int, 0, above=False))
    interval_s = int(_number(args, "interval-s", int, 0, above=True))
    gate_closure_s = int(_number(args, "gate-closure-s", int, 0, above=False))
    if gate_closure_s >= interval_s * 96:
        raise BadInput("--gate-closure-s must be shorter than the market's horizon")
    meters_default = DEFAULT_FLOOD_METERS if args.scenario == METER_FLOOD else prosumers
    meters = meters_default if args.meters == "" else int(_number(args, "meters", int, 0, above=False))
    if args.scenario == METER_FLOOD and meters == 0:
        raise BadInput(f"--scenario {METER_FLOOD} needs at least one push meter (--meters)")
    speedup = DEFAULT_SPEEDUP if args.speedup == "" else _number(args, "speedup", float, 0, above=True)

    external = None
    addresses = {"nats-url": args.nats_url, "order-book": args.order_book, "meter-ingest": args.meter_ingest}
    if any(addresses.values()):
        for name in ("nats-url", "order-book"):
            if not addresses[name]:
                raise BadInput(
                    f"--{name} is needed with an external stack (as are --nats-url and --order-book)"
                )
        if args.scenario == METER_FLOOD and not args.meter_ingest:
            raise BadInput(f"--scenario {METER_FLOOD} against an external stack needs --meter-ingest")
        if args.workdir:
            raise BadInput("--workdir is for the stack the load test starts, not an external one")
        sim = (args.sim_start_s, args.sim_anchor_wall_s)
        if any(sim) and not all(sim):
            raise BadInput("--sim-start-s and --sim-anchor-wall-s go together (the stack's simulated clock)")
        if all(sim) and args.speedup == "":
            raise BadInput("--speedup is needed with --sim-start-s (the stack's simulated clock)")
        if args.speedup != "" and not all(sim):
            raise BadInput("--speedup against an external stack needs --sim-start-s and --sim-anchor-wall-s")
        external = ExternalStack(
            nats_url=args.nats_url,
            order_book=args.order_book,
            meter_ingest=args.meter_ingest,
            sim_start_s=_number(args, "sim-start-s", float, 0, above=True) if all(sim) else None,
            sim_anchor_wall_s=_number(args, "sim-anchor-wall-s", float, 0, above=True) if all(sim) else None,
        )
        if not all(sim):
            speedup = 1.0
    else:
        for name in ("sim_start_s", "sim_anchor_wall_s"):
            if getattr(args, name):
                raise BadInput(
                    f"--{name.replace('_', '-')} describes an external stack's clock; give its addresses too"
                )
        if interval_s != 900 or gate_closure_s != 300:
            raise BadInput(
                "--interval-s and --gate-closure-s describe an external stack; the own stack uses 900 and 300"
            )
    if args.workdir and Path(args.workdir).exists():
        workdir = Path(args.workdir)
        if not workdir.is_dir() or any(workdir.iterdir()):
            # A used work folder holds meter state and orders from another clock: readings would be duplicates.
            raise BadInput(f"--workdir {workdir} must be a new or empty folder")
    report_dir = (
        Path(args.report_dir)
        if args.report_dir
        else Path("loadtest-reports") / f"{args.scenario}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
    )
    if report_dir.exists() and not report_dir.is_dir():
        raise BadInput(f"--report-dir {report_dir} is a file, not a folder")
    grid_path = Path(args.grid) if args.grid else DEFAULT_GRID
    try:
        grid = load_grid(grid_path)
    except (OSError, ConsistencyError, ValueError) as exc:
        raise BadInput(
            f"--grid {grid_path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    nodes = household_nodes(grid)
    config = LoadConfig(
        scenario=args.scenario,
        duration_s=duration_s,
        report_dir=report_dir,
        grid_path=grid_path,
        prosumers=prosumers,
        rate_per_s=rate_per_s,
        speedup=speedup,
        meters=meters,
        gateways=gateways,
        reading_period_s=reading_period_s,
        messages_per_call=messages_per_call,
        intervals_ahead=intervals_ahead,
        amend_share=amend_share,
        drain_s=drain_s,
        seed=seed,
        interval_s=interval_s,
        gate_closure_s=gate_closure_s,
        workdir=Path(args.workdir) if args.workdir else None,
        external=external,
    )
    return config, nodes


def _say(line: str) -> None:
    print(line, flush=True)


def run_loadtest(args: argparse.Namespace) -> int:
    from loadtest.runner import StackFailed, Unreachable, run, write_meters_for
    from loadtest.traders import ClockMismatch
    from services.platform.nats_bus import NatsConnectError

    try:
        config, nodes = parse_config(args)
    except BadInput as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if args.write_meters_file:
        path = Path(args.write_meters_file)
        try:
            write_meters_for(path, config, nodes)
        except OSError as exc:
            print(f"{PROG}: error: --write-meters-file {path}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"{PROG}: wrote {config.meters} push meters on {config.gateways} gateways to {path}")
        return 0
    try:
        return asyncio.run(run(config, nodes, _say))
    except ClockMismatch as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except NatsConnectError as exc:
        print(f"{PROG}: error: --nats-url: {exc}", file=sys.stderr)
        return 2
    except Unreachable as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except StackFailed as exc:
        print(f"{PROG}: error: the stack did not start: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
