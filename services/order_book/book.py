"""The order book's use cases: register, place, amend, cancel, read, and follow fills and market data.

Each use case takes the authenticated identity and domain values (never
protobuf), applies the rate limit, checks the market rules and signatures,
and hands writes to the single writer. The acting participant is always the
identity's; another participant's orders answer NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import nacl.signing

from services.domain.credentials import SIGNATURE_BYTES, is_valid_public_key
from services.domain.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from services.domain.ids import participant_id_from_public_key
from services.domain.intervals import Clock
from services.order_book.adapters.store import AmendOp, BookStore, CancelOp, PlaceOp
from services.order_book.adapters.verifier import SignatureVerifier
from services.order_book.adapters.writer import BookWriter
from services.order_book.domain.limits import RateLimiter
from services.order_book.domain.market import IntervalOpened, MarketEvent, MarketRules
from services.order_book.domain.orders import (
    Fill,
    Meter,
    OrderRecord,
    Participant,
    Receipt,
    SignedOrder,
    canonical_order_bytes,
)
from services.platform.grpc_server import Identity

_ID = "A-Z a-z 0-9 . _ : -"
_NAME_MAX = 64
LIST_PAGE_DEFAULT = 100
LIST_PAGE_MAX = 1000
FILLS_PAGE = 500


def _check_id(value: str, field: str) -> None:
    if not value:
        raise InvalidArgument("is required", field=field)
    if len(value) > _NAME_MAX or not all((c.isalnum() and c.isascii()) or c in "._:-" for c in value):
        raise InvalidArgument(f"must be 1-{_NAME_MAX} characters of {_ID}", field=field)


class Signal:
    """Wakes every waiter once per `notify()`; take `waiter()` before reading, so no notification is lost."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        # Counts notifications, so a reader can tell whether anything happened since it last looked.
        self.generation = 0

    def notify(self) -> None:
        self.generation += 1
        self._event.set()
        self._event = asyncio.Event()

    def waiter(self) -> asyncio.Event:
        return self._event


async def wait_any(*events: asyncio.Event, timeout_s: float, until: Awaitable[None] | None = None) -> None:
    """Return when one of `events` is set, `until` is done, or after `timeout_s` (wall seconds)."""
    waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(event.wait()) for event in events]
    if until is not None:
        waiters.append(asyncio.ensure_future(until))
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


@dataclass(frozen=True, slots=True)
class Registered:
    """A participant with its verify key, kept in memory for every call."""

    participant: Participant
    verify_key: nacl.signing.VerifyKey


class ParticipantRegistry:
    """The registered participants, loaded at start and updated on registration (one process owns the book)."""

    def __init__(self, participants: Sequence[Participant] = ()) -> None:
        self._by_id: dict[str, Registered] = {}
        for participant in participants:
            self.add(participant)

    def add(self, participant: Participant) -> Registered:
        registered = Registered(participant, nacl.signing.VerifyKey(participant.public_key))
        self._by_id[participant.participant_id] = registered
        return registered

    def get(self, participant_id: str) -> Registered | None:
        return self._by_id.get(participant_id)

    def __contains__(self, participant_id: object) -> bool:
        return participant_id in self._by_id


class MarketFeed:
    """Public market events in memory: the recent closed and cleared intervals, and a signal for new ones."""

    def __init__(self, keep: int = 64) -> None:
        self._events: deque[tuple[int, MarketEvent]] = deque(maxlen=keep)
        self._next = 0
        self.signal = Signal()

    def publish(self, events: Sequence[MarketEvent]) -> None:
        for event in events:
            self._events.append((self._next, event))
            self._next += 1
        if events:
            self.signal.notify()

    def after(self, position: int) -> tuple[list[MarketEvent], int]:
        """Events numbered >= `position`, and the position to ask for next."""
        return [event for number, event in self._events if number >= position], self._next


class OrderInput(NamedTuple):
    """One order of a request, as the client sent it; the body may have failed conversion already."""

    body_or_error: SignedOrder | DomainError
    # "" for a single order, "orders[3]." in a batch, "replacement." for an amend.
    prefix: str


