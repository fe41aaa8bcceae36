"""The matcher service clears each published request once, against grid_check's limits, even when killed mid-clearing."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from services.gen.p2pgrid.common.v1 import common_pb2
from services.gen.p2pgrid.events.v1 import events_pb2
from services.gen.p2pgrid.gridcheck.v1 import grid_check_pb2
from services.gen.p2pgrid.matcher.v1 import matcher_pb2, matcher_pb2_grpc
from services.platform.nats_bus import NatsBus
from services.platform.nats_server import NatsServer
from services.platform.subjects import CLEARING_REQUEST, CLEARING_RESULT, GRID_LIMITS_REQUEST, keyed

GRID = {
    "interval_minutes": 15,
    "price_tick_micro_per_kwh": 100,
    "slack": "n0",
    "nodes": [{"id": "n0"}, {"id": "n1"}],
    "lines": [{"id": "l1", "from": "n0", "to": "n1", "capacity_w": 50_000}],
}
INTERVAL_START_S = 1_800_000_000 - 1_800_000_000 % 900


def order(i: int, side: int, node: str, energy_wh: int, price: int) -> common_pb2.ClearingOrder:
    return common_pb2.ClearingOrder(
        order_id=f"o{i:07d}",
        participant_id=f"p{i % 97}",
        node_id=node,
        side=side,
        energy_wh=energy_wh,
        price_micro_per_kwh=price,
        book_seq=i + 1,
    )


def congested_book(count: int, seed: int = 7) -> list[common_pb2.ClearingOrder]:
    """Cheap sellers at n0 and dear buyers at n1: the line n0→n1 is what limits the trade."""
    rng = random.Random(seed)
    orders = []
    for i in range(count):
        if i % 2:
            orders.append(
                order(i, common_pb2.SIDE_SELL, "n0", rng.randint(100, 5_000), 100 * rng.randint(500, 1_500))
            )
        else:
            orders.append(
                order(i, common_pb2.SIDE_BUY, "n1", rng.randint(100, 5_000), 100 * rng.randint(1_400, 2_500))
            )
    return orders


class Matcher:
    def __init__(self, nats_url: str, workdir: Path) -> None:
        self.nats_url = nats_url
        self.workdir = workdir
        self.grid_path = workdir / "grid.yaml"
        self.grid_path.write_text(yaml.safe_dump(GRID))
        self.lines: list[str] = []
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> dict[str, int]:
        ready = self.workdir / "matcher.ready"
        ready.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("P2PGRID_")}
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "services.matcher", "--nats-url", self.nats_url, "--grid-path", str(self.grid_path),
                "--ready-file", str(ready), "--limits-timeout-s", "1", "--limits-attempts", "2", "--request-ack-wait-s", "3",
            ],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert self.process.poll() is None, "\n".join(self.lines)
            assert time.monotonic() < deadline, "matcher did not start"
            time.sleep(0.05)
        return dict(json.loads(ready.read_text()))

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line)

    def wait_for_log(self, message: str, after: int, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(f'"msg": "{message}"' in line for line in self.lines[after:]):
                return
            time.sleep(0.005)
        raise AssertionError(f"no {message!r} in the matcher's log:\n{''.join(self.lines[-20:])}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            assert self.process.wait(timeout=10) == 0


@pytest.fixture
def matcher(nats_server: NatsServer, tmp_path: Path) -> Iterator[Matcher]:
    service = Matcher(nats_server.url, tmp_path)
    try:
        yield service
    finally:
        if service.process is not None and service.process.poll() is None:
            service.process.kill()
            service.process.wait()


async def limit_responder(bus: NatsBus, capacity_w: int, asked: list[int]) -> None:
    """A grid_check peer on the real NATS subject: every line is limited to `capacity_w`."""

    async def answer(data: bytes) -> bytes:
        request = events_pb2.LimitRequest.FromString(data)
        asked.append(request.interval_start_s)
        limits = grid_check_pb2.Limits(interval_start_s=request.interval_start_s)
        limits.lines.append(
            grid_check_pb2.LineLimit(line_id="l1", capacity_w=capacity_w, reason="maintenance")
        )
        return limits.SerializeToString()

    await bus.serve(GRID_LIMITS_REQUEST, answer)


def request_bytes(orders: list[common_pb2.ClearingOrder], start_s: int) -> bytes:
    request = events_pb2.ClearingRequest(
        header=events_pb2.EventHeader(event_id=f"clearing-request-{start_s}"),
        interval=common_pb2.Interval(start_s=start_s, length_s=900),
        book_seq_max=len(orders),
    )
    request.orders.extend(orders)
    return request.SerializeToString()


async def results_for(bus: NatsBus, start_s: int) -> list[events_pb2.ClearingResultEvent]:
    subject = keyed(CLEARING_RESULT, start_s)
    info = await bus.js.stream_info("CLEARING", subjects_filter=subject)
    count = (info.state.subjects or {}).get(subject, 0)
    if not count:
        return []
    subscription = await bus.js.pull_subscribe(subject, stream="CLEARING")
    messages = await subscription.fetch(count, timeout=5)
    await subscription.unsubscribe()
    return [events_pb2.ClearingResultEvent.FromString(m.data) for m in messages]


async def wait_results(
    bus: NatsBus, start_s: int, timeout_s: float = 60
) -> list[events_pb2.ClearingResultEvent]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = await results_for(bus, start_s)
        if found:
            await asyncio.sleep(1.0)  # a second copy, if there were one, would arrive now
            return await results_for(bus, start_s)
        await asyncio.sleep(0.1)
    return []


def test_a_published_request_yields_one_result_that_respects_grid_checks_limit(matcher: Matcher) -> None:
    matcher.start()

    async def scenario() -> tuple[list[events_pb2.ClearingResultEvent], list[int]]:
        bus = await NatsBus.connect(matcher.nats_url, name="test")
        await bus.ensure_streams()
        asked: list[int] = []
        await limit_responder(bus, 4_000, asked)
        payload = request_bytes(congested_book(200), INTERVAL_START_S)
        subject = keyed(CLEARING_REQUEST, INTERVAL_START_S)
        await bus.publish(subject, payload, event_id=f"clearing-request-{INTERVAL_START_S}")
        results = await wait_results(bus, INTERVAL_START_S)
        await bus.close()
        return results, asked

    results, asked = asyncio.run(scenario())
    matcher.stop()
    assert asked == [INTERVAL_START_S]
    assert len(results) == 1
    result = results[0].result
    assert results[0].header.event_id == f"clearing-result-{INTERVAL_START_S}"
    (line,) = result.lines
    assert line.binding and line.flow_w == 4_000  # grid_check's 4 kW, not the file's 50 kW
    traded_wh = sum(t.energy_wh for t in result.trades)
    assert traded_wh == 1_000  # 4 kW for a quarter hour
    prices = {n.node_id: n.price_micro_per_kwh for n in result.nodes}
    assert prices["n1"] > prices["n0"]
    assert result.congestion_rent_nano == traded_wh * (prices["n1"] - prices["n0"])
    assert all(
        t.buyer_node_id == "n1" and t.seller_node_id == "n0" and t.buyer_participant_id for t in result.trades
    )


def test_a_matcher_killed_mid_clearing_and_restarted_publishes_exactly_one_result(matcher: Matcher) -> None:
    matcher.start()
    orders = congested_book(60_000, seed=11)

    async def publish_and_collect(kill_rounds: int) -> list[events_pb2.ClearingResultEvent]:
        bus = await NatsBus.connect(matcher.nats_url, name="test")
        await bus.ensure_streams()
        await limit_responder(bus, 30_000, [])
        subject = keyed(CLEARING_REQUEST, INTERVAL_START_S)
        mark = len(matcher.lines)
        await bus.publish(
            subject, request_bytes(orders, INTERVAL_START_S), event_id=f"clearing-request-{INTERVAL_START_S}"
        )
        for _ in range(kill_rounds):
            await asyncio.to_thread(matcher.wait_for_log, "clearing", mark)
            await asyncio.sleep(0.05)
            assert not any('"msg": "cleared"' in line for line in matcher.lines[mark:]), (
                "too late to kill mid-clearing"
            )
            matcher.kill()
            mark = len(matcher.lines)
            # The request is redelivered after ack_wait; a fresh process picks it up again.
            await asyncio.to_thread(matcher.start)
        results = await wait_results(bus, INTERVAL_START_S, timeout_s=120)
        await bus.close()
        return results

    results = asyncio.run(publish_and_collect(kill_rounds=2))
    matcher.stop()
    assert len(results) == 1, f"{len(results)} results for one interval"
    assert results[0].result.stats.n_orders == 60_000
    assert sum(t.energy_wh for t in results[0].result.trades) == 30_000 // 4


def test_a_what_if_clearing_over_grpc_uses_the_grid_sent_with_it_and_names_a_bad_row(
    matcher: Matcher,
) -> None:
    ports = matcher.start()
    with grpc.insecure_channel(f"127.0.0.1:{ports['grpc_port']}") as channel:
        stub = matcher_pb2_grpc.MatcherStub(channel)
        request = matcher_pb2.ClearRequest(
            interval=common_pb2.Interval(start_s=INTERVAL_START_S, length_s=900),
            grid_yaml=yaml.safe_dump({**GRID, "lines": [{**GRID["lines"][0], "capacity_w": 8_000}]}),
        )
        request.orders.extend(congested_book(40))
        result = stub.Clear(request, timeout=10)
        assert sum(t.energy_wh for t in result.trades) == 2_000
        bad = matcher_pb2.ClearRequest()
        bad.orders.extend([order(0, common_pb2.SIDE_BUY, "n1", 100, 150)])
        with pytest.raises(grpc.RpcError) as info:
            stub.Clear(bad, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "orders[0]" in (info.value.details() or "")
    matcher.stop()
