"""`p2pgrid bench orders`: signed-order intake of a real order book process, as JSON lines.

The benchmark starts a nats-server, a database (SQLite in a temporary folder
unless --database-url is given) and an order book process, registers a few
participants and signs every order before timing anything. It then measures,
in one run:

- `verify_baseline`: verifying the batch phase's signatures in a loop on
  one core in this process, before and after the batch phase (the faster is
  the baseline): what signed-order intake cannot beat per core;
- `batch`: PlaceOrders calls of --batch-size orders with --batch-concurrency
  calls in flight; `orders_per_s` counts orders accepted and persisted, and
  `ratio` is that over the baseline;
- `single`: PlaceOrder calls, one order each, with --in-flight calls in
  flight: `orders_per_s` and latency percentiles;
- `unary_baseline`: as many GetParticipant calls (authenticated, nothing
  stored) at the same concurrency: what one gRPC call costs on this machine
  in this run, the ceiling for the single-order phase;
- `null_server_ceiling`: the single-order phase's requests, by the same
  client at the same concurrency, to a gRPC server in its own process that
  answers every call with an empty message and does nothing else (grpc's
  thread-pool server, the cheaper of its two Python servers): the ceiling of
  any Python gRPC server on this machine with the client beside it.

`server_cpu_us_per_order` is the order book process's CPU time (all
threads) per order, which varies less than rates on a shared machine.

Requests are serialised before timing, so the client's share of the two
shared cores is the gRPC call itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
from sqlalchemy import func, select

from services.domain.credentials import verify_signature
from services.domain.intervals import DEFAULT_GATE_CLOSURE_S, DEFAULT_INTERVAL_S
from services.gen.p2pgrid.orderbook.v1 import order_book_pb2 as pb
from services.order_book.client import BotKey, OrderBookClient, signed_order
from services.order_book.domain.orders import Side, encode_order
from services.platform.db import make_engine, postgres_schema
from services.platform.nats_server import NatsServer, env_without_proxy

NODE = "n1"
PLACE_ORDER = "/p2pgrid.orderbook.v1.OrderBook/PlaceOrder"
PLACE_ORDERS = "/p2pgrid.orderbook.v1.OrderBook/PlaceOrders"
GET_PARTICIPANT = "/p2pgrid.orderbook.v1.OrderBook/GetParticipant"
NULL_SERVICE = "p2pgrid.bench.v1.Null"
NULL_CALL = f"/{NULL_SERVICE}/Call"


def _line(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def start_order_book(
    nats_url: str, database_url: str, workdir: Path, extra: Sequence[str] = ()
) -> tuple[subprocess.Popen[bytes], int]:
    """Start `python -m services.order_book` and wait for its ready file; returns the process and gRPC port."""
    ready = workdir / "order_book.ready.json"
    ready.unlink(missing_ok=True)
    log_path = workdir / "order_book.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                *(["-m", "cProfile", "-o", os.environ["OB_PROFILE"]] if os.environ.get("OB_PROFILE") else []),
                "-m",
                "services.order_book",
                "--nats-url",
                nats_url,
                "--database-url",
                database_url,
                "--ready-file",
                str(ready),
                "--log-level",
                "warning",
                "--nodes",
                f"n0,{NODE},n2",
                "--rate-limit-orders-per-s",
                "10000000",
                "--rate-limit-burst",
                "10000000",
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env_without_proxy(),
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if ready.exists():
            return process, int(json.loads(ready.read_text())["grpc_port"])
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the order book exited with {process.returncode}:\n{tail}")
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"the order book did not start within 60 s; see {log_path}")


def _interval_start_s() -> int:
    # Four intervals after the next gate: open for the whole run.
    now_s = time.time()
    first = (int((now_s + DEFAULT_GATE_CLOSURE_S) // DEFAULT_INTERVAL_S) + 1) * DEFAULT_INTERVAL_S
    return first + 4 * DEFAULT_INTERVAL_S


def _sign_orders(
    keys: Sequence[BotKey], count: int, prefix: str, interval_start_s: int
) -> list[pb.PlaceOrderRequest]:
    orders = []
    for i in range(count):
        key = keys[i % len(keys)]
        side = Side.BUY if i % 2 else Side.SELL
        price = 50_000 + (i % 500) * 100
        orders.append(signed_order(key, side, NODE, interval_start_s, 100 + i % 900, price, f"{prefix}-{i}"))
    return orders


def _baseline_verify_per_s(keys: Sequence[BotKey], orders: Sequence[pb.PlaceOrderRequest]) -> float:
    import nacl.signing

    verify_keys = [nacl.signing.VerifyKey(k.public_key) for k in keys]
    items = []
    for i, order in enumerate(orders):
        b = order.body
        message = encode_order(
            b.client_order_id, b.side, b.node_id, b.interval_start_s, b.energy_wh, b.price_micro_per_kwh
        )
        items.append((verify_keys[i % len(keys)], message, order.signature))
    started = time.perf_counter()
    ok = sum(1 for key, message, signature in items if verify_signature(key, message, signature))
    elapsed_s = time.perf_counter() - started
    if ok != len(items):
        raise RuntimeError("a benchmark signature did not verify")
    return len(items) / elapsed_s


async def _register(target: str, keys: Sequence[BotKey]) -> None:
    for key in keys:
        async with OrderBookClient(target, key) as client:
            await client.register(NODE, "bench")


async def _batch_phase(
    target: str,
    keys: Sequence[BotKey],
    orders: Sequence[pb.PlaceOrderRequest],
    batch_size: int,
    concurrency: int,
) -> tuple[int, float]:
    # Each participant's orders go in its own calls (the caller is the signer).
    by_key: dict[int, list[pb.PlaceOrderRequest]] = {}
    for i, order in enumerate(orders):
        by_key.setdefault(i % len(keys), []).append(order)
    payloads: list[tuple[tuple[tuple[str, str], ...], bytes]] = []
    for index, items in by_key.items():
        metadata = (("authorization", f"Bearer {keys[index].token(lifetime_s=3600)}"),)
        for start in range(0, len(items), batch_size):
            request = pb.PlaceOrdersRequest(orders=items[start : start + batch_size])
            payloads.append((metadata, request.SerializeToString()))
    accepted = 0
    async with grpc.aio.insecure_channel(
        target,
        options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)],
    ) as channel:
        call = channel.unary_unary(
            PLACE_ORDERS, request_serializer=None, response_deserializer=pb.PlaceOrdersResponse.FromString
        )
        queue = iter(payloads)

        async def worker() -> int:
            count = 0
            for metadata, payload in queue:
                response = await call(payload, metadata=metadata, timeout=60)
                count += sum(1 for r in response.results if r.HasField("receipt"))
            return count

        started = time.perf_counter()
        accepted = sum(await asyncio.gather(*(worker() for _ in range(concurrency))))
        elapsed_s = time.perf_counter() - started
    return accepted, elapsed_s


Payload = tuple[tuple[tuple[str, str], ...], bytes]


async def _timed_calls(
    target: str,
    method: str,
    deserializer: Callable[[bytes], Any] | None,
    payloads: Sequence[Payload],
    in_flight: int,
) -> tuple[float, list[float]]:
    """Unary calls of pre-serialised requests, `in_flight` at a time: elapsed seconds and each call's latency."""
    latencies_s: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=deserializer)
        queue = iter(payloads)

        async def worker() -> None:
            for metadata, payload in queue:
                t0 = time.perf_counter()
                await call(payload, metadata=metadata, timeout=30)
                latencies_s.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return time.perf_counter() - started, latencies_s