class OrderBook:
    """The use cases behind the OrderBook API."""

    def __init__(
        self,
        *,
        rules: MarketRules,
        store: BookStore,
        writer: BookWriter,
        verifier: SignatureVerifier,
        limiter: RateLimiter,
        registry: ParticipantRegistry,
        clock: Clock,
        feed: MarketFeed,
        fills_signal: Signal,
        stop: asyncio.Event,
        operator_keys: frozenset[bytes] = frozenset(),
        open_registration: bool = True,
        max_batch_orders: int = 1000,
        on_rejected: Callable[[str, int], None] | None = None,
    ) -> None:
        self.rules = rules
        self.store = store
        self.writer = writer
        self.verifier = verifier
        self.limiter = limiter
        self.registry = registry
        self.clock = clock
        self.feed = feed
        self.fills_signal = fills_signal
        # Newest fill_seq per participant as of fills_signal generation `_marks_generation`: a fill stream
        # reads the database only when its participant has fills it has not sent, not on every clearing.
        self._fill_marks: dict[str, int] = {}
        self._fill_marks_seq = 0
        self._marks_generation = -1
        self._marks_lock = asyncio.Lock()
        self.stop = stop
        self.operator_ids = frozenset(participant_id_from_public_key(key) for key in operator_keys)
        self.open_registration = open_registration
        self.max_batch_orders = max_batch_orders
        self.on_rejected = on_rejected

    # Helpers.

    def _participant(self, identity: Identity) -> Registered:
        registered = self.registry.get(identity.participant_id)
        if registered is None:
            raise PermissionDenied(
                f"participant {identity.participant_id} is not registered; call RegisterParticipant first"
            )
        return registered

    def _limit(self, identity: Identity, cost: int = 1) -> None:
        self.limiter.take(identity.participant_id, cost, time.monotonic())

    def is_operator(self, identity: Identity) -> bool:
        return identity.operator or identity.participant_id in self.operator_ids

    # Participants and meters.

    async def register_participant(
        self, identity: Identity, public_key: bytes, node_id: str, display_name: str
    ) -> Participant:
        self._limit(identity)
        if not public_key:
            raise InvalidArgument("is required", field="public_key")
        if not is_valid_public_key(public_key):
            raise InvalidArgument(
                "must be a 32-byte Ed25519 public key (a valid curve point)", field="public_key"
            )
        participant_id = participant_id_from_public_key(public_key)
        if participant_id != identity.participant_id:
            if not self.is_operator(identity):
                raise PermissionDenied("only an operator may register another participant's key")
        elif not self.open_registration and not self.is_operator(identity):
            raise PermissionDenied("registration is closed: an operator registers participants")
        _check_id(node_id, "node_id")
        if node_id not in self.rules.nodes:
            raise InvalidArgument(f"unknown node {node_id!r}", field="node_id")
        if len(display_name) > _NAME_MAX or not display_name.isprintable():
            raise InvalidArgument(f"must be at most {_NAME_MAX} printable characters", field="display_name")
        candidate = Participant(participant_id, public_key, node_id, display_name, int(self.clock.now_s()))
        stored = await asyncio.to_thread(self.store.register_participant, candidate)
        self.registry.add(stored)
        return stored

    async def get_participant(self, identity: Identity, participant_id: str) -> Participant:
        self._limit(identity)
        wanted = participant_id or identity.participant_id
        if wanted != identity.participant_id and not self.is_operator(identity):
            raise NotFound(f"no participant {wanted!r}", field="participant_id")
        registered = self.registry.get(wanted)
        if registered is None:
            raise NotFound(f"no participant {wanted!r}", field="participant_id")
        return registered.participant

    async def register_meter(
        self, identity: Identity, meter_id: str, participant_id: str, node_id: str
    ) -> Meter:
        self._limit(identity)
        if not self.is_operator(identity):
            raise PermissionDenied("only an operator may register meters")
        _check_id(meter_id, "meter_id")
        if not participant_id:
            raise InvalidArgument("is required", field="participant_id")
        owner = self.registry.get(participant_id)
        if owner is None:
            raise NotFound(f"no participant {participant_id!r}", field="participant_id")
        _check_id(node_id, "node_id")
        if node_id not in self.rules.nodes:
            raise InvalidArgument(f"unknown node {node_id!r}", field="node_id")
        if node_id != owner.participant.node_id:
            raise InvalidArgument(
                f"participant {participant_id} is registered at node {owner.participant.node_id!r}",
                field="node_id",
            )
        meter = Meter(meter_id, participant_id, node_id, int(self.clock.now_s()))
        return await asyncio.to_thread(self.store.register_meter, meter)

    async def list_meters(self, identity: Identity) -> list[Meter]:
        self._limit(identity)
        if self.is_operator(identity):
            return await asyncio.to_thread(self.store.list_meters, None)
        self._participant(identity)
        return await asyncio.to_thread(self.store.list_meters, identity.participant_id)

    # Orders.

    async def place_orders(
        self, identity: Identity, inputs: Sequence[OrderInput]
    ) -> list[Receipt | DomainError]:
        """Check, verify and store orders; one receipt or error per input, in order."""
        registered = self._participant(identity)
        if len(inputs) > self.max_batch_orders:
            raise InvalidArgument(
                f"{len(inputs)} orders in one call; at most {self.max_batch_orders} are allowed",
                field="orders",
            )
        if not inputs:
            raise InvalidArgument("is empty: send at least one order", field="orders")
        self._limit(identity, len(inputs))
        checked = await self._check_and_verify(registered, inputs)
        ready = [
            (order, inputs[i].prefix) for i, order in enumerate(checked) if isinstance(order, SignedOrder)
        ]
        stored: list[Receipt | DomainError] = []
        if ready:
            op = await self.writer.place(
                PlaceOp(
                    identity.participant_id,
                    [order for order, _prefix in ready],
                    [f"{prefix}body" for _order, prefix in ready],
                )
            )
            stored = op.results
        answers = iter(stored)
        final = [next(answers) if isinstance(item, SignedOrder) else item for item in checked]
        self._count_rejections(final)
        return final

    async def _check_and_verify(
        self, registered: Registered, inputs: Sequence[OrderInput]
    ) -> list[SignedOrder | DomainError]:
        now_s = self.clock.now_s()
        window = self.rules.open_window(now_s)
        node_id = registered.participant.node_id
        results: list[SignedOrder | DomainError] = []
        to_verify: list[int] = []
        for index, item in enumerate(inputs):
            order = item.body_or_error
            if isinstance(order, DomainError):
                results.append(order)
                continue
            try:
                self.rules.check_body(order.body, node_id, now_s, f"{item.prefix}body", window)
            except FailedPrecondition:
                # A closed interval: the store decides, because a repeat of an order stored before its
                # gate closed must still get its first receipt; an unknown order is refused there as closed.
                pass
            except DomainError as exc:
                results.append(exc)
                continue
            if len(order.signature) != SIGNATURE_BYTES:
                results.append(
                    InvalidArgument(
                        f"must be a {SIGNATURE_BYTES}-byte Ed25519 signature, got {len(order.signature)} bytes",
                        field=f"{item.prefix}signature",
                    )
                )
                continue
            results.append(order)
            to_verify.append(index)
        key = registered.verify_key
        verdicts = await self.verifier.verify_many(
            [
                (key, canonical_order_bytes(order.body), order.signature)
                for order in (results[i] for i in to_verify)
                if isinstance(order, SignedOrder)
            ]
        )
        for index, ok in zip(to_verify, verdicts, strict=True):
            if not ok:
                results[index] = InvalidArgument(
                    "does not verify: it must be the participant's Ed25519 signature over the order's "
                    "canonical bytes",
                    field=f"{inputs[index].prefix}signature",
                )
        return results

    def _count_rejections(self, results: Sequence[Receipt | DomainError]) -> None:
        if self.on_rejected is None:
            return
        for result in results:
            if isinstance(result, DomainError):
                self.on_rejected(result.status, 1)

    async def place_order(self, identity: Identity, item: OrderInput) -> Receipt:
        result = (await self.place_orders(identity, [item]))[0]
        if isinstance(result, DomainError):
            raise result
        return result

    async def amend_order(self, identity: Identity, order_id: str, replacement: OrderInput) -> Receipt:
        registered = self._participant(identity)
        self._limit(identity)
        if not order_id:
            raise InvalidArgument("is required", field="order_id")
        checked = (await self._check_and_verify(registered, [replacement]))[0]
        if isinstance(checked, DomainError):
            self._count_rejections([checked])
            raise checked
        op = await self.writer.amend(AmendOp(identity.participant_id, order_id, checked))
        assert op.result is not None
        if isinstance(op.result, DomainError):
            self._count_rejections([op.result])
            raise op.result
        return op.result

    async def cancel_order(self, identity: Identity, order_id: str) -> OrderRecord:
        self._participant(identity)
        self._limit(identity)
        if not order_id:
            raise InvalidArgument("is required", field="order_id")
        op = await self.writer.cancel(CancelOp(identity.participant_id, order_id))
        assert op.result is not None
        if isinstance(op.result, DomainError):
            raise op.result
        return op.result

    async def get_order(self, identity: Identity, order_id: str) -> OrderRecord:
        self._participant(identity)
        self._limit(identity)
        if not order_id:
            raise InvalidArgument("is required", field="order_id")
        record = await asyncio.to_thread(self.store.get_order, identity.participant_id, order_id)
        if record is None:
            raise NotFound(f"no order {order_id!r}", field="order_id")
        return record

    async def list_orders(
        self, identity: Identity, interval_start_s: int, page_size: int, page_token: str
    ) -> tuple[list[OrderRecord], str]:
        self._participant(identity)
        self._limit(identity)
        if interval_start_s < 0 or interval_start_s % self.rules.interval_s:
            raise InvalidArgument(
                f"must be 0 or the start of an interval (a multiple of {self.rules.interval_s} s)",
                field="interval_start_s",
            )
        if page_size < 0 or page_size > LIST_PAGE_MAX:
            raise InvalidArgument(
                f"must be 0 (default {LIST_PAGE_DEFAULT}) to {LIST_PAGE_MAX}", field="page_size"
            )
        limit = page_size or LIST_PAGE_DEFAULT
        after = 0
        if page_token:
            if not page_token.isdigit() or len(page_token) > 19:
                raise InvalidArgument("is not a token from a previous response", field="page_token")
            after = int(page_token)
        records = await asyncio.to_thread(
            self.store.list_orders, identity.participant_id, interval_start_s, after, limit + 1
        )
        next_token = ""
        if len(records) > limit:
            records = records[:limit]
            next_token = str(records[-1].book_seq)
        return records, next_token

    # Streams.

    async def stream_fills(self, identity: Identity, after_fill_seq: int) -> AsyncIterator[Fill]:
        """The caller's fills after `after_fill_seq`, then new ones as results arrive, until the service stops."""
        self._participant(identity)
        self._limit(identity)
        after = after_fill_seq
        while not self.stop.is_set():
            waiter = self.fills_signal.waiter()
            fills: list[Fill] = []
            if await self._newest_fill_seq(identity.participant_id) > after:
                fills = await asyncio.to_thread(
                    self.store.fills_after, identity.participant_id, after, FILLS_PAGE
                )
            for fill in fills:
                yield fill
                after = fill.fill_seq
            if len(fills) < FILLS_PAGE:
                await wait_any(waiter, self.stop, timeout_s=5.0)

    async def _newest_fill_seq(self, participant_id: str) -> int:
        """The participant's newest committed fill_seq; one grouped query per clearing serves every stream."""
        if self._marks_generation != self.fills_signal.generation:
            async with self._marks_lock:
                generation = self.fills_signal.generation
                if self._marks_generation != generation:
                    marks = await asyncio.to_thread(self.store.fill_marks_after, self._fill_marks_seq)
                    self._fill_marks.update(marks)
                    self._fill_marks_seq = max([self._fill_marks_seq, *marks.values()])
                    self._marks_generation = generation
        return self._fill_marks.get(participant_id, 0)

    async def stream_market_data(self, identity: Identity) -> AsyncIterator[MarketEvent]:
        """Recent closed and cleared intervals, the open ones, then each change, until the service stops."""
        self._limit(identity)
        position = 0
        opened_up_to = 0
        while not self.stop.is_set():
            waiter = self.feed.signal.waiter()
            events, position = self.feed.after(position)
            for event in events:
                yield event
            now_s = self.clock.now_s()
            for start_s in self.rules.open_starts(now_s):
                if start_s > opened_up_to:
                    yield IntervalOpened(start_s, self.rules.gate_time_s(start_s))
                    opened_up_to = start_s
            # The next interval opens when the first open one closes.
            next_change_s = self.rules.gate_time_s(self.rules.first_open_start_s(now_s))
            await wait_any(waiter, self.stop, timeout_s=30.0, until=self.clock.sleep_until(next_change_s))
