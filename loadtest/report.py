"""The load test report: one JSON document, and a markdown rendering of the same numbers.

The markdown is rendered from the JSON document alone, so both always say
the same; README.md in this folder explains every field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

JSON_NAME = "loadtest-report.json"
MARKDOWN_NAME = "loadtest-report.md"
RPC_ORDER = ("RegisterParticipant", "PlaceOrder", "AmendOrder", "PushReadings")


def iso(t_s: float) -> str:
    return datetime.fromtimestamp(t_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_report(report_dir: Path, report: Mapping[str, Any]) -> tuple[Path, Path]:
    report_dir.mkdir(parents=True, exist_ok=True)
    json_path = report_dir / JSON_NAME
    markdown_path = report_dir / MARKDOWN_NAME
    json_path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    markdown_path.write_text(render_markdown(report))
    return json_path, markdown_path


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        # Up to 15 significant digits: every figure as the JSON has it (`:g` would round 108687.8 to 108688).
        return f"{value:.15g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.6f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]], align: str = "") -> list[str]:
    """A markdown table; `align` has one letter per column, l or r (default: the first left, the rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return lines


def _rpc_names(names: Mapping[str, Any]) -> list[str]:
    return [name for name in RPC_ORDER if name in names] + sorted(set(names) - set(RPC_ORDER))


def render_markdown(report: Mapping[str, Any]) -> str:
    run, config, orders, readings = report["run"], report["config"], report["orders"], report["readings"]
    stack = report["stack"]
    out = [f"# p2pgrid load test: {config['scenario']}", ""]
    out.append(f"{report['scenario_description']}.")
    out.append("")
    load = (
        f"{run['load_s']} s of load from {run['started_at']}, then {run['drain_s']} s of drain; "
        f"{config['prosumers']} traders"
    )
    if config["scenario"] != "meter-flood":
        load += f" asked for {config['rate_per_s']} order actions/s"
    load += f", {readings['meters']} push meters on {readings['gateways']} gateways."
    out.append(load)
    out.append(f"Stack: {stack['description']}.")
    out.append(f"Outcome: {report['outcome']}.")
    out += ["", "## Throughput", ""]
    rows: list[list[Any]] = [
        ["orders acknowledged", orders["acknowledged"], orders["acknowledged_per_s"]],
        ["orders placed", orders["placed"], None],
        ["orders amended", orders["amended"], None],
        ["readings accepted", readings["accepted"], readings["accepted_per_s"]],
        ["readings rejected", readings["rejected"], None],
        ["readings sent", readings["sent"], None],
        ["readings in failed calls", readings["in_failed_calls"], None],
        ["order actions skipped (every trader busy)", orders["actions_skipped"], None],
        ["orders with unknown outcome", orders["unknown_outcome"], None],
        ["acknowledged orders missing from their clearing request", orders["lost"], None],
    ]
    out += _table(["what", "count", "per second"], rows)
    out.append("")
    checked = (
        f"Clearing requests checked against the acknowledged orders: {orders['intervals_checked']} of "
        f"{orders['intervals_traded']} traded intervals"
    )
    if orders["intervals_checked"] < orders["intervals_traded"]:
        checked += " (the others had not reached their gate closure by the end of the drain)"
    out.append(checked + ".")
    out += ["", "## Latency per RPC (successful calls)", ""]
    latency = report["latency_ms"]
    rows = [
        [name, s["count"], s.get("p50_ms"), s.get("p95_ms"), s.get("p99_ms"), s.get("max_ms")]
        for name, s in ((n, latency[n]) for n in _rpc_names(latency))
    ]
    out += _table(["RPC", "calls", "p50 ms", "p95 ms", "p99 ms", "max ms"], rows)
    out += ["", "## Errors by status code", ""]
    errors = report["errors"]
    if errors:
        examples = report["error_examples"]
        rows = [
            [name, code, count, (examples.get(f"{name} {code}") or [""])[0]]
            for name in _rpc_names(errors)
            for code, count in sorted(errors[name].items())
        ]
        out += _table(["RPC", "status", "count", "example"], rows, align="llrl")
    else:
        out.append("None.")
    if readings["rejections"]:
        out += ["", "Readings rejected, by reason (from the push summaries' first errors):", ""]
        out += _table(["reason", "count"], [[k, v] for k, v in sorted(readings["rejections"].items())])
    out += ["", "## Clearing and settlement", ""]
    summary_rows = []
    for label, key in (
        ("solver time (ms)", "solver_ms"),
        ("gate closure to clearing result (wall s)", "gate_to_result_wall_s"),
        ("settlement lag after interval end (market s)", "settlement_lag_sim_s"),
        ("settlement lag after interval end (wall s)", "settlement_lag_wall_s"),
    ):
        s = report["clearing"][key] if key in report["clearing"] else report["settlement"][key]
        summary_rows.append([label, s["count"], s.get("p50"), s.get("p95"), s.get("max"), s.get("mean")])
    out += _table(["measure", "intervals", "p50", "p95", "max", "mean"], summary_rows)
    out.append("")
    out.append(
        f"Intervals seen: {len(report['intervals'])} ({orders['intervals_traded']} traded by this run); "
        f"cleared: {report['clearing']['intervals_cleared']}; settled: {report['settlement']['intervals_settled']}. "
        "Solver time is the matcher's own (SolverStats.clear_s); gate closure to result runs from the gate "
        "to the moment the result arrived on the CLEARING stream; settlement lag from the interval's end to "
        "the ledger's first IntervalSettled notice."
    )
    if report["earlier_intervals_reported"]:
        out.append(
            f"Left out: notices about {report['earlier_intervals_reported']} intervals whose gate closed before "
            "the load began."
        )
    out += ["", "### Per interval", ""]
    rows = [
        [
            i["interval"],
            i["orders_live_acknowledged"],
            i["request_orders_of_run"],
            i["request_orders"],
            i["missing"],
            i["solver_ms"],
            i["gate_to_result_wall_s"],
            i["traded_kwh"],
            i["settlement_lag_sim_s"],
            i["settlement_lag_wall_s"],
        ]
        for i in report["intervals"]
    ]
    out += _table(
        [
            "interval",
            "live acked",
            "in request (run)",
            "in request (all)",
            "missing",
            "solver ms",
            "gate→result s",
            "traded kWh",
            "settled after (market s)",
            "settled after (wall s)",
        ],
        rows,
    )
    out += ["", "## Throughput over time", ""]
    out += _table(
        ["from s", "orders/s", "readings/s"],
        [[r["from_s"], r["orders_per_s"], r["readings_per_s"]] for r in report["timeline"]],
    )
    out += ["", "## Stack", ""]
    out += [f"- {line}" for line in stack["settings"]]
    for event in stack["events"]:
        out.append(f"- event: {event}")
    if stack.get("exit_codes"):
        codes = ", ".join(f"{name} {code}" for name, code in stack["exit_codes"].items())
        out.append(f"- exit codes: {codes}")
    out.append("")
    return "\n".join(out)
