"""Push meters: the meters file they need, and gateways that push their readings over meter_ingest's gRPC API.

Meters are numbered; meter i belongs to trader i mod N (its participant and
node) and sits behind gateway i mod G. Each gateway has an Ed25519 key
(derived from the seed) listed under `push.public_keys` of each of its
meters, so the meters file follows from (meters, gateways, prosumers, seed,
grid) alone: `p2pgrid loadtest --write-meters-file` writes the same file a
run with those options expects.

A gateway's message holds one reading of each of its meters, stamped with
the market clock when the message is sent (strictly later than the meter's
previous reading). Counters grow with the meter's power from a fixed origin,
so they never go back, not even across runs against the same stack: every
third meter exports (PV), the others import.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml

from loadtest.scenarios import Deadline
from loadtest.stats import Recorder
from services.domain.credentials import METER_INGEST_AUDIENCE, b64url
from services.domain.intervals import Clock
from services.gen.p2pgrid.meteringest.v1 import meter_ingest_pb2 as pb
from services.gen.p2pgrid.meteringest.v1 import meter_ingest_pb2_grpc as pb_grpc
from services.order_book.client import BotKey
from services.stack.defaults import DEFAULT_METER_MAP

METER_MAP = DEFAULT_METER_MAP
# Counters read their base values at this market time and grow with the meter's power from there.
COUNTER_ORIGIN_S = 1_700_000_000
PUSH_TIMEOUT_S = 60.0
TOKEN_LIFETIME_S = 600
RPC = "PushReadings"


def gateway_key(seed: int, number: int) -> BotKey:
    return BotKey.from_seed(hashlib.sha256(f"p2pgrid-loadtest-{seed}-gateway-{number}".encode()).digest())


@dataclass(frozen=True, slots=True)
class PushMeter:
    meter_id: str
    participant_id: str
    node_id: str
    gateway: int
    import_w: int
    export_w: int
    import_base_wh: int
    export_base_wh: int


def plan_meters(count: int, gateways: int, owners: list[tuple[str, str]]) -> list[PushMeter]:
    """`count` meters over `gateways` gateways; `owners` are (participant_id, node_id), one per trader."""
    meters = []
    for i in range(count):
        participant_id, node_id = owners[i % len(owners)]
        exporter = i % 3 == 0
        meters.append(
            PushMeter(
                meter_id=f"lt-m{i:05d}",
                participant_id=participant_id,
                node_id=node_id,
                gateway=i % gateways,
                import_w=0 if exporter else 300 + (i * 137) % 2_500,
                export_w=500 + (i * 89) % 3_000 if exporter else 0,
                import_base_wh=1_000_000 + 1_000 * i,
                export_base_wh=200_000 + 1_000 * i,
            )
        )
    return meters


def meters_document(meters: list[PushMeter], seed: int) -> dict[str, object]:
    keys = {meter.gateway: b64url(gateway_key(seed, meter.gateway).public_key) for meter in meters}
    return {
        "meters": [
            {
                "meter_id": meter.meter_id,
                "participant_id": meter.participant_id,
                "node_id": meter.node_id,
                "map": METER_MAP,
                "push": {"public_keys": [keys[meter.gateway]]},
            }
            for meter in meters
        ]
    }


def write_meters_file(path: Path, meters: list[PushMeter], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(meters_document(meters, seed), sort_keys=False))


class PushGateway:
    """One gateway: its key, its meters, and push calls of readings stamped on the market clock."""

    def __init__(
        self, number: int, key: BotKey, meters: list[PushMeter], channel: grpc.aio.Channel, clock: Clock,
        recorder: Recorder,
    ) -> None:  # fmt: skip
        self.number = number
        self.key = key
        self.stub = pb_grpc.MeterIngestStub(channel)
        self.clock = clock
        self.recorder = recorder
        self._rows = [
            (m.meter_id, m.import_w, m.export_w, m.import_base_wh, m.export_base_wh, m.import_w - m.export_w)
            for m in meters
        ]
        self.last_ms = 0
        self._token = ""
        self._token_renew_s = 0.0

    @property
    def meters(self) -> int:
        return len(self._rows)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        now_s = time.time()
        if now_s >= self._token_renew_s:
            self._token = self.key.token(METER_INGEST_AUDIENCE, TOKEN_LIFETIME_S, now_s)
            self._token_renew_s = now_s + TOKEN_LIFETIME_S / 2
        return (("authorization", f"Bearer {self._token}"),)

    def message(self) -> pb.ReadingBatch:
        """One reading of each meter, stamped now (and after the previous message)."""
        t_ms = max(int(self.clock.now_s() * 1000), self.last_ms + 1)
        self.last_ms = t_ms
        elapsed_h = (t_ms / 1000 - COUNTER_ORIGIN_S) / 3600
        batch = pb.ReadingBatch()
        add = batch.readings.add
        valid = pb.QUALITY_VALID
        for meter_id, import_w, export_w, import_base_wh, export_base_wh, power_w in self._rows:
            add(
                meter_id=meter_id,
                time_ms=t_ms,
                energy_import_wh=import_base_wh + int(import_w * elapsed_h),
                energy_export_wh=export_base_wh + int(export_w * elapsed_h),
                power_w=power_w,
                quality=valid,
            )
        return batch

    async def push(self, messages: int) -> None:
        """One PushReadings call of `messages` messages; records its latency, summary or error."""
        sent = 0

        async def batches() -> AsyncIterator[pb.ReadingBatch]:
            nonlocal sent
            for _ in range(messages):
                batch = self.message()
                sent += len(batch.readings)
                yield batch

        started_s = time.perf_counter()
        try:
            summary = await self.stub.PushReadings(
                batches(), metadata=self.metadata(), timeout=PUSH_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as error:
            self.recorder.error(RPC, error.code().name, error.details() or "")
            self.recorder.readings_sent += sent
            self.recorder.readings_in_failed_calls += sent
            return
        self.recorder.call(RPC, time.perf_counter() - started_s)
        self.recorder.readings_sent += sent
        self.recorder.readings_summary(int(summary.accepted), int(summary.rejected), list(summary.errors))

    async def run_paced(self, period_wall_s: float, deadline: Deadline) -> None:
        """One message of every meter each `period_wall_s` until the deadline."""
        next_s = time.monotonic()
        while next_s < deadline.end_s:
            await self.push(1)
            next_s += period_wall_s
            now_s = time.monotonic()
            if next_s > now_s:
                await asyncio.sleep(max(0.0, min(next_s, deadline.end_s) - now_s))
            else:
                next_s = now_s  # behind: push again at once, without catching up on the missed ones

    async def run_flood(self, messages_per_call: int, deadline: Deadline) -> None:
        """Calls of `messages_per_call` messages back to back until the deadline."""
        while not deadline.passed():
            errors_before = self.recorder.error_count()
            await self.push(messages_per_call)
            if self.recorder.error_count() > errors_before:
                await asyncio.sleep(0.2)  # a failed call is not retried in a tight loop
