"""Helpers for the meter_ingest service tests: the service as a real process, simulated meters, the stream's content."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import nacl.signing
import yaml

from services.domain.credentials import METER_INGEST_AUDIENCE, b64url, make_token
from services.domain.intervals import SimulatedClock
from services.gen.p2pgrid.events.v1 import events_pb2
from services.gen.p2pgrid.meteringest.v1 import meter_ingest_pb2 as pb
from services.meter_ingest.maps import load_register_map
from services.meter_ingest.simulator import Gateway, ProfileMeter, profile_meters
from services.platform.nats_bus import NatsBus
from services.platform.subjects import INTERVAL_ENERGY, METER_READINGS

T = TypeVar("T")


class MeterIngestProcess:
    """`python -m services.meter_ingest` with a ready file; its output is collected for failure messages."""

    def __init__(self, workdir: Path, nats_url: str, args: Sequence[str]) -> None:
        self.workdir = workdir
        self.nats_url = nats_url
        self.args = list(args)
        self.lines: list[str] = []
        self.process: subprocess.Popen[str] | None = None
        self.ports: dict[str, int] = {}

    def start(self, timeout_s: float = 30.0) -> dict[str, int]:
        ready = self.workdir / "meter_ingest.ready.json"
        ready.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("P2PGRID_")}
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "services.meter_ingest", "--nats-url", self.nats_url,
                "--database-url", f"sqlite:///{self.workdir / 'meter_ingest.db'}",
                "--ready-file", str(ready), "--log-format", "text", *self.args,
            ],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if self.process.poll() is not None:
                time.sleep(0.2)
                raise AssertionError(f"meter_ingest exited with {self.process.returncode}:\n{self.output()}")
            assert time.monotonic() < deadline, f"meter_ingest did not start:\n{self.output()}"
            time.sleep(0.05)
        self.ports = dict(json.loads(ready.read_text()))
        return self.ports

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines[-60:])

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=20)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def ensure_dead(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.ports['metrics_port']}/metrics"
        body: bytes = urllib.request.urlopen(url, timeout=5).read()
        return body.decode()

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample (0 when absent)."""
        wanted = {f'{key}="{value}"' for key, value in labels.items()}
        for line in self.metrics().splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, _, value = line.rpartition(" ")
            inside = head[len(name) :].strip("{}")
            if wanted <= set(inside.split(",")):
                return float(value)
        return 0.0


class SimulatedGateway:
    """Simulated household meters behind one Modbus TCP gateway, served from a background thread."""

    def __init__(self, map_name: str, count: int, clock: SimulatedClock, seed: int = 0) -> None:
        self.rmap = load_register_map(map_name)
        self.meters: list[ProfileMeter] = profile_meters(self.rmap, count, clock, first_unit=1, seed=seed)
        self.gateway = Gateway(self.meters)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the gateway's loop (faults must not race the server's reads)."""

        async def call() -> T:
            return fn()

        return self.call(call())

    def start(self) -> int:
        self.thread.start()
        self.port = self.call(self.gateway.start())
        return self.port

    def stop(self) -> None:
        self.call(self.gateway.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


@dataclass
class PushKey:
    signing_key: nacl.signing.SigningKey

    @classmethod
    def new(cls) -> PushKey:
        return cls(nacl.signing.SigningKey.generate())

    @property
    def public(self) -> str:
        return b64url(bytes(self.signing_key.verify_key))

    def metadata(self) -> tuple[tuple[str, str], ...]:
        now = int(time.time())
        token = make_token(self.signing_key, METER_INGEST_AUDIENCE, now - 5, now + 600)
        return (("authorization", f"Bearer {token}"),)


def write_meters_file(path: Path, meters: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"meters": meters}, sort_keys=False))
    return path


def sim_args(clock: SimulatedClock) -> list[str]:
    return [
        "--clock", "sim", "--sim-start-s", repr(clock.start_s), "--sim-speedup", repr(clock.speedup),
        "--sim-anchor-wall-s", repr(clock.anchor_wall_s),
    ]  # fmt: skip


@dataclass(frozen=True)
class StreamMessage:
    subject: str
    event_id: str
    data: bytes


async def _read_subjects(nats_url: str, subject: str) -> list[StreamMessage]:
    bus = await NatsBus.connect(nats_url, name="test-reader")
    try:
        info = await bus.js.stream_info("METERING", subjects_filter=subject)
        count = sum((info.state.subjects or {}).values())
        messages: list[StreamMessage] = []
        if not count:
            return messages
        subscription = await bus.js.pull_subscribe(subject, stream="METERING")
        try:
            while len(messages) < count:
                for msg in await subscription.fetch(min(count - len(messages), 256), timeout=5):
                    headers = msg.headers or {}
                    messages.append(
                        StreamMessage(msg.subject, headers.get("Nats-Msg-Id", ""), bytes(msg.data))
                    )
                    await msg.ack()
        finally:
            await subscription.unsubscribe()
        return messages
    finally:
        await bus.close()


def stream_messages(nats_url: str, subject: str) -> list[StreamMessage]:
    return asyncio.run(_read_subjects(nats_url, subject))


def published_readings(nats_url: str) -> list[pb.Reading]:
    readings: list[pb.Reading] = []
    for message in stream_messages(nats_url, f"{METER_READINGS}.>"):
        batch = events_pb2.ReadingsBatch.FromString(message.data)
        assert batch.header.event_id == message.event_id
        readings.extend(batch.readings)
    return readings


def published_energy(nats_url: str) -> list[tuple[str, events_pb2.IntervalEnergy]]:
    out = []
    for message in stream_messages(nats_url, f"{INTERVAL_ENERGY}.>"):
        event = events_pb2.IntervalEnergy.FromString(message.data)
        assert event.header.event_id == message.event_id
        assert message.subject == f"{INTERVAL_ENERGY}.{event.interval.start_s}"
        out.append((message.event_id, event))
    return out


def energy_by_meter(nats_url: str) -> dict[tuple[str, int], list[events_pb2.MeterIntervalEnergy]]:
    """(meter id, interval start) → every MeterIntervalEnergy published for it (exactly one is right)."""
    found: dict[tuple[str, int], list[events_pb2.MeterIntervalEnergy]] = {}
    for _event_id, event in published_energy(nats_url):
        for meter in event.meters:
            found.setdefault((meter.meter_id, event.interval.start_s), []).append(meter)
    return found


def interpolate_wh(points: Sequence[tuple[int, int]], t_ms: int) -> int:
    """The straight-line counter value at `t_ms` between the readings around it, rounded half to even."""
    for (t0, v0), (t1, v1) in itertools.pairwise(points):
        if t0 <= t_ms <= t1:
            if t_ms == t0:
                return v0
            return round(v0 + (v1 - v0) * Fraction(t_ms - t0, t1 - t0))
    raise AssertionError(f"no readings around {t_ms} ms")


def span_around_ms(points: Sequence[tuple[int, int]], t_ms: int) -> int:
    for (t0, _), (t1, _) in itertools.pairwise(points):
        if t0 <= t_ms <= t1:
            return 0 if t_ms in (t0, t1) else t1 - t0
    raise AssertionError(f"no readings around {t_ms} ms")


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, output: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}:\n{output()}")
