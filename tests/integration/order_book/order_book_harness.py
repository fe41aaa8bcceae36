"""Helpers for the order book's integration tests: a real order book process, signed requests, and a toy clearing.

The toy clearing stands in for the matcher: one uniform price for every node,
buys by falling and sells by rising limit (then book sequence), matched while
the buy limit reaches the sell limit; the price is the midpoint of the last
matched pair rounded down to the tick. It is deterministic, which is all the
order book's tests need from it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.domain.credentials import ORDER_BOOK_AUDIENCE, make_token
from services.domain.intervals import SimulatedClock
from services.gen.p2pgrid.common.v1 import common_pb2
from services.gen.p2pgrid.events.v1 import events_pb2
from services.gen.p2pgrid.orderbook.v1 import order_book_pb2 as pb
from services.gen.p2pgrid.orderbook.v1 import order_book_pb2_grpc as pb_grpc
from services.order_book.client import BotKey, signed_order
from services.order_book.domain.orders import Side
from services.platform.nats_bus import NatsBus
from services.platform.nats_server import free_port
from services.platform.subjects import CLEARING_REQUEST, CLEARING_RESULT, ORDER_EVENTS, keyed

NODES = ("n0", "n1", "n2")
T = TypeVar("T")
TICK = 100


@dataclass
class OrderBookProcess:
    """`python -m services.order_book` on a fixed port, restartable, with a simulated clock shared with the test."""

    nats_url: str
    database_url: str
    workdir: Path
    interval_s: int = 60
    gate_closure_s: int = 20
    speedup: float = 1.0
    sim_start_s: float = 1_800_000_000.0
    anchor_wall_s: float = field(default_factory=time.time)
    extra: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    metrics_port: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def clock(self) -> SimulatedClock:
        return SimulatedClock(self.sim_start_s, self.speedup, self.anchor_wall_s)

    def start(self, timeout_s: float = 30.0) -> OrderBookProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ready = self.workdir / "order_book.ready.json"
        ready.unlink(missing_ok=True)
        args = {
            "nats-url": self.nats_url,
            "database-url": self.database_url,
            "grpc-port": str(self.port),
            "ready-file": str(ready),
            "log-format": "text",
            "log-level": "warning",
            "clock": "sim",
            "sim-start-s": repr(self.sim_start_s),
            "sim-speedup": repr(self.speedup),
            "sim-anchor-wall-s": repr(self.anchor_wall_s),
            "interval-s": str(self.interval_s),
            "gate-closure-s": str(self.gate_closure_s),
            "nodes": ",".join(NODES),
            "shutdown-grace-s": "3",
            **self.extra,
        }
        argv = [sys.executable, "-m", "services.order_book"]
        for name, value in args.items():
            argv.append(f"--{name}={value}")  # "=": a base64url key may start with "-"
        self.starts += 1
        log = open(self.workdir / "order_book.log", "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready.exists():
                self.metrics_port = int(json.loads(ready.read_text())["metrics_port"])
                return self
            if self.process.poll() is not None:
                raise AssertionError(f"order book exited with {self.process.returncode}:\n{self.log_text()}")
            time.sleep(0.02)
        raise AssertionError(f"order book not ready after {timeout_s} s:\n{self.log_text()}")

    def metrics(self) -> str:
        """The /metrics text of the running process."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def log_text(self) -> str:
        path = self.workdir / "order_book.log"
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError("order book did not stop within 15 s of SIGTERM") from None
        return int(self.process.returncode or 0)

    # The market calendar, as the process sees it.

    def now_s(self) -> float:
        return self.clock.now_s()

    def first_open_s(self) -> int:
        return (int((self.now_s() + self.gate_closure_s) // self.interval_s) + 1) * self.interval_s

    def wall_until_s(self, sim_s: float) -> float:
        return max(0.0, (sim_s - self.now_s()) / self.speedup)


def token(
    key: BotKey, *, lifetime_s: int = 600, issued_at_s: int | None = None, audience: str = ORDER_BOOK_AUDIENCE
) -> str:
    issued = int(time.time()) if issued_at_s is None else issued_at_s
    return make_token(key.signing_key, audience, issued, issued + lifetime_s)


def auth(key: BotKey, **kwargs: int) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token(key, **kwargs)}"),)  # type: ignore[arg-type]


def stub(target: str) -> tuple[grpc.Channel, pb_grpc.OrderBookStub]:
    channel = grpc.insecure_channel(target)
    return channel, pb_grpc.OrderBookStub(channel)


def register(book: pb_grpc.OrderBookStub, key: BotKey, node_id: str = "n1") -> pb.Participant:
    return book.RegisterParticipant(
        pb.RegisterParticipantRequest(public_key=key.public_key, node_id=node_id),
        metadata=auth(key),
        timeout=10,
    )


def order(
    key: BotKey,
    interval_start_s: int,
    *,
    side: Side = Side.BUY,
    node_id: str = "n1",
    energy_wh: int = 1000,
    price_micro_per_kwh: int = 100_000,
    client_order_id: str,
) -> pb.PlaceOrderRequest:
    return signed_order(key, side, node_id, interval_start_s, energy_wh, price_micro_per_kwh, client_order_id)


def code_of(call: object) -> grpc.StatusCode:
    """The status code a call raised (the call is a zero-argument callable)."""
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


# The toy clearing.


def toy_clear(
    request: events_pb2.ClearingRequest, *, nodes: Sequence[str] = NODES
) -> events_pb2.ClearingResultEvent:
    buys = sorted(
        (o for o in request.orders if o.side == common_pb2.SIDE_BUY),
        key=lambda o: (-o.price_micro_per_kwh, o.book_seq),
    )
    sells = sorted(
        (o for o in request.orders if o.side == common_pb2.SIDE_SELL),
        key=lambda o: (o.price_micro_per_kwh, o.book_seq),
    )
    accepted = {o.order_id: 0 for o in request.orders}
    bi = si = 0
    buy_left = buys[0].energy_wh if buys else 0
    sell_left = sells[0].energy_wh if sells else 0
    price = 0
    while (
        bi < len(buys) and si < len(sells) and buys[bi].price_micro_per_kwh >= sells[si].price_micro_per_kwh
    ):
        quantity = min(buy_left, sell_left)
        accepted[buys[bi].order_id] += quantity
        accepted[sells[si].order_id] += quantity
        price = (buys[bi].price_micro_per_kwh + sells[si].price_micro_per_kwh) // 2 // TICK * TICK
        buy_left -= quantity
        sell_left -= quantity
        if buy_left == 0:
            bi += 1
            buy_left = buys[bi].energy_wh if bi < len(buys) else 0
        if sell_left == 0:
            si += 1
            sell_left = sells[si].energy_wh if si < len(sells) else 0
    start_s = request.interval.start_s
    event_id = f"clearing-result-{start_s}"
    return events_pb2.ClearingResultEvent(
        header=events_pb2.EventHeader(event_id=event_id, producer="toy-clearing"),
        result=common_pb2.ClearingResult(
            interval=request.interval,
            book_seq_max=request.book_seq_max,
            nodes=[common_pb2.NodePrice(node_id=n, price_micro_per_kwh=price) for n in nodes],
            orders=[common_pb2.OrderAllocation(order_id=i, accepted_wh=wh) for i, wh in accepted.items()],
        ),
    )


async def _read_requests(nats_url: str, wait_s: float) -> list[tuple[str, events_pb2.ClearingRequest]]:
    client = await nats.connect(nats_url)
    try:
        js = client.jetstream()
        subscription = await js.pull_subscribe(
            f"{CLEARING_REQUEST}.>",
            stream="CLEARING",
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE),
        )
        found: list[tuple[str, events_pb2.ClearingRequest]] = []
        deadline = time.monotonic() + wait_s
        while True:
            try:
                msgs = await subscription.fetch(500, timeout=0.2)
            except (nats.errors.TimeoutError, TimeoutError):
                if time.monotonic() >= deadline:
                    return found
                continue
            for msg in msgs:
                msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
                found.append((msg_id, events_pb2.ClearingRequest.FromString(msg.data)))
    finally:
        await client.close()


