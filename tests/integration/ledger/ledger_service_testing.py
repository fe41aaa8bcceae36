"""The ledger service as a real process for tests, a small market interval as events, and NATS and gRPC helpers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from nacl.signing import SigningKey

from services.domain.credentials import LEDGER_AUDIENCE, b64url, make_token
from services.domain.ids import participant_id_from_public_key
from services.gen.p2pgrid.common.v1 import common_pb2
from services.gen.p2pgrid.events.v1 import events_pb2
from services.gen.p2pgrid.ledger.v1 import ledger_pb2_grpc
from services.ledger.domain.settlement import (
    AcceptedEnergy,
    ClearingResult,
    MeterQuality,
    MeterReading,
    SettlementInputs,
    SettlementRules,
    Trade,
    participant_energy,
)
from services.platform.nats_bus import NatsBus
from services.platform.subjects import CLEARING_RESULT, INTERVAL_ENERGY, keyed

INTERVAL_S = 900
INTERVAL_START_S = 1_800_000_000 - 1_800_000_000 % INTERVAL_S
METERING_DELAY_S = 900  # the built-in rules'
# Simulated clocks for the service: one before the interval's metering deadline, one after it.
BEFORE_DEADLINE_S = INTERVAL_START_S + INTERVAL_S + 60
AFTER_DEADLINE_S = INTERVAL_START_S + INTERVAL_S + METERING_DELAY_S + 60
RULES = SettlementRules(utility_participant_id="utility")  # the service's built-in rules
PRICES = {"n1": 200_000, "n2": 250_000}


def _key(seed: int) -> SigningKey:
    return SigningKey(bytes([seed]) * 32)


KEYS = {name: _key(i + 1) for i, name in enumerate(("alice", "bob", "carol", "dave", "operator"))}
IDS = {name: participant_id_from_public_key(bytes(key.verify_key)) for name, key in KEYS.items()}
OPERATOR_PUBLIC_KEY = b64url(bytes(KEYS["operator"].verify_key))


def account(name: str) -> str:
    return f"participant:{IDS[name]}"


# (buyer, buyer node, seller, seller node, energy_wh); "utility" is the utility's standing offer.
TRADES = (
    ("alice", "n2", "bob", "n1", 1000),
    ("carol", "n1", "dave", "n1", 500),
    ("carol", "n1", "utility", "n1", 300),
)
# Two batches of interval energy; dave has two meters, one in each; the feeder meter has no participant.
# (meter id, participant, import_wh, export_wh, flag)
ENERGY_BATCHES: tuple[tuple[tuple[str, str, int, int, int], ...], ...] = (
    (
        ("m-alice", "alice", 1200, 0, events_pb2.ENERGY_FLAG_MEASURED),
        ("m-bob", "bob", 0, 900, events_pb2.ENERGY_FLAG_MEASURED),
        ("m-dave-1", "dave", 0, 300, events_pb2.ENERGY_FLAG_MEASURED),
        ("m-feeder", "", 5000, 0, events_pb2.ENERGY_FLAG_MEASURED),
    ),
    (
        ("m-carol", "carol", 750, 0, events_pb2.ENERGY_FLAG_INTERPOLATED),
        ("m-dave-2", "dave", 0, 250, events_pb2.ENERGY_FLAG_MEASURED),
    ),
)
# Measured data for carol's meter, arriving after the interval was settled on the interpolated value.
LATE_BATCH = (("m-carol", "carol", 820, 0, events_pb2.ENERGY_FLAG_MEASURED),)


def pid(name: str) -> str:
    return name if name == "utility" else IDS[name]


def clearing_event(
    start_s: int = INTERVAL_START_S, trades: tuple[Any, ...] = TRADES, event_id: str = ""
) -> bytes:
    """A ClearingResultEvent as the matcher publishes it (event id `clearing-result-<start_s>` unless given)."""
    result = common_pb2.ClearingResult(interval=common_pb2.Interval(start_s=start_s, length_s=INTERVAL_S))
    result.nodes.extend(common_pb2.NodePrice(node_id=n, price_micro_per_kwh=p) for n, p in PRICES.items())
    for i, (buyer, buyer_node, seller, seller_node, energy_wh) in enumerate(trades):
        result.trades.append(
            common_pb2.Trade(
                buyer_order_id=f"b{i}",
                seller_order_id=f"s{i}",
                energy_wh=energy_wh,
                buyer_participant_id=pid(buyer),
                seller_participant_id=pid(seller),
                buyer_node_id=buyer_node,
                seller_node_id=seller_node,
            )
        )
    event = events_pb2.ClearingResultEvent(
        header=events_pb2.EventHeader(event_id=event_id or f"clearing-result-{start_s}", producer="matcher"),
        result=result,
    )
    return event.SerializeToString()


def energy_event(
    batch: int, meters: tuple[tuple[str, str, int, int, int], ...], start_s: int = INTERVAL_START_S
) -> bytes:
    """One IntervalEnergy batch as the metering service publishes it."""
    event = events_pb2.IntervalEnergy(
        header=events_pb2.EventHeader(event_id=f"interval-energy-{start_s}-{batch}", producer="meter_ingest"),
        interval=common_pb2.Interval(start_s=start_s, length_s=INTERVAL_S),
    )
    for meter_id, name, import_wh, export_wh, flag in meters:
        event.meters.append(
            events_pb2.MeterIntervalEnergy(
                meter_id=meter_id,
                participant_id=IDS[name] if name else "",
                node_id="n1",
                import_wh=import_wh,
                export_wh=export_wh,
                flag=events_pb2.EnergyFlag.ValueType(flag),
            )
        )
    return event.SerializeToString()


def expected_inputs(batches: tuple[tuple[tuple[str, str, int, int, int], ...], ...]) -> SettlementInputs:
    """The same interval as domain values, built without the service's event conversion."""
    trades = tuple(Trade(pid(b), bn, pid(s), sn, e) for b, bn, s, sn, e in TRADES)
    bought: dict[str, int] = {}
    sold: dict[str, int] = {}
    for t in trades:
        bought[t.buyer_id] = bought.get(t.buyer_id, 0) + t.energy_wh
        sold[t.seller_id] = sold.get(t.seller_id, 0) + t.energy_wh
    accepted = tuple(AcceptedEnergy(p, bought.get(p, 0), sold.get(p, 0)) for p in sorted(bought | sold))
    clearing = ClearingResult("default", INTERVAL_START_S, PRICES, trades, accepted, INTERVAL_S)
    latest: dict[str, MeterReading] = {}
    for meters in batches:
        for meter_id, name, import_wh, export_wh, flag in meters:
            if not name:
                continue
            quality = (
                MeterQuality.MEASURED if flag == events_pb2.ENERGY_FLAG_MEASURED else MeterQuality.ESTIMATED
            )
            latest[meter_id] = MeterReading(meter_id, IDS[name], import_wh, export_wh, quality)
    return SettlementInputs(clearing, participant_energy(latest.values()))


