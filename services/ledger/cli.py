"""`p2pgrid ledger …` commands (verify a ledger, verify a receipt offline) and `p2pgrid bench ledger`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_DATABASE_URL = "sqlite:///var/ledger.db"


def default_verify_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ledger = subparsers.add_parser("ledger", help="verify the settlement ledger and its receipts")
    ledger.set_defaults(func=lambda _args: _help(ledger))
    commands = ledger.add_subparsers(title="ledger commands", metavar="COMMAND")

    verify = commands.add_parser(
        "verify",
        help="re-hash the whole chain, check every checkpoint and the balance invariant",
        description="Re-derive the ledger from its rows: hash chain, Merkle roots, signed checkpoints, "
        "account totals. Exits 1 naming the first failure.",
    )
    verify.add_argument(
        "--database-url",
        default=None,
        help="the ledger database (default: env P2PGRID_LEDGER_DATABASE_URL, else "
        + DEFAULT_DATABASE_URL
        + ")",
    )
    verify.add_argument(
        "--key",
        default=None,
        help="the ledger's public key (hex, base64 or a file); without it, signatures are checked "
        "against the keys stored with the checkpoints",
    )
    verify.add_argument(
        "--workers",
        type=int,
        default=default_verify_workers(),
        help="processes that hash ranges of the chain in parallel (default: the CPUs, at most 4)",
    )
    verify.add_argument("--quiet", action="store_true", help="no progress on stderr")
    verify.set_defaults(func=_verify)

    receipt = commands.add_parser("receipt", help="receipts for transfers")
    receipt.set_defaults(func=lambda _args: _help(receipt))
    receipt_commands = receipt.add_subparsers(title="receipt commands", metavar="COMMAND")
    receipt_verify = receipt_commands.add_parser(
        "verify",
        help="verify a receipt offline (no database)",
        description="Check a receipt's inclusion proof and checkpoint signature. Exits 1 naming the first failure.",
    )
    receipt_verify.add_argument("receipt", metavar="RECEIPT.json")
    receipt_verify.add_argument(
        "--key", required=True, metavar="LEDGER_PUBLIC_KEY", help="hex, base64 or a file"
    )
    receipt_verify.set_defaults(func=_verify_receipt)


def register_bench(bench_subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = bench_subparsers.add_parser(
        "ledger",
        help="settlement write speed against a bulk insert of the same rows, and verify speed",
    )
    bench.add_argument("--database", choices=["sqlite", "postgresql", "both"], default="both")
    bench.add_argument(
        "--intervals", type=int, default=48, help="intervals of the synthetic day (default 48)"
    )
    bench.add_argument("--participants", type=int, default=1000)
    bench.add_argument("--rounds", type=int, default=3, help="best of this many runs (default 3)")
    bench.add_argument(
        "--postgres-url",
        default=None,
        help="default: env P2PGRID_BENCH_POSTGRES_URL, else postgresql+psycopg://postgres@127.0.0.1:5432/test",
    )
    bench.set_defaults(func=_bench)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _fail(message: str) -> int:
    print(f"FAIL: {message}", file=sys.stderr)
    return 1


def _verify(args: argparse.Namespace) -> int:
    from services.ledger.adapters.keys import LedgerKeyError, parse_public_key
    from services.ledger.adapters.sql import LedgerStore
    from services.ledger.domain.audit import VerificationError
    from services.platform.db import DatabaseUrlError, make_engine, parse_database_url

    url = args.database_url or os.environ.get("P2PGRID_LEDGER_DATABASE_URL", DEFAULT_DATABASE_URL)
    try:
        trusted = parse_public_key(args.key) if args.key else None
        parsed = parse_database_url(url)
    except (LedgerKeyError, DatabaseUrlError) as exc:
        return _fail(str(exc))
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
        # Opening a missing SQLite file would create an empty one.
        return _fail(f"no ledger database at {parsed.database!r}")
    engine = make_engine(url)
    last_report = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if args.quiet or (now - last_report[0] < 0.5 and done < total):
            return
        last_report[0] = now
        print(f"\rverified {done:,} of {total:,} transfers", end="", file=sys.stderr, flush=True)

    store = LedgerStore(engine)
    started = time.monotonic()
    try:
        report = store.verify(trusted_public_key=trusted, progress=progress, workers=max(1, args.workers))
    except VerificationError as exc:
        if not args.quiet:
            print(file=sys.stderr)
        return _fail(str(exc))
    except Exception as exc:  # a database that cannot be read at all is a failure too, named
        if not args.quiet:
            print(file=sys.stderr)
        return _fail(f"cannot read the ledger at {url}: {exc}")
    finally:
        engine.dispose()
    if not args.quiet:
        print(file=sys.stderr)
    keys = ", ".join(k.hex() for k in report.signed_by) or "none"
    print(
        f"OK: {report.transfers} transfers, {report.checkpoints} checkpoints, {report.accounts} accounts, "
        f"{report.settled_intervals} settlement revisions verified in {time.monotonic() - started:.1f} s; "
        f"root {report.root_hash.hex()}; signed by {keys}"
        + ("" if trusted else " (not checked against a trusted key: pass --key)")
    )
    return 0


def _verify_receipt(args: argparse.Namespace) -> int:
    from services.ledger.adapters.keys import LedgerKeyError, parse_public_key
    from services.ledger.domain.receipt import Receipt, ReceiptError, verify_receipt

    try:
        key = parse_public_key(args.key)
    except LedgerKeyError as exc:
        return _fail(str(exc))
    try:
        data: Any = json.loads(Path(args.receipt).read_text())
    except OSError as exc:
        return _fail(f"cannot read {args.receipt}: {exc}")
    except json.JSONDecodeError as exc:
        return _fail(f"{args.receipt} is not JSON: {exc}")
    try:
        receipt = Receipt.from_json(data)
        verify_receipt(receipt, key)
    except ReceiptError as exc:
        return _fail(str(exc))
    t = receipt.transfer
    print(
        f"OK: transfer {t.transfer_id} ({t.amount_nano} nano from {t.debit_account} to {t.credit_account}) "
        f"is entry {receipt.seq} of the ledger at size {receipt.checkpoint.tree_size}, "
        f"signed at {receipt.checkpoint.time_ms} ms"
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    from services.ledger.bench import run

    return run(args)
