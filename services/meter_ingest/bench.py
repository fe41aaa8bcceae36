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
from services.meter_ingest.simulator import spawn_gateways

TARGET_POLLS_PER_S = 1000
TARGET_MISSED_PCT = 1.0


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
    process, ports = spawn_gateways(map_name, per_gateway, gateways, framer=framer)
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


# --------------------------------------------------------------------------- the push half

TARGET_PUSH_READINGS_PER_S = 100_000
PUSH_METHOD = "/p2pgrid.meteringest.v1.MeterIngest/PushReadings"
# The rate the reading times are planned for; any rate within a few times of it stays inside the clock skew limit.
PLANNED_READINGS_PER_S = 100_000


def _push_messages(meters: int, messages: int, base_ms: int, step_ms: int) -> list[bytes]:
    """`messages` serialised ReadingBatch messages, each one reading of every meter (a gateway's push)."""
    from services.gen.p2pgrid.meteringest.v1 import meter_ingest_pb2 as pb

    ids = [f"bench-{i:06d}" for i in range(meters)]
    out = []
    for k in range(messages):
        batch = pb.ReadingBatch()
        add = batch.readings.add
        t_ms = base_ms + k * step_ms
        for i, meter_id in enumerate(ids):
            # Counters grow 1 Wh (import) and 0.5 Wh (export) per message; power stays plausible.
            add(
                meter_id=meter_id,
                time_ms=t_ms,
                energy_import_wh=1_000_000 + 1_000 * i + k,
                energy_export_wh=500_000 + 1_000 * i + k // 2,
                power_w=1_500,
                quality=pb.QUALITY_VALID,
            )
        out.append(batch.SerializeToString())
    return out


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux), or None where /proc is not there."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _metric(body: str, name: str, **labels: str) -> float:
    wanted = {f'{key}="{value}"' for key, value in labels.items()}
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name + "{"):
            head, _, value = line.rpartition(" ")
            if wanted <= set(head[len(name) + 1 : -1].split(",")):
                total += float(value)
    return total


async def _raw_publish(
    nats_url: str, batches: list[bytes], per_message: int, in_flight: int
) -> tuple[float, int]:
    """The baseline: the same readings as ReadingsBatch messages, serialised beforehand, published by publish_many."""
    from services.gen.p2pgrid.meteringest.v1 import meter_ingest_pb2 as pb
    from services.meter_ingest.adapters.convert import readings_messages
    from services.platform.nats_bus import NatsBus

    prepared = []
    readings = 0
    for data in batches:
        batch = pb.ReadingBatch.FromString(data)
        for reading in batch.readings:
            reading.time_ms += 1  # other content than the pushed readings, so no message is a duplicate
        readings += len(batch.readings)
        prepared.append(
            readings_messages(
                "baseline", batch.readings, producer="bench", emitted_at_ms=0, per_message=per_message
            )
        )
    bus = await NatsBus.connect(nats_url, name="bench-baseline")
    try:
        pending: list[asyncio.Task[int]] = []
        started = time.perf_counter()
        for items in prepared:
            pending.append(asyncio.create_task(bus.publish_many(items)))
            if len(pending) > in_flight:
                await pending.pop(0)
        await asyncio.gather(*pending)
        elapsed = time.perf_counter() - started
    finally:
        await bus.close()
    return readings / elapsed, readings


