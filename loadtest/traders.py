"""Lightweight traders that place and amend signed orders through the order book's public gRPC API.

A pacer turns the scenario's rate into order actions and hands each to an
idle trader; a trader makes one call at a time, so the calls in flight are
at most the number of traders, and an action that finds every trader busy
is counted as skipped rather than queued (a queue would hide the latency).
Each trader is a participant with its own Ed25519 key (derived from the
seed and its number) registered at a household node of the grid.

An action places a new order for one of the next intervals to close, or
amends (cancel-replace) one of the trader's live orders there. Each call is
timed; a call that fails with UNAVAILABLE, DEADLINE_EXCEEDED or
RESOURCE_EXHAUSTED is resent unchanged (same client_order_id, so never
placed twice) until the interval's gate closes, as a bot would. Every
acknowledged order is tallied by interval, so the report can compare it
with the clearing request the order book sent at gate closure.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from loadtest.scenarios import GATE_BURST, Deadline, MarketCalendar, order_rate_per_s
from loadtest.stats import Recorder
from services.domain.intervals import Clock
from services.gen.p2pgrid.orderbook.v1 import order_book_pb2 as pb
from services.gen.p2pgrid.orderbook.v1 import order_book_pb2_grpc as pb_grpc
from services.order_book.client import BotKey, signed_order
from services.order_book.domain.orders import Side

T = TypeVar("T")

CALL_TIMEOUT_S = 10.0
TOKEN_LIFETIME_S = 600
# Connections shared by the traders (a bot farm multiplexes its bots over a few).
CHANNELS = 4
PACER_STEP_S = 0.005
# An order is sent only for an interval whose gate is at least this many wall seconds away.
GATE_MARGIN_WALL_S = 0.05
# Limit prices (micro-currency per kWh) and energies: sells and buys overlap, so the books cross.
SELL_PRICE_RANGE = (60_000, 220_000)
BUY_PRICE_RANGE = (100_000, 300_000)
ENERGY_WH_RANGE = (100, 3_000)
PRICE_TICK = 100
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
# Failures after which the request may have been applied although no answer came.
MAYBE_APPLIED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def trader_key(seed: int, number: int) -> BotKey:
    return BotKey.from_seed(hashlib.sha256(f"p2pgrid-loadtest-{seed}-trader-{number}".encode()).digest())


class ClockMismatch(RuntimeError):
    """The order book's clock and the load test's disagree: orders would target the wrong intervals."""


def wall_s_of(clock: Clock, market_s: float) -> float:
    """The wall time (Unix seconds) at which `clock` reads `market_s`."""
    start_s = getattr(clock, "start_s", None)
    if start_s is None:
        return market_s
    return float(clock.anchor_wall_s) + (market_s - float(start_s)) / float(clock.speedup)  # type: ignore[attr-defined]


@dataclass
class OrderTally:
    """Acknowledged orders by interval: the ids that must be live at gate closure, and what is uncertain."""

    live_ids: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))
    placed: Counter[int] = field(default_factory=Counter)
    amended: Counter[int] = field(default_factory=Counter)
    unknown: Counter[int] = field(default_factory=Counter)
    # Largest difference seen between a receipt's accepted_at_s and the load test's clock (market seconds).
    clock_deviation_s: float = 0.0

    def intervals(self) -> list[int]:
        return sorted(set(self.placed) | set(self.amended) | set(self.unknown))


@dataclass
class LiveOrder:
    order_id: str
    side: Side


class Trader:
    """One participant: its key, node and live orders; one call at a time."""

    def __init__(
        self, number: int, key: BotKey, node_id: str, stub: pb_grpc.OrderBookAsyncStub, seed: int
    ) -> None:
        self.number = number
        self.key = key
        self.node_id = node_id
        self.stub = stub
        self.rng = random.Random(f"{seed}-{number}")
        self.live: dict[int, LiveOrder] = {}
        self.sequence = 0
        self._token = ""
        self._token_renew_s = 0.0

    def metadata(self) -> tuple[tuple[str, str], ...]:
        now_s = time.time()
        if now_s >= self._token_renew_s:
            self._token = self.key.token(lifetime_s=TOKEN_LIFETIME_S, now_s=now_s)
            self._token_renew_s = now_s + TOKEN_LIFETIME_S / 2
        return (("authorization", f"Bearer {self._token}"),)


class OrderFlow:
    """The traders of one run, the pacer that drives them, and the tally of what the book acknowledged."""

    def __init__(
        self,
        *,
        target: str,
        keys: list[BotKey],
        nodes: list[str],
        clock: Clock,
        calendar: MarketCalendar,
        recorder: Recorder,
        scenario: str,
        rate_per_s: float,
        intervals_ahead: int,
        amend_share: float,
        run_id: str,
        seed: int,
    ) -> None:
        options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 2000)]
        self.channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(CHANNELS)]
        stubs = [pb_grpc.OrderBookStub(channel) for channel in self.channels]
        self.traders = [
            Trader(number, key, nodes[number % len(nodes)], stubs[number % len(stubs)], seed)
            for number, key in enumerate(keys)
        ]
        self.clock = clock
        self.calendar = calendar
        self.recorder = recorder
        self.scenario = scenario
        self.rate_per_s = rate_per_s
        self.intervals_ahead = intervals_ahead
        self.amend_share = amend_share
        self.run_id = run_id
        self.tally = OrderTally()
        self.participants = {trader.key.participant_id for trader in self.traders}
        self._idle: deque[Trader] = deque(self.traders)
        self._tasks: set[asyncio.Task[None]] = set()
        self.failure: BaseException | None = None

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close(None)

    # ------------------------------------------------------------------ calls

    async def _call(
        self,
        trader: Trader,
        rpc: str,
        method: Callable[..., Awaitable[T]],
        request: Any,
        give_up_s: float,
    ) -> tuple[T | None, str]:
        """One RPC, resent unchanged after retryable failures until `give_up_s` (monotonic).

        Returns the answer and "ok", or None and "refused" (nothing stored) or "unknown" (an attempt
        may have been applied but no answer said so).
        """
        maybe_applied = False
        backoff_s = 0.05
        while True:
            started_s = time.perf_counter()
            try:
                answer = await method(
                    request, metadata=trader.metadata(), timeout=CALL_TIMEOUT_S, wait_for_ready=True
                )
            except grpc.aio.AioRpcError as error:
                code = error.code()
                self.recorder.error(rpc, code.name, error.details() or "")
                maybe_applied = maybe_applied or code in MAYBE_APPLIED
                if code not in RETRYABLE or time.monotonic() + backoff_s >= give_up_s:
                    return None, "unknown" if maybe_applied else "refused"
                wait_s = backoff_s
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    trailing: Any = error.trailing_metadata() or ()
                    for key, value in trailing:
                        if key == "retry-after-s":
                            wait_s = max(wait_s, float(value))
                await asyncio.sleep(wait_s)
                backoff_s = min(backoff_s * 2, 1.0)
                continue
            self.recorder.call(rpc, time.perf_counter() - started_s)
            return answer, "ok"

    async def register_all(self, concurrency: int = 16) -> None:
        """Register every trader's key at its node (a repeat is harmless); raises on a refusal."""
        gate = asyncio.Semaphore(concurrency)

        async def register(trader: Trader) -> None:
            async with gate:
                request = pb.RegisterParticipantRequest(
                    public_key=trader.key.public_key,
                    node_id=trader.node_id,
                    display_name=f"loadtest-{trader.number}",
                )
                _, outcome = await self._call(
                    trader,
                    "RegisterParticipant",
                    trader.stub.RegisterParticipant,
                    request,
                    time.monotonic() + 30,
                )
                if outcome != "ok":
                    examples = self.recorder.error_examples
                    detail = next(
                        (v[-1] for k, v in examples.items() if k.startswith("RegisterParticipant")), ""
                    )
                    raise RuntimeError(f"the order book refused to register trader {trader.number}: {detail}")

        await asyncio.gather(*(register(trader) for trader in self.traders))

    # ------------------------------------------------------------------ actions

    def _targets(self, now_s: float) -> list[int]:
        """The intervals an action may address now: the next ones to close, or in a burst the closing one."""
        calendar = self.calendar
        margin_s = GATE_MARGIN_WALL_S * calendar.speedup
        first_gate_s = calendar.next_gate_s(now_s + margin_s)
        starts = [
            first_gate_s + calendar.gate_closure_s + i * calendar.interval_s
            for i in range(self.intervals_ahead)
        ]
        if self.scenario == GATE_BURST and calendar.in_burst_window(now_s):
            return starts[:1]
        return starts

    def _gate_deadline(self, start_s: int) -> float:
        """The monotonic time at which the gate of `start_s` closes."""
        gate_s = start_s - self.calendar.gate_closure_s
        return time.monotonic() + (gate_s - self.clock.now_s()) / self.calendar.speedup

    def _check_clock(self, accepted_at_s: int, before_s: float, after_s: float) -> None:
        # accepted_at_s is whole seconds of the book's clock, read between our two readings of ours.
        deviation_s = max(0.0, before_s - 1.0 - accepted_at_s, accepted_at_s - after_s)
        self.tally.clock_deviation_s = max(self.tally.clock_deviation_s, deviation_s)
        if deviation_s > max(5.0, self.calendar.speedup):
            raise ClockMismatch(
                f"the order book's clock read {accepted_at_s} while the load test's read {after_s:.0f} "
                f"({deviation_s:.0f} s apart); give the stack's clock (--speedup, --sim-start-s, --sim-anchor-wall-s)"
            )

    def _order(self, trader: Trader, side: Side, start_s: int) -> pb.PlaceOrderRequest:
        rng = trader.rng
        low, high = SELL_PRICE_RANGE if side == Side.SELL else BUY_PRICE_RANGE
        price = rng.randrange(low // PRICE_TICK, high // PRICE_TICK + 1) * PRICE_TICK
        energy_wh = rng.randint(*ENERGY_WH_RANGE)
        trader.sequence += 1
        client_order_id = f"lt{self.run_id}-{trader.number}-{trader.sequence}"
        return signed_order(trader.key, side, trader.node_id, start_s, energy_wh, price, client_order_id)

    async def act(self, trader: Trader) -> None:
        """One action of `trader`: amend a live order of a target interval, or place a new one."""
        before_s = self.clock.now_s()
        targets = self._targets(before_s)
        for start_s in [s for s in trader.live if s < targets[0]]:
            del trader.live[start_s]  # frozen at its gate
        amendable = [s for s in targets if s in trader.live]
        if amendable and trader.rng.random() < self.amend_share:
            start_s = trader.rng.choice(amendable)
            old = trader.live[start_s]
            request = pb.AmendOrderRequest(
                order_id=old.order_id, replacement=self._order(trader, old.side, start_s)
            )
            receipt, outcome = await self._call(
                trader, "AmendOrder", trader.stub.AmendOrder, request, self._gate_deadline(start_s)
            )
            if receipt is not None:
                self._check_clock(receipt.accepted_at_s, before_s, self.clock.now_s())
                live = self.tally.live_ids[start_s]
                live.discard(old.order_id)
                live.add(receipt.order_id)
                self.tally.amended[start_s] += 1
                self.recorder.order_acknowledged(amend=True)
                trader.live[start_s] = LiveOrder(receipt.order_id, old.side)
            elif outcome == "unknown":
                # Either the old order or its replacement is live now; the tally cannot say which.
                self.tally.live_ids[start_s].discard(old.order_id)
                self.tally.unknown[start_s] += 1
                self.recorder.orders_unknown += 1
                del trader.live[start_s]
            return
        start_s = trader.rng.choice(targets)
        side = Side.SELL if trader.rng.random() < 0.5 else Side.BUY
        order = self._order(trader, side, start_s)
        receipt, outcome = await self._call(
            trader, "PlaceOrder", trader.stub.PlaceOrder, order, self._gate_deadline(start_s)
        )
        if receipt is not None:
            self._check_clock(receipt.accepted_at_s, before_s, self.clock.now_s())
            self.tally.live_ids[start_s].add(receipt.order_id)
            self.tally.placed[start_s] += 1
            self.recorder.order_acknowledged(amend=False)
            if start_s not in trader.live:
                trader.live[start_s] = LiveOrder(receipt.order_id, side)
        elif outcome == "unknown":
            self.tally.unknown[start_s] += 1
            self.recorder.orders_unknown += 1

    async def _run_action(self, trader: Trader) -> None:
        try:
            await self.act(trader)
        except ClockMismatch as exc:
            self.failure = exc
        except Exception as exc:  # an unexpected failure ends the run and is reported
            self.failure = exc
        finally:
            self._idle.append(trader)

    async def run(self, duration_s: float, started_s: float, deadline: Deadline) -> None:
        """Hand actions to idle traders at the scenario's rate from `started_s` until the deadline (monotonic)."""
        credit = 0.0
        last_s = started_s
        while self.failure is None:
            now_s = time.monotonic()
            if now_s >= deadline.end_s:
                break
            rate = order_rate_per_s(
                self.scenario,
                self.rate_per_s,
                now_s - started_s,
                duration_s,
                self.clock.now_s(),
                self.calendar,
            )
            credit += rate * (now_s - last_s)
            last_s = now_s
            while credit >= 1.0:
                credit -= 1.0
                if not self._idle:
                    self.recorder.actions_skipped += 1
                    continue
                task = asyncio.create_task(self._run_action(self._idle.popleft()))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            await asyncio.sleep(PACER_STEP_S)

    async def finish(self) -> None:
        """Wait for the calls in flight (each gives up at its interval's gate)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