def clearing_requests(nats_url: str, wait_s: float = 1.0) -> list[tuple[str, events_pb2.ClearingRequest]]:
    """Every clearing request in the CLEARING stream (with its Nats-Msg-Id), in stream order."""
    return asyncio.run(_read_requests(nats_url, wait_s))


async def _read_order_events(nats_url: str, count: int, timeout_s: float) -> list[events_pb2.OrderEvent]:
    client = await nats.connect(nats_url)
    try:
        subscription = await client.jetstream().pull_subscribe(
            f"{ORDER_EVENTS}.>",
            stream="ORDERS",
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE),
        )
        found: list[events_pb2.OrderEvent] = []
        deadline = time.monotonic() + timeout_s
        while len(found) < count and time.monotonic() < deadline:
            try:
                msgs = await subscription.fetch(count - len(found), timeout=0.5)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            found += [events_pb2.OrderEvent.FromString(msg.data) for msg in msgs]
        return found
    finally:
        await client.close()


def order_events(nats_url: str, count: int, timeout_s: float = 10.0) -> list[events_pb2.OrderEvent]:
    """The first `count` order events in the ORDERS stream."""
    return asyncio.run(_read_order_events(nats_url, count, timeout_s))


def wait_for_request(
    nats_url: str, interval_start_s: int, timeout_s: float = 30.0
) -> events_pb2.ClearingRequest:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for _msg_id, request in clearing_requests(nats_url, wait_s=0.2):
            if request.interval.start_s == interval_start_s:
                return request
        time.sleep(0.2)
    raise AssertionError(f"no clearing request for interval {interval_start_s} within {timeout_s} s")