def run_push_bench(
    *,
    meters: int = 1000,
    messages: int = 1000,
    per_message: int = 500,
    in_flight: int = 8,
    map_name: str = "eastron_sdm630_v2",
) -> list[dict[str, Any]]:
    """Push readings through a real meter_ingest process into a real nats-server; return the JSON lines.

    One gRPC stream, as a gateway with `meters` meters would send it: every
    message holds one reading of each meter. The messages are serialised
    before the clock starts, so the client costs little of the shared CPU;
    the time runs until the summary arrives, which is after the stream
    acknowledged every ReadingsBatch. The baseline publishes the same readings,
    batched the same way and serialised beforehand, straight to JetStream.
    """
    import tempfile
    import urllib.request
    from pathlib import Path

    import grpc
    import nacl.signing
    import yaml

    from services.domain.credentials import METER_INGEST_AUDIENCE, b64url, make_token
    from services.gen.p2pgrid.meteringest.v1 import meter_ingest_pb2 as pb
    from services.platform.nats_server import NatsServer

    key = nacl.signing.SigningKey.generate()
    total = meters * messages
    with (
        tempfile.TemporaryDirectory(prefix="p2pgrid-bench-meters-") as tmp,
        NatsServer(Path(tmp) / "nats") as nats,
    ):
        workdir = Path(tmp)
        meters_path = workdir / "meters.yaml"
        meters_path.write_text(
            yaml.safe_dump(
                {
                    "meters": [
                        {
                            "meter_id": f"bench-{i:06d}",
                            "participant_id": f"p-bench-{i}",
                            "node_id": "n0",
                            "map": map_name,
                            "push": {"public_keys": [b64url(bytes(key.verify_key))]},
                        }
                        for i in range(meters)
                    ]
                }
            )
        )
        ready = workdir / "ready.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith("P2PGRID_")}
        process = subprocess.Popen(
            [
                sys.executable, "-m", "services.meter_ingest", "--nats-url", nats.url,
                "--database-url", f"sqlite:///{workdir / 'meter_ingest.db'}", "--meters-path", str(meters_path),
                "--ready-file", str(ready), "--readings-per-message", str(per_message),
                "--push-in-flight", str(in_flight), "--log-level", "warning",
            ],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not ready.exists():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"meter_ingest did not start: {process.stderr.read() if process.stderr else ''}"
                    )
                time.sleep(0.05)
            ports = json.loads(ready.read_text())
            # Reading times are planned from a few seconds ahead, at the planned rate; serialising takes that long.
            step_ms = max(1, round(1000 * meters / PLANNED_READINGS_PER_S))
            base_ms = int(time.time() * 1000) + 2_000 + total // 500
            batches = _push_messages(meters, messages, base_ms, step_ms)
            while time.time() * 1000 < base_ms - 1_000:
                time.sleep(0.01)
            now = int(time.time())
            token = make_token(key, METER_INGEST_AUDIENCE, now - 5, now + 3_000)
            cpu_before = _cpu_s(process.pid)
            with grpc.insecure_channel(
                f"127.0.0.1:{ports['grpc_port']}", options=[("grpc.max_send_message_length", 64 << 20)]
            ) as channel:
                push = channel.stream_unary(PUSH_METHOD, None, pb.PushSummary.FromString)
                started = time.perf_counter()
                summary = push(iter(batches), metadata=(("authorization", f"Bearer {token}"),), timeout=600)
                elapsed = time.perf_counter() - started
            cpu_after = _cpu_s(process.pid)
            body = (
                urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics_port']}/metrics", timeout=10)
                .read()
                .decode()
            )
            raw_per_s, raw_readings = asyncio.run(_raw_publish(nats.url, batches, per_message, in_flight))
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    pushed_per_s = summary.accepted / elapsed
    service_cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    common = {"bench": "meters", "map": map_name, "meters": meters, "readings_per_grpc_message": meters}
    return [
        {
            **common,
            "part": "push_baseline",
            "what": "the same ReadingsBatch messages, serialised beforehand, straight to JetStream with publish_many",
            "raw_jetstream_readings_per_s": round(raw_per_s, 1),
            "readings": raw_readings,
            "readings_per_nats_message": per_message,
        },
        {
            **common,
            "part": "push",
            "readings_per_s": round(pushed_per_s, 1),
            "readings": total,
            "accepted": summary.accepted,
            "rejected": summary.rejected,
            "published_invalid": int(
                _metric(body, "p2pgrid_meter_readings_total", source="push", quality="invalid")
            ),
            "readings_per_nats_message": per_message,
            "seconds": round(elapsed, 3),
            "service_cpu_pct": None if service_cpu is None else round(100 * service_cpu / elapsed, 1),
            "ratio_vs_raw_jetstream": round(pushed_per_s / raw_per_s, 3) if raw_per_s else None,
            "target_readings_per_s": TARGET_PUSH_READINGS_PER_S,
            "meets_target": summary.accepted == total and pushed_per_s >= TARGET_PUSH_READINGS_PER_S,
        },
    ]