class LedgerProcess:
    """`python -m services.ledger` (on a SQLite file unless given a database), restartable, with its JSON log lines collected."""

    def __init__(self, nats_url: str, workdir: Path, database_url: str = "") -> None:
        self.nats_url = nats_url
        self.workdir = workdir
        self.database_url = database_url or f"sqlite:///{workdir / 'ledger.db'}"
        self.key_file = workdir / "ledger.key"
        self.ready = workdir / "ledger.ready.json"
        self.lines: list[dict[str, Any]] = []
        self.process: subprocess.Popen[str] | None = None
        self.ports: dict[str, int] = {}

    def start(self, *args: str, wait_ready: bool = True) -> None:
        self.ready.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("P2PGRID_")}
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "services.ledger", "--nats-url", self.nats_url,
                "--database-url", self.database_url, "--signing-key-file", str(self.key_file),
                "--ready-file", str(self.ready), "--operator-public-keys", OPERATOR_PUBLIC_KEY,
                "--settle-period-s", "0.2", "--ack-wait-s", "1", "--clock", "sim", *args,
            ],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()
        if wait_ready:
            deadline = time.monotonic() + 30
            while not self.ready.exists():
                assert self.process.poll() is None, f"the ledger exited:\n{self.log_tail()}"
                assert time.monotonic() < deadline, f"the ledger did not start:\n{self.log_tail()}"
                time.sleep(0.05)
            self.ports = dict(json.loads(self.ready.read_text()))

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            try:
                self.lines.append(json.loads(line))
            except json.JSONDecodeError:
                self.lines.append({"msg": line.rstrip()})

    def log_tail(self, count: int = 30) -> str:
        return "\n".join(json.dumps(line) for line in self.lines[-count:])

    def wait_for_log(self, message: str, after: int = 0, timeout_s: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.lines[after:]:
                if line.get("msg") == message:
                    return line
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.005)
        raise AssertionError(f"no {message!r} in the ledger's log:\n{self.log_tail()}")

    def logged(self, message: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("msg") == message]

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> int:
        """SIGTERM and the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=15)

    def wait_exit(self, timeout_s: float = 30.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout_s)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"127.0.0.1:{self.ports['grpc_port']}")


Metadata = tuple[tuple[str, str | bytes], ...]


def token(name: str) -> Metadata:
    """Call metadata with a fresh token of `name` for the ledger."""
    now = int(time.time())
    return (("authorization", f"Bearer {make_token(KEYS[name], LEDGER_AUDIENCE, now - 10, now + 600)}"),)


def stub(channel: grpc.Channel) -> ledger_pb2_grpc.LedgerStub:
    return ledger_pb2_grpc.LedgerStub(channel)


@dataclass(frozen=True)
class Published:
    subject: str
    payload: bytes
    msg_id: str


def interval_events(start_s: int = INTERVAL_START_S) -> list[Published]:
    """The clearing result and both energy batches of the interval, with their event ids as Nats-Msg-Id."""
    items = [
        Published(keyed(CLEARING_RESULT, start_s), clearing_event(start_s), f"clearing-result-{start_s}")
    ]
    for batch, meters in enumerate(ENERGY_BATCHES):
        items.append(
            Published(
                keyed(INTERVAL_ENERGY, start_s),
                energy_event(batch, meters, start_s),
                f"interval-energy-{start_s}-{batch}",
            )
        )
    return items


def publish(nats_url: str, items: list[Published]) -> None:
    async def run() -> None:
        bus = await NatsBus.connect(nats_url, name="test")
        await bus.ensure_streams()
        for item in items:
            if item.msg_id:
                await bus.publish(item.subject, item.payload, event_id=item.msg_id)
            else:  # no Nats-Msg-Id at all
                await bus.js.publish(item.subject, item.payload)
        await bus.close()

    asyncio.run(run())


def stream_messages(nats_url: str, stream: str, subjects: str) -> list[tuple[str, bytes, str]]:
    """Every message of `stream` on `subjects`: (subject, data, Nats-Msg-Id)."""

    async def run() -> list[tuple[str, bytes, str]]:
        bus = await NatsBus.connect(nats_url, name="test")
        await bus.ensure_streams()
        info = await bus.js.stream_info(stream, subjects_filter=subjects)
        total = sum((info.state.subjects or {}).values())
        out: list[tuple[str, bytes, str]] = []
        if total:
            subscription = await bus.js.pull_subscribe(subjects, stream=stream)
            while len(out) < total:
                for msg in await subscription.fetch(total - len(out), timeout=5):
                    out.append((msg.subject, msg.data, (msg.headers or {}).get("Nats-Msg-Id", "")))
                    await msg.ack()
            await subscription.unsubscribe()
        await bus.close()
        return out

    return asyncio.run(run())


def consumers_pending(nats_url: str, service: str = "ledger") -> int:
    """Events the ledger's two consumers have not acked yet."""

    async def run() -> int:
        bus = await NatsBus.connect(nats_url, name="test")
        pending = await bus.consumer_pending("CLEARING", f"{service}-clearing-results")
        pending += await bus.consumer_pending("METERING", f"{service}-interval-energy")
        await bus.close()
        return pending

    return asyncio.run(run())


def wait_until(condition: Any, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