def _single_payloads(keys: Sequence[BotKey], orders: Sequence[pb.PlaceOrderRequest]) -> list[Payload]:
    tokens = {i: (("authorization", f"Bearer {k.token(lifetime_s=3600)}"),) for i, k in enumerate(keys)}
    return [(tokens[i % len(keys)], order.SerializeToString()) for i, order in enumerate(orders)]


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used; 0 where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _getparticipant_payloads(key: BotKey, calls: int) -> list[Payload]:
    """GetParticipant (authenticated, no storage) at the same concurrency: what one of the book's calls costs."""
    metadata = (("authorization", f"Bearer {key.token(lifetime_s=3600)}"),)
    payload = pb.GetParticipantRequest().SerializeToString()
    return [(metadata, payload)] * calls


def serve_null(port_file: str) -> None:
    """A gRPC server that answers every call with an empty message and does no work at all.

    It uses grpc's thread-pool server, the cheaper of grpc's two Python
    servers per call on two cores, so its rate is the ceiling of any Python
    gRPC server on this machine with this client beside it.
    """
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handler = grpc.unary_unary_rpc_method_handler(lambda _request, _context: b"")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(NULL_SERVICE, {"Call": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    Path(port_file).write_text(str(port))
    server.wait_for_termination()


def start_null_server(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port_file = workdir / "null_server.port"
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from services.order_book.bench import serve_null; serve_null({str(port_file)!r})",
        ],
        env=env_without_proxy(),
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text():
            return process, int(port_file.read_text())
        if process.poll() is not None:
            raise RuntimeError(f"the null gRPC server exited with {process.returncode}")
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("the null gRPC server did not start within 30 s")


def _null_ceiling(workdir: Path, orders: Sequence[pb.PlaceOrderRequest], in_flight: int) -> dict[str, Any]:
    """The single-order phase's requests sent to a server that does nothing, by the same client."""
    process, port = start_null_server(workdir)
    try:
        cpu_before_s = _cpu_s(process.pid)
        payloads = [((), order.SerializeToString()) for order in orders]
        elapsed_s, latencies = asyncio.run(
            _timed_calls(f"127.0.0.1:{port}", NULL_CALL, None, payloads, in_flight)
        )
        cpu_s = _cpu_s(process.pid) - cpu_before_s
    finally:
        process.kill()
        process.wait()
    return {
        "bench": "orders",
        "phase": "null_server_ceiling",
        "server": "grpc thread-pool server answering every call with an empty message, no work",
        "in_flight": in_flight,
        "calls": len(latencies),
        "calls_per_s": round(len(latencies) / elapsed_s),
        "p50_ms": _percentile_ms(latencies, 0.50),
        "p99_ms": _percentile_ms(latencies, 0.99),
        "server_cpu_us_per_call": round(cpu_s / max(1, len(latencies)) * 1e6, 1),
    }


def _percentile_ms(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)


def _stored_orders(database_url: str) -> int:
    from services.order_book.adapters.store import orders_t

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(orders_t)).scalar_one())
    finally:
        engine.dispose()


