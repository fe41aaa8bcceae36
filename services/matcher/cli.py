"""The matcher's commands: `p2pgrid clear`, `p2pgrid clear verify` and `p2pgrid bench clearing`.

    p2pgrid clear --orders ORDERS.csv --grid GRID.yaml --out RESULT.json
    p2pgrid clear verify --orders ORDERS.csv --grid GRID.yaml --result RESULT.json
    p2pgrid bench clearing [--sizes 10000,100000,1000000] [--networks single,meshed30,radial100]
    p2pgrid bench clearing --orders-file ORDERS.csv --grid GRID.yaml

Exit codes: 0 success, 1 a result that fails verification, 2 bad input (the
message names the file, row or element and the rule).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_VIOLATION = 1
EXIT_BAD_INPUT = 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    clear = subparsers.add_parser(
        "clear",
        help="clear one interval's orders on a grid (welfare-optimal, node prices, trades); 'clear verify' checks a result",
        description="Clear one interval: the welfare-maximising whole-Wh allocation the grid can carry, "
        "one price per node, and bilateral trades. The result is deterministic: the same orders in any "
        "row order give the same bytes (apart from the 'timings' key).",
    )
    clear.add_argument(
        "--orders", type=Path, help="ORDERS.csv: order_id,participant_id,node_id,side,energy_wh,price_per_kwh"
    )
    clear.add_argument("--grid", type=Path, help="GRID.yaml (see services/domain/grid.py for the form)")
    clear.add_argument("--out", type=Path, help="where to write RESULT.json (default: standard output)")
    clear.set_defaults(func=_clear, clear_parser=clear)
    modes = clear.add_subparsers(title="modes", dest="mode", metavar="[verify]")
    verify = modes.add_parser(
        "verify",
        help="check a result against the orders and the grid without the solver",
        description="Check RESULT.json independently of the solver: feasibility (fills, balance, line "
        "limits), the equilibrium conditions of every order, price differences explained by binding "
        "lines, trades and welfare. Exits 1 naming the first violation.",
    )
    verify.add_argument("--orders", type=Path, required=True)
    verify.add_argument("--grid", type=Path, required=True)
    verify.add_argument("--result", type=Path, required=True)
    verify.set_defaults(func=_verify)


def register_bench(benches: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = benches.add_parser(
        "clearing",
        help="clearing time against sorting the same prices (JSON lines)",
        description="Clear generated books (or --orders-file/--grid) and print one JSON line per instance "
        "with clear_s, sort_baseline_s (numpy argsort of the same prices, same run) and their ratio.",
    )
    bench.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated order counts")
    bench.add_argument(
        "--networks", default="single,meshed30,radial100", help="comma-separated: single, meshed30, radial100"
    )
    bench.add_argument("--repeat", type=int, default=5, help="runs per instance; the best time counts")
    bench.add_argument("--seed", type=int, default=1)
    bench.add_argument("--shuffled", action="store_true", help="hand the orders over in random row order")
    bench.add_argument("--orders-file", type=Path, help="ORDERS.csv to clear instead of generated books")
    bench.add_argument("--grid", type=Path, help="GRID.yaml for --orders-file")
    bench.add_argument(
        "--default-allocator",
        action="store_true",
        help="let glibc return freed memory to the OS between runs (page faults then count too)",
    )
    bench.set_defaults(func=_bench)


def _load(orders: Path, grid_path: Path) -> tuple[Any, Any]:
    from services.domain.grid import load_grid
    from services.matcher.domain.orders import read_orders_csv

    grid = load_grid(grid_path)
    with orders.open(encoding="utf-8", newline="") as handle:
        request = read_orders_csv(handle, grid, source=str(orders))
    return grid, request


def _clear(args: argparse.Namespace) -> int:
    if args.mode is None and (args.orders is None or args.grid is None):
        args.clear_parser.print_usage(sys.stderr)
        print("p2pgrid clear: --orders and --grid are required", file=sys.stderr)
        return EXIT_BAD_INPUT
    from services.domain.grid import ConsistencyError
    from services.matcher.domain.clearing import clear
    from services.matcher.domain.orders import OrderError
    from services.matcher.domain.result import result_to_json

    try:
        grid, request = _load(args.orders, args.grid)
        started = time.perf_counter()
        result = clear(request, grid)
        elapsed = time.perf_counter() - started
    except (ConsistencyError, OrderError) as exc:
        print(f"p2pgrid clear: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        print(f"p2pgrid clear: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    text = result_to_json(result) + "\n"
    if args.out is None or str(args.out) == "-":
        sys.stdout.write(text)
    else:
        args.out.write_text(text, encoding="utf-8")
    prices = result.node_price_micro_per_kwh.tolist()
    print(
        f"cleared {len(request)} orders on {len(grid.nodes)} node(s) in {elapsed:.3f} s: "
        f"traded {result.traded_wh} Wh, welfare {result.welfare_nano / 1e9:.6f}, "
        f"congestion rent {result.congestion_rent_nano / 1e9:.6f}, "
        f"{int(result.binding.sum())} binding line(s), "
        f"node prices {min(prices)}..{max(prices)} micro per kWh",
        file=sys.stderr,
    )
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from services.domain.grid import ConsistencyError
    from services.matcher.domain.orders import OrderError
    from services.matcher.domain.verify import VerificationError, verify_result

    try:
        grid, request = _load(args.orders, args.grid)
        document = json.loads(args.result.read_text(encoding="utf-8"))
    except (ConsistencyError, OrderError) as exc:
        print(f"p2pgrid clear verify: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (OSError, json.JSONDecodeError) as exc:
        print(f"p2pgrid clear verify: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not isinstance(document, dict):
        print("p2pgrid clear verify: the result is not a JSON object", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        report = verify_result(request, grid, document)
    except VerificationError as exc:
        print(f"violation: {exc}", file=sys.stderr)
        return EXIT_VIOLATION
    print(
        f"ok: {report.orders} orders, {report.trades} trades, {report.binding_lines} binding line(s), "
        f"welfare {report.welfare_nano} nano; within {report.welfare_gap_bound_nano:.0f} nano of the optimum "
        "(duality bound from the binding lines' shadow prices)"
    )
    return EXIT_OK


def _bench(args: argparse.Namespace) -> int:
    from services.matcher import bench

    if (args.orders_file is None) != (args.grid is None):
        print("p2pgrid bench clearing: --orders-file and --grid go together", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        sizes = tuple(int(size) for size in args.sizes.split(",") if size)
    except ValueError:
        print(f"p2pgrid bench clearing: --sizes must be whole numbers, got {args.sizes!r}", file=sys.stderr)
        return EXIT_BAD_INPUT
    networks = tuple(name for name in args.networks.split(",") if name)
    unknown = [name for name in networks if name not in bench.NETWORKS]
    if unknown:
        print(
            f"p2pgrid bench clearing: unknown network {unknown[0]!r} (choose from {', '.join(bench.NETWORKS)})",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    return bench.main(
        sizes=sizes,
        networks=networks,
        repeat=max(1, args.repeat),
        seed=args.seed,
        shuffled=args.shuffled,
        orders_file=args.orders_file,
        grid_file=args.grid,
        keep_memory=not args.default_allocator,
    )
