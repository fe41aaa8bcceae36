"""Short real load runs whose reports must match what the system holds, and the command's answers to bad input.

The steady run goes through the command as a user runs it: it starts its own
stack, trades for a few intervals (240x, so an interval is under 4 wall
seconds) and stops the stack; the test then reads the stack's NATS store and
order book database back and compares them with the report. The meter flood
runs against a stack the test started, as against any running stack, and
the readings on the METERING stream must be exactly those the report counts.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from loadtest_checks import (
    assert_latencies_are_ordered_and_positive,
    assert_markdown_agrees_with_json,
    load_report,
    stream_messages,
)

from loadtest.traders import trader_key
from services.cli import main
from services.domain.intervals import Interval
from services.gen.p2pgrid.events.v1 import events_pb2
from services.platform.nats_server import NatsServer
from services.platform.subjects import CLEARING_REQUEST, CLEARING_RESULT, METER_READINGS
from services.stack.supervisor import Stack, StackConfig

GRID = Path(__file__).resolve().parents[3] / "deploy" / "grids" / "lv_feeder.yaml"
SPEEDUP = 240.0
PROSUMERS = 8


def readings_on_stream(nats_url: str) -> int:
    return sum(
        len(events_pb2.ReadingsBatch.FromString(data).readings)
        for _, data in stream_messages(nats_url, "METERING", f"{METER_READINGS}.push")
    )


@pytest.mark.slow
def test_a_steady_run_reports_exactly_the_orders_and_readings_the_system_took(tmp_path: Path) -> None:
    workdir, report_dir = tmp_path / "stack", tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "loadtest", "--scenario", "steady", "--duration", "10",
         "--speedup", str(SPEEDUP), "--prosumers", str(PROSUMERS), "--rate", "60", "--drain", "10",
         "--workdir", str(workdir), "--report-dir", str(report_dir)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"report {report_dir / 'loadtest-report.md'}" in result.stdout
    assert "[    5 s load]" in result.stdout  # progress while it runs
    report, markdown = load_report(report_dir)
    orders = report["orders"]
    assert orders["acknowledged"] > 100 and orders["unknown_outcome"] == 0 and orders["lost"] == 0
    assert orders["placed"] > 0 and orders["amended"] > 0
    assert orders["intervals_checked"] == orders["intervals_traded"] >= 3
    assert report["stack"]["exit_codes"] == dict.fromkeys(report["stack"]["exit_codes"], 0)

    ours = {trader_key(1, i).participant_id for i in range(PROSUMERS)}
    rows = {row["start_s"]: row for row in report["intervals"]}
    assert sum(r["orders_placed"] + r["orders_amended"] for r in rows.values()) == orders["acknowledged"]

    # The order book's database holds one order per acknowledged place or amend (an amend stores the
    # replacement and keeps the cancelled order).
    held: Counter[int] = Counter()
    with sqlite3.connect(workdir / "db" / "order_book.db") as db:
        for participant_id, start_s, count in db.execute(
            "select participant_id, interval_start_s, count(*) from ob_orders group by 1, 2"
        ):
            if participant_id in ours:
                held[start_s] += count
    assert held == Counter(
        {s: r["orders_placed"] + r["orders_amended"] for s, r in rows.items() if r["traded"]}
    )

    # The stream, read back after the stack stopped, holds the clearing request of every traded interval:
    # exactly the acknowledged orders that were still live, none missing and none more.
    with NatsServer(store_dir=workdir / "nats") as nats_server:
        requests = {
            int(subject.rsplit(".", 1)[1]): events_pb2.ClearingRequest.FromString(data)
            for subject, data in stream_messages(nats_server.url, "CLEARING", f"{CLEARING_REQUEST}.>")
        }
        results = {
            int(subject.rsplit(".", 1)[1]): events_pb2.ClearingResultEvent.FromString(data).result
            for subject, data in stream_messages(nats_server.url, "CLEARING", f"{CLEARING_RESULT}.>")
        }
        readings = readings_on_stream(nats_server.url)
    for start_s, row in rows.items():
        if not row["traded"]:
            continue
        in_request = sum(1 for order in requests[start_s].orders if order.participant_id in ours)
        assert in_request == row["orders_live_acknowledged"] == row["request_orders_of_run"], Interval(
            start_s
        ).iso()
        assert row["missing"] == 0
        if row["cleared"]:
            assert row["solver_ms"] == round(results[start_s].stats.clear_s * 1000, 3)
            assert row["gate_to_result_wall_s"] > 0
    assert report["clearing"]["intervals_cleared"] >= 3

    # Every reading the push summaries accepted is on the stream, and nothing else was pushed.
    assert report["readings"]["accepted"] == readings > 0
    assert report["readings"]["rejected"] == 0
    settled = [row for row in rows.values() if row["settled"]]
    assert settled and all(row["settlement_lag_wall_s"] > 0 for row in settled)
    assert_latencies_are_ordered_and_positive(report)
    assert {"RegisterParticipant", "PlaceOrder", "AmendOrder", "PushReadings"} <= set(report["latency_ms"])
    assert_markdown_agrees_with_json(report, markdown)


@pytest.fixture
def running_stack(tmp_path: Path) -> Iterator[tuple[Stack, Path]]:
    """A stack whose meter_ingest reads the meters file the meter flood below expects."""
    meters_path = tmp_path / "meters.yaml"
    assert main(["loadtest", "--write-meters-file", str(meters_path), *FLOOD_METERS]) == 0
    sim_start_s = float(Interval.containing(time.time()).start_s)
    stack = Stack(
        StackConfig(
            workdir=tmp_path / "stack",
            sim_start_s=sim_start_s,
            speedup=SPEEDUP,
            grid_path=str(GRID),
            meters_path=str(meters_path),
            # At 240x the built-in 30 market seconds of clock skew are an eighth of a wall second.
            extra_env={"meter_ingest": {"P2PGRID_METER_INGEST_MAX_CLOCK_SKEW_S": "1200"}},
        )
    )
    try:
        stack.start()
        yield stack, meters_path
    finally:
        stack.stop()


FLOOD_METERS = ["--scenario", "meter-flood", "--meters", "300", "--gateways", "3", "--prosumers", "6"]


@pytest.mark.slow
def test_a_meter_flood_against_a_running_stack_counts_the_readings_the_stream_holds(
    running_stack: tuple[Stack, Path], tmp_path: Path
) -> None:
    stack, _ = running_stack
    report_dir = tmp_path / "report"
    code = main(
        ["loadtest", *FLOOD_METERS, "--duration", "6", "--report-dir", str(report_dir),
         "--nats-url", stack.nats.url,
         "--order-book", f"127.0.0.1:{stack.services['order_book'].grpc_port}",
         "--meter-ingest", f"127.0.0.1:{stack.services['meter_ingest'].grpc_port}",
         "--speedup", str(SPEEDUP), "--sim-start-s", str(stack.config.sim_start_s),
         "--sim-anchor-wall-s", str(stack.anchor_wall_s)]
    )  # fmt: skip
    assert code == 0
    report, markdown = load_report(report_dir)
    readings = report["readings"]
    assert readings["meters"] == 300 and readings["gateways"] == 3
    assert readings["accepted"] > 0 and readings["rejected"] == 0 and readings["in_failed_calls"] == 0
    assert readings["sent"] == readings["accepted"]
    # Accepted means acknowledged by the stream: all of them are there already.
    assert readings_on_stream(stack.nats.url) == readings["accepted"]
    assert report["orders"]["acknowledged"] == 0 and report["errors"] == {}
    assert report["stack"]["description"].startswith("external")
    assert_latencies_are_ordered_and_positive(report)
    assert set(report["latency_ms"]) == {"PushReadings"}
    assert_markdown_agrees_with_json(report, markdown)