def run(args: argparse.Namespace) -> int:
    if args.database_url.startswith("postgresql"):
        # A throw-away schema, so the benchmark never meets other data in that database.
        with postgres_schema(args.database_url, "bench_orders") as schema:
            make_engine(args.database_url, schema=schema).dispose()  # creates the schema
            separator = "&" if "?" in args.database_url else "?"
            options = quote(f"-csearch_path={schema}")
            return _run(args, f"{args.database_url}{separator}options={options}")
    return _run(args, args.database_url)


def _run(args: argparse.Namespace, database_url: str) -> int:
    with tempfile.TemporaryDirectory(prefix="p2pgrid-bench-orders-") as tmp:
        workdir = Path(tmp)
        database_url = database_url or f"sqlite:///{workdir / 'order_book.db'}"
        backend = database_url.split(":", 1)[0].split("+")[0]
        with NatsServer(store_dir=workdir / "nats") as nats:
            process, port = start_order_book(
                nats.url, database_url, workdir, ["--verify-threads", str(args.verify_threads)]
            )
            target = f"127.0.0.1:{port}"
            try:
                keys = [BotKey.generate() for _ in range(args.participants)]
                asyncio.run(_register(target, keys))
                interval_start_s = _interval_start_s()
                batch_orders = _sign_orders(keys, args.orders, "b", interval_start_s)
                single_orders = _sign_orders(keys, args.single_orders, "s", interval_start_s)
                baseline_before = _baseline_verify_per_s(keys, batch_orders)
                cpu_before_s = _cpu_s(process.pid)
                accepted, elapsed_s = asyncio.run(
                    _batch_phase(target, keys, batch_orders, args.batch_size, args.batch_concurrency)
                )
                batch_cpu_s = _cpu_s(process.pid) - cpu_before_s
                # Measured before and after the batch phase; the faster one is the baseline, so a
                # busy moment on a shared machine cannot flatter the ratio.
                baseline_after = _baseline_verify_per_s(keys, batch_orders)
                baseline = max(baseline_before, baseline_after)
                _line(
                    bench="orders",
                    phase="verify_baseline",
                    signatures=len(batch_orders),
                    verify_per_s_before=round(baseline_before),
                    verify_per_s_after=round(baseline_after),
                )
                rate = accepted / elapsed_s
                _line(
                    bench="orders",
                    phase="batch",
                    database=backend,
                    batch_size=args.batch_size,
                    in_flight=args.batch_concurrency,
                    orders=len(batch_orders),
                    accepted=accepted,
                    seconds=round(elapsed_s, 3),
                    orders_per_s=round(rate),
                    baseline_verify_per_s=round(baseline),
                    ratio=round(rate / baseline, 3),
                    target_ratio=0.6,
                    server_cpu_us_per_order=round(batch_cpu_s / max(1, accepted) * 1e6, 1),
                )
                cpu_before_s = _cpu_s(process.pid)
                elapsed_single_s, latencies = asyncio.run(
                    _timed_calls(
                        target,
                        PLACE_ORDER,
                        pb.OrderReceipt.FromString,
                        _single_payloads(keys, single_orders),
                        args.in_flight,
                    )
                )
                accepted_single = len(latencies)
                single_cpu_s = _cpu_s(process.pid) - cpu_before_s
                _line(
                    bench="orders",
                    phase="single",
                    database=backend,
                    in_flight=args.in_flight,
                    orders=len(single_orders),
                    accepted=accepted_single,
                    seconds=round(elapsed_single_s, 3),
                    orders_per_s=round(accepted_single / elapsed_single_s),
                    p50_ms=_percentile_ms(latencies, 0.50),
                    p99_ms=_percentile_ms(latencies, 0.99),
                    target_orders_per_s=3000,
                    target_p99_ms=10,
                    server_cpu_us_per_order=round(single_cpu_s / max(1, accepted_single) * 1e6, 1),
                )
                cpu_before_s = _cpu_s(process.pid)
                baseline_s, baseline_latencies = asyncio.run(
                    _timed_calls(
                        target,
                        GET_PARTICIPANT,
                        pb.Participant.FromString,
                        _getparticipant_payloads(keys[0], args.single_orders),
                        args.in_flight,
                    )
                )
                baseline_cpu_s = _cpu_s(process.pid) - cpu_before_s
                _line(
                    bench="orders",
                    phase="unary_baseline",
                    call="GetParticipant",
                    in_flight=args.in_flight,
                    calls=args.single_orders,
                    calls_per_s=round(args.single_orders / baseline_s),
                    p50_ms=_percentile_ms(baseline_latencies, 0.50),
                    p99_ms=_percentile_ms(baseline_latencies, 0.99),
                    server_cpu_us_per_call=round(baseline_cpu_s / max(1, args.single_orders) * 1e6, 1),
                )
                _line(**_null_ceiling(workdir, single_orders, args.in_flight))
                stored = _stored_orders(database_url)
                _line(bench="orders", phase="check", stored=stored, acknowledged=accepted + accepted_single)
                if stored != accepted + accepted_single:
                    print(
                        f"stored {stored} orders but {accepted + accepted_single} were acknowledged",
                        file=sys.stderr,
                    )
                    return 1
            finally:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    return 0
