"""`p2pgrid up`: the whole market on one machine with embedded defaults."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from services.domain.intervals import DEFAULT_INTERVAL_S, Interval


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "up",
        help="run the whole market locally (nats-server, five services, simulated clock)",
        description="Start nats-server from the wheel and the five services with SQLite in a work folder, "
        "on a simulated clock, and show progress until the intervals are done or Ctrl-C.",
    )
    parser.add_argument("--intervals", type=int, default=8, help="delivery intervals to run (default 8)")
    parser.add_argument("--speedup", type=float, default=60.0, help="simulated seconds per wall second (default 60)")
    parser.add_argument("--grid", default="", help="network YAML (default: the sample feeder when available)")
    parser.add_argument("--workdir", default="", help="folder for databases, logs and NATS (default: a temporary one)")
    parser.set_defaults(func=run_up)


def run_up(args: argparse.Namespace) -> int:
    from services.stack.supervisor import Stack, StackConfig

    if args.intervals <= 0:
        print("p2pgrid up: error: --intervals must be positive", file=sys.stderr)
        return 2
    if args.speedup <= 0:
        print("p2pgrid up: error: --speedup must be positive", file=sys.stderr)
        return 2
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="p2pgrid-up-"))
    first = Interval.containing(time.time()).next()
    # Start the simulated day just before the first interval's gate closes, so trading starts at once.
    sim_start_s = float(first.start_s - DEFAULT_INTERVAL_S)
    stack = Stack(StackConfig(workdir=workdir, sim_start_s=sim_start_s, speedup=args.speedup, grid_path=args.grid))
    stopping = False

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    print(f"p2pgrid up: work folder {workdir}", flush=True)
    try:
        stack.start()
    except (RuntimeError, TimeoutError) as exc:
        print(f"p2pgrid up: error: {exc}", file=sys.stderr)
        stack.stop()
        return 1
    for name, service in stack.services.items():
        print(f"  {name:<13} gRPC 127.0.0.1:{service.grpc_port}  metrics http://127.0.0.1:{service.metrics_port}/metrics")
    end_s = first.start_s + args.intervals * DEFAULT_INTERVAL_S
    clock_start = time.time()
    while not stopping:
        sim_now_s = sim_start_s + (time.time() - clock_start) * args.speedup
        for event in stack.check():
            print(f"  ! {event}", flush=True)
        done = max(0, int((sim_now_s - first.start_s) // DEFAULT_INTERVAL_S))
        print(
            f"\r  simulated {Interval.containing(sim_now_s).iso()}  intervals {min(done, args.intervals)}/{args.intervals}",
            end="",
            flush=True,
        )
        if sim_now_s >= end_s:
            break
        time.sleep(0.5)
    print()
    codes: dict[str, Any] = stack.stop()
    failed = {name: code for name, code in codes.items() if code != 0}
    if failed:
        print(f"p2pgrid up: services exited with errors: {failed}", file=sys.stderr)
        return 1
    print("p2pgrid up: stopped cleanly", flush=True)
    return 0
