"""Commands of the order book: `p2pgrid order-book keygen|whoami` and the `p2pgrid bench orders` benchmark."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser("order-book", help="order book tools: bot keys")
    commands = parser.add_subparsers(title="order-book commands", metavar="COMMAND")
    parser.set_defaults(func=lambda _args: _help(parser))
    keygen = commands.add_parser(
        "keygen", help="create an Ed25519 key file for a bot (or show an existing one)"
    )
    keygen.add_argument("path", help="key file to create (mode 0600); an existing file is only read")
    keygen.set_defaults(func=_keygen)


def register_bench(bench_subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = bench_subparsers.add_parser(
        "orders", help="signed-order intake of a real order book (batch and single calls), JSON lines"
    )
    parser.add_argument("--database-url", default="", help="database (default: SQLite in a temporary folder)")
    parser.add_argument("--orders", type=int, default=60_000, help="orders in the batch phase")
    parser.add_argument("--batch-size", type=int, default=1000, help="orders per PlaceOrders call")
    parser.add_argument("--batch-concurrency", type=int, default=4, help="PlaceOrders calls in flight")
    parser.add_argument("--single-orders", type=int, default=20_000, help="orders in the single-order phase")
    parser.add_argument("--in-flight", type=int, default=32, help="PlaceOrder calls in flight")
    parser.add_argument("--participants", type=int, default=8, help="participants placing orders")
    parser.add_argument("--verify-threads", type=int, default=2, help="signature threads of the order book")
    parser.set_defaults(func=_bench)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _keygen(args: argparse.Namespace) -> int:
    from services.domain.credentials import b64url
    from services.order_book.client import BotKey

    try:
        key = BotKey.load_or_create(args.path)
    except (OSError, ValueError) as exc:
        print(f"p2pgrid order-book keygen: error: {exc}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {"path": args.path, "participant_id": key.participant_id, "public_key": b64url(key.public_key)}
        )
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    from services.order_book.bench import run

    return run(args)
