"""The `p2pgrid` command: one entry point whose subcommands each area contributes.

Each area that offers commands has a module `services/<area>/cli.py` with
`register(subparsers)` adding its top-level commands and, optionally,
`register_bench(bench_subparsers)` adding a `p2pgrid bench <name>` benchmark.
A command's handler is stored as `func` on the parsed arguments and returns
the process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

# The areas, in the order their commands appear in `p2pgrid --help`.
COMMAND_MODULES: tuple[str, ...] = (
    "services.stack.cli",
    "services.matcher.cli",
    "services.grid_check.cli",
    "services.order_book.cli",
    "services.meter_ingest.cli",
    "services.ledger.cli",
    "services.platform.cli",
    "loadtest.cli",
)


def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # An area without commands yet is simply absent; a missing dependency
        # inside an existing module is a real error and must surface.
        if exc.name is not None and name.startswith(exc.name):
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pgrid",
        description="p2pgrid: a peer-to-peer electricity market with grid-aware clearing and exact settlement.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    bench = commands.add_parser("bench", help="run a benchmark and print JSON lines")
    benches = bench.add_subparsers(title="benchmarks", metavar="BENCHMARK")
    bench.set_defaults(func=lambda _args: _print_help(bench))
    for name in COMMAND_MODULES:
        module = _load(name)
        if module is None:
            continue
        register: Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None] | None = getattr(
            module, "register", None
        )
        if register is not None:
            register(commands)
        register_bench = getattr(module, "register_bench", None)
        if register_bench is not None:
            register_bench(benches)
    registered = sorted(benches.choices)
    run_all = benches.add_parser("all", help="run every benchmark above with its defaults")
    run_all.set_defaults(func=lambda _args: _run_all_benchmarks(registered))
    parser.set_defaults(func=lambda _args: _print_help(parser))
    return parser


def _run_all_benchmarks(names: list[str]) -> int:
    worst = 0
    for name in names:
        print(f"# p2pgrid bench {name}", file=sys.stderr, flush=True)
        worst = max(worst, main(["bench", name]))
    return worst


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