async def _publish(nats_url: str, events: Sequence[events_pb2.ClearingResultEvent]) -> None:
    bus = await NatsBus.connect(nats_url, name="toy-clearing")
    try:
        await bus.ensure_streams()
        for event in events:
            await bus.publish(
                keyed(CLEARING_RESULT, event.result.interval.start_s),
                event.SerializeToString(),
                event_id=event.header.event_id,
            )
    finally:
        await bus.close()


def publish_results(nats_url: str, events: Sequence[events_pb2.ClearingResultEvent]) -> None:
    asyncio.run(_publish(nats_url, events))


async def _publish_raw(nats_url: str, subject: str, payload: bytes, event_id: str) -> None:
    bus = await NatsBus.connect(nats_url, name="toy-clearing")
    try:
        await bus.publish(subject, payload, event_id=event_id)
    finally:
        await bus.close()


def publish_raw(nats_url: str, subject: str, payload: bytes, event_id: str) -> None:
    asyncio.run(_publish_raw(nats_url, subject, payload, event_id))


def read_stream(call: grpc.CallIterator[T], count: int, timeout_s: float) -> list[T]:
    """Up to `count` items of a server stream within `timeout_s`; the call is cancelled afterwards."""
    items: list[T] = []
    deadline = time.monotonic() + timeout_s
    try:
        for item in call:
            items.append(item)
            if len(items) >= count or time.monotonic() >= deadline:
                break
    except grpc.RpcError as error:
        if error.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            raise
    finally:
        call.cancel()  # type: ignore[no-untyped-call]
    return items


def details(error: grpc.RpcError) -> str:
    """The status message of a failed call ("" if it has none)."""
    return error.details() or ""


def trailing(error: grpc.RpcError) -> dict[str, str]:
    pairs: tuple[tuple[str, str], ...] = error.trailing_metadata()  # type: ignore[assignment]
    return dict(pairs)


async def toy_clearing_loop(nats_url: str, stop: asyncio.Event) -> int:
    """Answer every clearing request with a toy clearing result until `stop`; returns how many it cleared."""
    client = await nats.connect(nats_url)
    cleared = 0
    try:
        js = client.jetstream()
        subscription = await js.pull_subscribe(
            f"{CLEARING_REQUEST}.>",
            stream="CLEARING",
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE),
        )
        while not stop.is_set():
            try:
                msgs = await subscription.fetch(50, timeout=0.2)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            for msg in msgs:
                result = toy_clear(events_pb2.ClearingRequest.FromString(msg.data))
                await js.publish(
                    keyed(CLEARING_RESULT, result.result.interval.start_s),
                    result.SerializeToString(),
                    headers={"Nats-Msg-Id": result.header.event_id},
                )
                cleared += 1
    finally:
        await client.close()
    return cleared
