"""Polling benchmark: one ingest process polling simulated meters served by another process on this machine.

First a baseline: the same connections driven by a bare pymodbus read loop
(one read of the same shape per meter, as fast as possible, no decoding or
scheduling). Then the poller itself: every meter on its interval, readings
decoded and validated (VEE) in the sink. Results are JSON-ready dicts:
`polls_per_s`, `missed_pct` (poll slots skipped because a gateway fell
behind), and the ratio against the baseline's reads per second.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from services.meter_ingest.adapters.modbus_poller import (
    GatewayTarget,
    ModbusPoller,
    PollerSettings,
    meters_for,
)
from services.meter_ingest.domain.planning import plan_reads
from services.meter_ingest.domain.readings import MeterReading
from services.meter_ingest.domain.vee import MeterValidator, limits_from_map
from services.meter_ingest.maps import load_register_map

TARGET_POLLS_PER_S = 1000
TARGET_MISSED_PCT = 1.0


def _start_simulator(
    map_name: str, per_gateway: int, gateways: int, framer: str
) -> tuple[subprocess.Popen[str], list[int]]:
    command = [
        sys.executable,
        "-m",
        "services.cli",
        "meters",
        "simulate",
        "--map",
        map_name,
        "--count",
        str(per_gateway),
        "--gateways",
        str(gateways),
        "--port",
        "0",
        "--framer",
        framer,
        "--speedup",
        "1",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.kill()
        raise RuntimeError("the meter simulator did not start")
    ports = [int(p) for p in json.loads(line)["ports"]]
    return process, ports


async def _baseline(
    map_name: str, ports: list[int], per_gateway: int, framer: str, duration_s: float
) -> float:
    from pymodbus.client import AsyncModbusTcpClient
    from pymodbus.framer import FramerType

    rmap = load_register_map(map_name)
    (request, *_) = plan_reads(rmap.data_fields(), rmap.transport)
    reads = 0

    async def loop(port: int) -> None:
        nonlocal reads
        client = AsyncModbusTcpClient(
            "127.0.0.1", port=port, framer=FramerType(framer), timeout=2, retries=0, reconnect_delay=0
        )
        await client.connect()
        end = time.monotonic() + duration_s
        read = client.read_input_registers if request.function == 4 else client.read_holding_registers
        try:
            while time.monotonic() < end:
                for unit in range(1, per_gateway + 1):
                    await read(request.address, count=request.count, device_id=unit)
                    reads += 1
        finally:
            client.close()

    started = time.monotonic()
    await asyncio.gather(*(loop(port) for port in ports))
    return reads / (time.monotonic() - started)


async def _poll(
    map_name: str,
    ports: list[int],
    per_gateway: int,
    framer: str,
    interval_s: float,
    warmup_s: float,
    duration_s: float,
) -> dict[str, Any]:
    rmap = load_register_map(map_name)
    validators: dict[str, MeterValidator] = {}
    limits = limits_from_map(rmap)
    readings = 0
    invalid = 0

    async def sink(reading: MeterReading) -> None:
        nonlocal readings, invalid
        validator = validators.get(reading.meter_id)
        if validator is None:
            validator = validators[reading.meter_id] = MeterValidator(reading.meter_id, limits)
        validated = validator.validate(reading)
        readings += 1
        if validated is not None:
            invalid += sum(1 for v in validated.values.values() if not v.ok)

    targets = [
        GatewayTarget(
            "127.0.0.1",
            port,
            meters_for(rmap, range(1, per_gateway + 1), poll_interval_s=interval_s, prefix=f"g{g}"),
            framer=framer,  # type: ignore[arg-type]
            timeout_s=2.0,
            inter_request_gap_s=0.0,
        )
        for g, port in enumerate(ports)
    ]
    poller = ModbusPoller(targets, sink, settings=PollerSettings())
    await poller.start()
    try:
        await asyncio.sleep(warmup_s)
        before = poller.totals()
        started = time.monotonic()
        cpu_before = time.process_time()
        await asyncio.sleep(duration_s)
        elapsed = time.monotonic() - started
        cpu = time.process_time() - cpu_before
        after = poller.totals()
    finally:
        await poller.stop()
    polls = after["polls"] - before["polls"]
    skipped = after["missed_polls"] - before["missed_polls"]
    late = after["late_polls"] - before["late_polls"]
    failed = after["failed_polls"] - before["failed_polls"]
    # A slot is missed when it was skipped, or when fewer polls than slots were done (the lag grew).
    offered = len(ports) * per_gateway * elapsed / interval_s
    missed = max(offered - polls, skipped, 0.0)
    return {
        "polls_per_s": round(polls / elapsed, 1),
        "missed_pct": round(100 * missed / offered, 3),
        "late_pct": round(100 * late / max(polls, 1), 3),
        "failed_polls": failed,
        "invalid_values": invalid,
        "ingest_cpu_pct": round(100 * cpu / elapsed, 1),
    }


def run_poll_bench(
    *,
    map_name: str = "eastron_sdm630_v2",
    meters: int = 1100,
    gateways: int = 50,
    interval_s: float = 1.0,
    duration_s: float = 20.0,
    warmup_s: float = 3.0,
    framer: str = "socket",
) -> list[dict[str, Any]]:
    """Run the baseline and the poller against a simulator child process; return the JSON lines."""
    if meters < gateways or meters % gateways:
        raise ValueError(f"--meters {meters} must be a multiple of --gateways {gateways}")
    per_gateway = meters // gateways
    process, ports = _start_simulator(map_name, per_gateway, gateways, framer)
    try:
        raw = asyncio.run(_baseline(map_name, ports, per_gateway, framer, min(duration_s, 5.0)))
        result = asyncio.run(_poll(map_name, ports, per_gateway, framer, interval_s, warmup_s, duration_s))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
    common = {"bench": "meters", "map": map_name, "meters": meters, "gateways": gateways, "framer": framer}
    offered = meters / interval_s
    return [
        {**common, "part": "poll_baseline", "raw_reads_per_s": round(raw, 1)},
        {
            **common,
            "part": "poll",
            "interval_s": interval_s,
            "offered_polls_per_s": round(offered, 1),
            **result,
            "ratio_vs_raw_reads": round(result["polls_per_s"] / raw, 3) if raw else None,
            "target_polls_per_s": TARGET_POLLS_PER_S,
            "target_missed_pct": TARGET_MISSED_PCT,
            "meets_target": result["polls_per_s"] >= TARGET_POLLS_PER_S
            and result["missed_pct"] < TARGET_MISSED_PCT,
        },
    ]
