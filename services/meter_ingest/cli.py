"""`p2pgrid meters read|simulate` and `p2pgrid bench meters`: read a meter once, serve simulated meters, benchmark.

Heavy imports (pymodbus, the simulator, the poller) happen inside the
handlers so `p2pgrid --help` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

FRAMER_CHOICES = ("socket", "rtu")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    meters = subparsers.add_parser("meters", help="read smart meters over Modbus, or simulate them")
    commands = meters.add_subparsers(title="meter commands", metavar="COMMAND")
    meters.set_defaults(func=lambda _args: _help(meters))

    read = commands.add_parser(
        "read",
        help="read one meter once and print its canonical quantities as JSON",
        description="Read one meter once (Modbus TCP or RTU over TCP) and print JSON: valid quantities at the "
        "top level, flagged ones under 'invalid' with their reason.",
    )
    read.add_argument("--map", required=True, help="register map: a path or a model id in hw/meters")
    read.add_argument("--host", default="127.0.0.1")
    read.add_argument("--port", type=int, default=None, help="TCP port (default: the map's, usually 502)")
    read.add_argument("--unit", type=int, default=None, help="Modbus unit id (default: the map's)")
    read.add_argument(
        "--framer", choices=FRAMER_CHOICES, default="socket", help="socket = Modbus TCP, rtu = RTU over TCP"
    )
    read.add_argument(
        "--timeout", type=float, default=None, help="seconds to wait for each answer (default: the map's)"
    )
    read.set_defaults(func=_read)

    simulate = commands.add_parser(
        "simulate",
        help="serve simulated meters over Modbus TCP or RTU over TCP",
        description="Serve COUNT simulated household meters (load + PV profiles on a simulated clock, counters that "
        "integrate power) behind one gateway per port. Prints one JSON line with the ports and the clock, then "
        "serves until interrupted.",
    )
    simulate.add_argument("--map", required=True, help="register map: a path or a model id in hw/meters")
    simulate.add_argument(
        "--count", type=int, default=1, help="meters per gateway (unit ids from --first-unit)"
    )
    simulate.add_argument("--port", type=int, default=5020, help="first TCP port (0: any free port)")
    simulate.add_argument("--gateways", type=int, default=1, help="number of gateways, on consecutive ports")
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--framer", choices=FRAMER_CHOICES, default="socket")
    simulate.add_argument("--speedup", type=float, default=1.0, help="simulated seconds per wall second")
    simulate.add_argument(
        "--start", default=None, help="simulated start time: Unix seconds or ISO 8601 (default: now)"
    )
    simulate.add_argument(
        "--anchor-wall-s",
        type=float,
        default=None,
        help="wall time (Unix seconds) at which the simulated clock reads --start, to share one clock with "
        "other processes (default: now)",
    )
    simulate.add_argument(
        "--first-unit",
        type=int,
        default=None,
        help="first unit id (default: the map's for one meter, else 1)",
    )
    simulate.add_argument("--seed", type=int, default=0, help="varies the household profiles")
    simulate.add_argument(
        "--vectors", action="store_true", help="serve the map's test vectors instead of profiles"
    )
    simulate.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="UNIT:KIND[:READS]",
        help="inject a fault on a unit: timeout, slow, exception2, exception4, nan, sentinel, counter_reset, "
        "backwards, jump; READS limits it to that many reads (repeatable)",
    )
    simulate.add_argument("--duration", type=float, default=None, help="stop after this many wall seconds")
    simulate.set_defaults(func=_simulate)


def register_bench(bench_subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = bench_subparsers.add_parser(
        "meters",
        help="meter ingest: pushed readings per second through the service, polls per second and missed polls",
        description="Push half: starts nats-server and a meter_ingest process, streams readings to it over gRPC "
        "and prints readings_per_s accepted and published to JetStream, after a baseline that publishes the same "
        "batches straight to JetStream. Poll half: starts simulated meters in a child process and polls them "
        "from this process; prints a raw pymodbus read-loop baseline, then polls_per_s and missed_pct of the "
        "poller (with validation). JSON lines.",
    )
    bench.add_argument("--part", choices=("all", "push", "poll"), default="all", help="which half to run")
    bench.add_argument(
        "--push-meters", type=int, default=1000, help="push: meters behind the pushing gateway"
    )
    bench.add_argument(
        "--push-messages", type=int, default=1000, help="push: gRPC messages, each one reading of every meter"
    )
    bench.add_argument(
        "--push-per-message", type=int, default=500, help="push: readings per published ReadingsBatch"
    )
    bench.add_argument(
        "--push-in-flight", type=int, default=8, help="push: ReadingsBatch publishes awaiting acks per stream"
    )
    bench.add_argument("--map", default="eastron_sdm630_v2")
    bench.add_argument(
        "--meters",
        type=int,
        default=1100,
        help="simulated meters in total (1,100 at 1 s offer 1,100 polls/s)",
    )
    bench.add_argument(
        "--gateways",
        type=int,
        default=50,
        help="gateways (connections) the meters are spread over (20 meters each)",
    )
    bench.add_argument("--interval", type=float, default=1.0, help="poll interval per meter, seconds")
    bench.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    bench.add_argument("--warmup", type=float, default=3.0, help="seconds polled before measuring")
    bench.add_argument("--framer", choices=FRAMER_CHOICES, default="socket")
    bench.set_defaults(func=_bench)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _print_json(body: dict[str, Any]) -> None:
    print(json.dumps(body, sort_keys=False), flush=True)


def _read(args: argparse.Namespace) -> int:
    from services.meter_ingest.domain.register_map import RegisterMapError

    try:
        return asyncio.run(_read_async(args))
    except RegisterMapError as exc:
        print(f"p2pgrid meters read: {exc}", file=sys.stderr)
        return 2


async def _read_async(args: argparse.Namespace) -> int:
    from services.meter_ingest.adapters.modbus_poller import GatewayTarget, MeterTarget, ModbusPoller
    from services.meter_ingest.domain.quantities import Quality
    from services.meter_ingest.maps import load_register_map

    rmap = load_register_map(args.map)
    unit = rmap.transport.unit_id if args.unit is None else args.unit
    port = rmap.transport.tcp_port if args.port is None else args.port
    target = GatewayTarget(
        args.host,
        port,
        (MeterTarget("meter", rmap, unit_id=unit),),
        framer=args.framer,
        timeout_s=args.timeout,
    )

    async def discard(_reading: object) -> None:
        return None

    poller = ModbusPoller([target], discard)
    try:
        reading = await poller.poll_once("meter")
    finally:
        await poller.close()
    body: dict[str, Any] = {
        "map": rmap.id,
        "host": args.host,
        "port": port,
        "unit": unit,
        "framer": args.framer,
    }
    body.update(reading.to_json_dict())
    body.pop("meter_id", None)
    _print_json(body)
    # Exit 1 only when the meter did not answer at all; flagged values from an answer are still a reading.
    unanswered = (Quality.TIMEOUT, Quality.UNREACHABLE)
    answered = any(value.quality not in unanswered for value in reading.values.values())
    return 0 if answered else 1


def _parse_start(text: str | None) -> float:
    import time
    from datetime import datetime

    if text is None:
        return time.time()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"--start: {text!r} is neither Unix seconds nor ISO 8601") from exc
    return moment.timestamp()


def _parse_faults(texts: list[str]) -> list[tuple[int, str, int | None]]:
    from services.meter_ingest.simulator import FaultKind

    faults = []
    for text in texts:
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"--fault {text!r}: expected UNIT:KIND or UNIT:KIND:READS")
        try:
            unit = int(parts[0])
            reads = int(parts[2]) if len(parts) == 3 else None
        except ValueError as exc:
            raise ValueError(f"--fault {text!r}: UNIT and READS are integers") from exc
        if parts[1] not in {k.value for k in FaultKind}:
            raise ValueError(f"--fault {text!r}: KIND must be one of {[k.value for k in FaultKind]}")
        faults.append((unit, parts[1], reads))
    return faults


def _simulate(args: argparse.Namespace) -> int:
    from services.meter_ingest.domain.register_map import RegisterMapError

    try:
        return asyncio.run(_simulate_async(args))
    except (ValueError, RegisterMapError) as exc:
        print(f"p2pgrid meters simulate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


async def _simulate_async(args: argparse.Namespace) -> int:
    import signal
    import time

    from services.domain.intervals import SimulatedClock
    from services.meter_ingest.maps import load_register_map
    from services.meter_ingest.simulator import Gateway, SimulatedMeter, profile_meters, vector_meters

    rmap = load_register_map(args.map)
    if args.count < 1 or args.gateways < 1:
        raise ValueError("--count and --gateways must be at least 1")
    if args.speedup <= 0:
        raise ValueError("--speedup must be positive")
    faults = _parse_faults(args.fault)
    start_s = _parse_start(args.start)
    anchor_wall_s = time.time() if args.anchor_wall_s is None else args.anchor_wall_s
    clock = SimulatedClock(start_s=start_s, speedup=args.speedup, anchor_wall_s=anchor_wall_s)
    gateways: list[Gateway] = []
    try:
        for g in range(args.gateways):
            meters: list[SimulatedMeter]
            if args.vectors:
                meters = list(vector_meters(rmap, first_unit=args.first_unit or 1))
            else:
                meters = list(
                    profile_meters(
                        rmap, args.count, clock, first_unit=args.first_unit, seed=args.seed * 1000 + g
                    )
                )
            port = 0 if args.port == 0 else args.port + g
            gateway = Gateway(meters, host=args.host, port=port, framer=args.framer)
            for unit, kind, reads in faults:
                if unit not in gateway.meters:
                    raise ValueError(f"--fault: no simulated meter with unit id {unit}")
                gateway.meter(unit).inject(kind, reads)
            await gateway.start()
            gateways.append(gateway)
        _print_json(
            {
                "event": "listening",
                "map": rmap.id,
                "host": args.host,
                "ports": [g.port for g in gateways],
                "framer": args.framer,
                "units": sorted(gateways[0].meters),
                "clock": {
                    "start_s": clock.start_s,
                    "speedup": clock.speedup,
                    "anchor_wall_s": clock.anchor_wall_s,
                },
            }
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if args.duration is not None:
            loop.call_later(args.duration, stop.set)
        await stop.wait()
    finally:
        for gateway in gateways:
            await gateway.stop()
    return 0


def _bench(args: argparse.Namespace) -> int:
    from services.meter_ingest.bench import run_poll_bench, run_push_bench

    if args.part in ("all", "push"):
        for line in run_push_bench(
            meters=args.push_meters,
            messages=args.push_messages,
            per_message=args.push_per_message,
            in_flight=args.push_in_flight,
            map_name=args.map,
        ):
            _print_json(line)
    if args.part in ("all", "poll"):
        for line in run_poll_bench(
            map_name=args.map,
            meters=args.meters,
            gateways=args.gateways,
            interval_s=args.interval,
            duration_s=args.duration,
            warmup_s=args.warmup,
            framer=args.framer,
        ):
            _print_json(line)
    return 0
