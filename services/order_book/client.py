"""The Python client for trading bots: keys, signed orders, call tokens, retries that are safe, and streams.

    key = BotKey.load_or_create("var/keys/pv-1.key")
    async with OrderBookClient("127.0.0.1:50051", key) as book:
        await book.register("n1")
        order = book.order(Side.SELL, "n1", interval_start_s, energy_wh=1200,
                           price_micro_per_kwh=90_000, client_order_id="pv-1767225600")
        receipt = await book.place(order)
        async for fill in book.fills():
            ...

Every write carries a client_order_id chosen by the bot, and a retried call
resends exactly the same signed request, so a call that timed out or hit a
restarting order book can be retried without placing anything twice: the
book answers a repeat with the first receipt. Choose client ids that are
deterministic in the bot's own state (e.g. `pv-<interval>-v<n>`) and a bot
that itself restarts re-sends the same ids too. Streams reconnect and resume
after the last fill they delivered.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import nacl.signing
from grpc.aio import EOF  # type: ignore[attr-defined]

from services.domain.credentials import ORDER_BOOK_AUDIENCE, make_token
from services.domain.ids import new_id, participant_id_from_public_key
from services.gen.p2pgrid.orderbook.v1 import order_book_pb2 as pb
from services.gen.p2pgrid.orderbook.v1 import order_book_pb2_grpc as pb_grpc
from services.order_book.domain.orders import Side, encode_order

log = logging.getLogger(__name__)
T = TypeVar("T")

# Status codes after which resending the same request is safe and may succeed.
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
__all__ = ["BotKey", "OrderBookClient", "OrderBookError", "Side", "pb"]


class OrderBookError(Exception):
    """A call the order book refused; `code` is the gRPC status, `details` names the field and rule."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class BotKey:
    """An Ed25519 key pair; the participant id is derived from its public key."""

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self.signing_key = signing_key
        self.public_key = bytes(signing_key.verify_key)
        self.participant_id = participant_id_from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> BotKey:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> BotKey:
        return cls(nacl.signing.SigningKey(seed))

    @classmethod
    def load(cls, path: str | Path) -> BotKey:
        """Read a key file: the 32-byte seed in hex on the first line."""
        text = Path(path).read_text().split()
        if not text:
            raise ValueError(f"{path}: empty key file")
        try:
            seed = bytes.fromhex(text[0])
        except ValueError:
            raise ValueError(f"{path}: the first word must be a 64-character hex seed") from None
        if len(seed) != 32:
            raise ValueError(f"{path}: an Ed25519 seed has 32 bytes, got {len(seed)}")
        return cls.from_seed(seed)

    def save(self, path: str | Path) -> None:
        """Write the seed (hex) and, for reference, the public key and participant id; readable by the owner only."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        seed = bytes(self.signing_key).hex()
        text = f"{seed}\n# public_key {self.public_key.hex()}\n# participant_id {self.participant_id}\n"
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)

    @classmethod
    def load_or_create(cls, path: str | Path) -> BotKey:
        if Path(path).exists():
            return cls.load(path)
        key = cls.generate()
        key.save(path)
        return key

    def sign(self, message: bytes) -> bytes:
        return bytes(self.signing_key.sign(message).signature)

    def token(
        self, audience: str = ORDER_BOOK_AUDIENCE, lifetime_s: int = 600, now_s: float | None = None
    ) -> str:
        issued_s = int(time.time() if now_s is None else now_s)
        return make_token(self.signing_key, audience, issued_s, issued_s + lifetime_s)


def signed_order(
    key: BotKey,
    side: Side,
    node_id: str,
    interval_start_s: int,
    energy_wh: int,
    price_micro_per_kwh: int,
    client_order_id: str | None = None,
) -> pb.PlaceOrderRequest:
    """A PlaceOrderRequest signed over the canonical bytes of its body."""
    cid = client_order_id or f"o-{new_id()}"
    signature = key.sign(
        encode_order(cid, int(side), node_id, interval_start_s, energy_wh, price_micro_per_kwh)
    )
    return pb.PlaceOrderRequest(
        body=pb.OrderBody(
            client_order_id=cid,
            side=int(side),  # type: ignore[arg-type]
            node_id=node_id,
            interval_start_s=interval_start_s,
            energy_wh=energy_wh,
            price_micro_per_kwh=price_micro_per_kwh,
        ),
        signature=signature,
    )


def _retry_after_s(error: grpc.aio.AioRpcError) -> float:
    trailing: Any = error.trailing_metadata() or ()
    for key, value in trailing:
        if key == "retry-after-s":
            try:
                return float(value)
            except (TypeError, ValueError):
                return 0.0
    return 0.0


class OrderBookClient:
    """An asyncio client of one order book; retries UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED."""

    def __init__(
        self,
        target: str,
        key: BotKey,
        *,
        audience: str = ORDER_BOOK_AUDIENCE,
        token_lifetime_s: int = 600,
        timeout_s: float = 10.0,
        retry_for_s: float = 60.0,
    ) -> None:
        self.target = target
        self.key = key
        self.audience = audience
        self.token_lifetime_s = token_lifetime_s
        self.timeout_s = timeout_s
        self.retry_for_s = retry_for_s
        self.channel = grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", 32 * 1024 * 1024),
                ("grpc.max_send_message_length", 32 * 1024 * 1024),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
        )
        self.stub = pb_grpc.OrderBookStub(self.channel)
        self._token = ""
        self._token_renew_s = 0.0

    async def __aenter__(self) -> OrderBookClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close(None)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call credentials, renewed when a third of the token's life is left."""
        now_s = time.time()
        if now_s >= self._token_renew_s:
            self._token = self.key.token(self.audience, self.token_lifetime_s, now_s)
            self._token_renew_s = now_s + self.token_lifetime_s * 2 / 3
        return (("authorization", f"Bearer {self._token}"),)

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any) -> T:
        """One unary call, resent unchanged after retryable failures for up to `retry_for_s`."""
        deadline = time.monotonic() + self.retry_for_s
        backoff_s = 0.1
        while True:
            try:
                return await method(
                    request, metadata=self.metadata(), timeout=self.timeout_s, wait_for_ready=True
                )
            except grpc.aio.AioRpcError as error:
                code = error.code()
                if code not in RETRYABLE or time.monotonic() >= deadline:
                    raise OrderBookError(code, error.details() or "") from None
                wait_s = _retry_after_s(error) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else backoff_s
                await asyncio.sleep(max(wait_s, 0.01))
                backoff_s = min(backoff_s * 2, 2.0)

    # Participants.

    async def register(self, node_id: str, display_name: str = "") -> pb.Participant:
        """Register this key at `node_id` (a repeat is harmless)."""
        request = pb.RegisterParticipantRequest(
            public_key=self.key.public_key, node_id=node_id, display_name=display_name
        )
        return await self._call(self.stub.RegisterParticipant, request)

    async def register_other(self, public_key: bytes, node_id: str, display_name: str = "") -> pb.Participant:
        """Operators: register another participant's key."""
        request = pb.RegisterParticipantRequest(
            public_key=public_key, node_id=node_id, display_name=display_name
        )
        return await self._call(self.stub.RegisterParticipant, request)

    async def me(self) -> pb.Participant:
        return await self._call(self.stub.GetParticipant, pb.GetParticipantRequest())

    # Orders.

    def order(
        self,
        side: Side,
        node_id: str,
        interval_start_s: int,
        energy_wh: int,
        price_micro_per_kwh: int,
        client_order_id: str | None = None,
    ) -> pb.PlaceOrderRequest:
        """A signed order; keep it to resend it unchanged."""
        return signed_order(
            self.key, side, node_id, interval_start_s, energy_wh, price_micro_per_kwh, client_order_id
        )

    async def place(self, order: pb.PlaceOrderRequest) -> pb.OrderReceipt:
        return await self._call(self.stub.PlaceOrder, order)

    async def place_many(self, orders: Sequence[pb.PlaceOrderRequest]) -> list[pb.PlaceOrderResult]:
        """Place orders in one call; one result (receipt or error) per order, in order."""
        response = await self._call(self.stub.PlaceOrders, pb.PlaceOrdersRequest(orders=list(orders)))
        return list(response.results)

    async def amend(self, order_id: str, replacement: pb.PlaceOrderRequest) -> pb.OrderReceipt:
        return await self._call(
            self.stub.AmendOrder, pb.AmendOrderRequest(order_id=order_id, replacement=replacement)
        )

    async def cancel(self, order_id: str) -> pb.Order:
        return await self._call(self.stub.CancelOrder, pb.CancelOrderRequest(order_id=order_id))

    async def get(self, order_id: str) -> pb.Order:
        return await self._call(self.stub.GetOrder, pb.GetOrderRequest(order_id=order_id))

    async def list_orders(self, interval_start_s: int = 0) -> list[pb.Order]:
        """All of this participant's orders (of one interval, if given), following the pages."""
        orders: list[pb.Order] = []
        token = ""
        while True:
            response = await self._call(
                self.stub.ListOrders,
                pb.ListOrdersRequest(interval_start_s=interval_start_s, page_size=1000, page_token=token),
            )
            orders.extend(response.orders)
            token = response.next_page_token
            if not token:
                return orders

    # Streams.

    async def fills(
        self, after_fill_seq: int = 0, stop: asyncio.Event | None = None
    ) -> AsyncIterator[pb.Fill]:
        """This participant's fills, resuming after the last one seen across reconnects, until `stop`."""
        # A reconnect asks for what follows the last fill delivered.
        cursor = [after_fill_seq]
        async for fill in self._resumable(
            lambda: self.stub.StreamFills(
                pb.StreamFillsRequest(after_fill_seq=cursor[0]), metadata=self.metadata(), wait_for_ready=True
            ),
            stop,
        ):
            cursor[0] = fill.fill_seq
            yield fill

    async def market_data(self, stop: asyncio.Event | None = None) -> AsyncIterator[pb.MarketData]:
        """Public market data; after a reconnect the recent intervals are sent again."""
        async for event in self._resumable(
            lambda: self.stub.StreamMarketData(
                pb.StreamMarketDataRequest(), metadata=self.metadata(), wait_for_ready=True
            ),
            stop,
        ):
            yield event

    async def _resumable(
        self, open_stream: Callable[[], Any], stop: asyncio.Event | None
    ) -> AsyncIterator[Any]:
        """Items of a server stream, reopened after it ends or fails (until `stop`)."""
        backoff_s = 0.1
        while stop is None or not stop.is_set():
            call = open_stream()
            try:
                async for item in _until(call, stop):
                    backoff_s = 0.1
                    yield item
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE and error.code() != grpc.StatusCode.CANCELLED:
                    raise OrderBookError(error.code(), error.details() or "") from None
                log.info("stream interrupted (%s); reconnecting", error.code().name)
            finally:
                call.cancel()
            if stop is not None and stop.is_set():
                return
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 2.0)


async def _until(call: Any, stop: asyncio.Event | None) -> AsyncIterator[Any]:
    """Items of a streaming call until it ends or `stop` is set."""
    if stop is None:
        async for item in call:
            yield item
        return
    stopper = asyncio.ensure_future(stop.wait())
    try:
        while True:
            reader = asyncio.ensure_future(call.read())
            done, _ = await asyncio.wait((reader, stopper), return_when=asyncio.FIRST_COMPLETED)
            if reader not in done:
                reader.cancel()
                return
            item = reader.result()
            if item is EOF:
                return
            yield item
    finally:
        stopper.cancel()
