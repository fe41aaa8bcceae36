"""The `p2pgrid grid` commands: import public networks into the grid YAML form and compute flows for injections."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_VIOLATIONS = 1
EXIT_BAD_INPUT = 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `grid import` and `grid flows` to the `p2pgrid` command."""
    grid = subparsers.add_parser("grid", help="network tools: import networks, compute flows")
    grid.set_defaults(func=lambda _args: _print_help(grid))
    commands = grid.add_subparsers(title="grid commands", metavar="COMMAND")

    importer = commands.add_parser(
        "import",
        help="convert a MATPOWER case (.m) or a pandapower JSON network into the grid YAML form",
        description=(
            "Convert a network into the grid YAML form. Buses become nodes, branches lines, "
            "two-winding transformers lines flagged `transformer: true`, the reference bus the "
            "slack. Reactances are per unit on the network's MVA base (times the tap ratio). "
            "Unrated branches (MATPOWER rateA = 0) get --unrated-capacity-mw."
        ),
    )
    importer.add_argument("--from", dest="source_format", required=True, choices=("matpower", "pandapower"))
    importer.add_argument("file", type=Path, metavar="FILE", help="the .m case file or the pandapower .json")
    importer.add_argument(
        "--out", type=Path, required=True, metavar="GRID.yaml", help="where to write the grid"
    )
    importer.add_argument(
        "--unrated-capacity-mw",
        type=float,
        default=9900.0,
        help="capacity given to branches without a rating (default: 9900 MW, as pandapower does)",
    )
    importer.add_argument(
        "--slack", default=None, help="node id of the slack when the source has none or several"
    )
    importer.add_argument(
        "--interval-minutes", type=int, default=15, help="interval length written to the file"
    )
    importer.add_argument(
        "--price-tick-micro-per-kwh", type=int, default=100, help="market price tick written to the file"
    )
    importer.set_defaults(func=_run_import)

    flows = commands.add_parser(
        "flows",
        help="DC flows, loading and violations for injections per node",
        description=(
            "Read injections per node (CSV with header node_id,injection_w; whole watts, positive into "
            "the grid) and print JSON {lines: [{line_id, flow_w, loading_pct}], violations: [...]}, "
            "flow positive from the line's `from` node to its `to` node. Injections must sum to zero "
            "within 1 W unless --slack-balances lets the slack node take the rest."
        ),
    )
    flows.add_argument("--grid", type=Path, required=True, metavar="GRID.yaml")
    flows.add_argument("--injections", type=Path, required=True, metavar="INJ.csv")
    flows.add_argument("--slack-balances", action="store_true", help="the slack node takes the imbalance")
    flows.add_argument(
        "--limits",
        type=Path,
        default=None,
        metavar="LIMITS.yaml",
        help="time-varying line limits (a YAML list of {line_id, start_s, until_s, capacity_w, reason})",
    )
    flows.add_argument(
        "--interval-start-s",
        type=int,
        default=None,
        help="Unix start of the interval whose limits apply (with --limits)",
    )
    flows.add_argument(
        "--fail-on-violation", action="store_true", help="exit with status 1 when a line is overloaded"
    )
    flows.set_defaults(func=_run_flows)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return EXIT_BAD_INPUT


def _fail(message: str) -> int:
    print(f"p2pgrid grid: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _run_import(args: argparse.Namespace) -> int:
    from services.grid_check.domain.gridfile import GridFileError, dump_grid_yaml, grid_dict_checked
    from services.grid_check.domain.importers import (
        ImportOptions,
        NetworkImportError,
        import_matpower,
        import_pandapower,
    )

    try:
        options = ImportOptions(
            unrated_capacity_w=round(args.unrated_capacity_mw * 1_000_000),
            interval_minutes=args.interval_minutes,
            price_tick_micro_per_kwh=args.price_tick_micro_per_kwh,
            slack=args.slack,
        )
        reader = import_matpower if args.source_format == "matpower" else import_pandapower
        imported = reader(args.file, options)
        checked = grid_dict_checked(imported.grid)
    except (NetworkImportError, GridFileError, ValueError) as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"{args.file}: {exc.strerror or exc}")
    header = [
        f"Converted from {args.file.name} ({args.source_format}) by `p2pgrid grid import`.",
        *imported.notes,
    ]
    try:
        args.out.write_text(dump_grid_yaml(checked, header=header), encoding="utf-8")
    except OSError as exc:
        return _fail(f"{args.out}: {exc.strerror or exc}")
    summary = {
        "out": str(args.out),
        "nodes": len(checked["nodes"]),
        "lines": len(checked["lines"]),
        "transformers": sum(1 for line in checked["lines"] if line.get("transformer")),
        "slack": checked["slack"],
        "notes": list(imported.notes),
    }
    print(json.dumps(summary))
    return EXIT_OK


def _run_flows(args: argparse.Namespace) -> int:
    from services.domain.errors import InvalidArgument
    from services.grid_check.domain.checks import check_schedule
    from services.grid_check.domain.gridfile import GridFileError, load_flow_model, load_limits_yaml
    from services.grid_check.domain.injections import parse_injections_csv
    from services.grid_check.domain.limits import effective_limits

    try:
        model = load_flow_model(args.grid)
    except (GridFileError, ValueError) as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"{args.grid}: {exc.strerror or exc}")
    limits = None
    if args.limits is not None:
        if args.interval_start_s is None:
            return _fail("--limits needs --interval-start-s (the interval whose limits apply)")
        try:
            schedule = load_limits_yaml(args.limits, ratings_w=model.ratings_w)
        except (GridFileError, ValueError) as exc:
            return _fail(f"{args.limits}: {exc}")
        except OSError as exc:
            return _fail(f"{args.limits}: {exc.strerror or exc}")
        limits = effective_limits(model.ratings_w, schedule, args.interval_start_s)
    try:
        text = args.injections.read_text(encoding="utf-8")
    except OSError as exc:
        return _fail(f"{args.injections}: {exc.strerror or exc}")
    except UnicodeDecodeError:
        return _fail(f"{args.injections}: not UTF-8 text")
    try:
        injections = parse_injections_csv(text, is_node=model.has_node)
        result = check_schedule(model, injections, limits, slack_balances=args.slack_balances)
    except InvalidArgument as exc:
        return _fail(f"{args.injections}: {exc}")
    output: dict[str, Any] = result.as_dict()
    print(json.dumps(output))
    if args.fail_on_violation and result.violations:
        return EXIT_VIOLATIONS
    return EXIT_OK
