"""What the load test tests share: reading a stream back, and checking a report against itself and the system."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import nats
from nats.errors import TimeoutError as NatsTimeoutError

from loadtest.report import JSON_NAME, MARKDOWN_NAME


def stream_messages(nats_url: str, stream: str, subject: str) -> list[tuple[str, bytes]]:
    """Every message of `stream` on `subject` (wildcards allowed), oldest first."""

    async def read() -> list[tuple[str, bytes]]:
        client = await nats.connect(nats_url)
        try:
            js = client.jetstream()
            subscription = await js.pull_subscribe(subject, stream=stream)
            out: list[tuple[str, bytes]] = []
            while True:
                try:
                    messages = await subscription.fetch(1000, timeout=1.0)
                except (NatsTimeoutError, TimeoutError):
                    return out
                for message in messages:
                    out.append((message.subject, message.data))
                    await message.ack()
        finally:
            await client.close()

    return asyncio.run(read())


def load_report(report_dir: Path) -> tuple[dict[str, Any], str]:
    return json.loads((report_dir / JSON_NAME).read_text()), (report_dir / MARKDOWN_NAME).read_text()


def markdown_table(markdown: str, heading: str) -> list[list[str]]:
    """The rows (cells as text) of the first table after `heading`."""
    lines = markdown.splitlines()
    start = lines.index(heading)
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # without the header and the alignment row


def number(cell: str) -> float | None:
    return None if cell == "-" else float(cell)


def assert_latencies_are_ordered_and_positive(report: dict[str, Any]) -> None:
    for rpc, summary in report["latency_ms"].items():
        assert summary["count"] > 0, rpc
        assert 0 < summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"] <= summary["max_ms"], (
            rpc,
            summary,
        )


def assert_markdown_agrees_with_json(report: dict[str, Any], markdown: str) -> None:
    orders, readings = report["orders"], report["readings"]
    throughput = {row[0]: row for row in markdown_table(markdown, "## Throughput")}
    expected = {
        "orders acknowledged": (orders["acknowledged"], orders["acknowledged_per_s"]),
        "orders placed": (orders["placed"], None),
        "orders amended": (orders["amended"], None),
        "readings accepted": (readings["accepted"], readings["accepted_per_s"]),
        "readings rejected": (readings["rejected"], None),
        "orders with unknown outcome": (orders["unknown_outcome"], None),
        "acknowledged orders missing from their clearing request": (orders["lost"], None),
    }
    for label, (count, per_s) in expected.items():
        assert number(throughput[label][1]) == count, label
        assert number(throughput[label][2]) == per_s, label
    latency = {row[0]: row for row in markdown_table(markdown, "## Latency per RPC (successful calls)")}
    assert set(latency) == set(report["latency_ms"])
    for rpc, summary in report["latency_ms"].items():
        cells = [number(cell) for cell in latency[rpc][1:]]
        assert cells == [summary[k] for k in ("count", "p50_ms", "p95_ms", "p99_ms", "max_ms")], rpc
    per_interval = markdown_table(markdown, "### Per interval")
    assert [row[0] for row in per_interval] == [i["interval"] for i in report["intervals"]]
    for row, interval in zip(per_interval, report["intervals"], strict=True):
        assert number(row[1]) == interval["orders_live_acknowledged"]
        assert number(row[4]) == interval["missing"]
        assert number(row[5]) == interval["solver_ms"]
    errors = sum(sum(codes.values()) for codes in report["errors"].values())
    if errors:
        rows = markdown_table(markdown, "## Errors by status code")
        assert sum(int(row[2]) for row in rows) == errors
    else:
        assert re.search(r"## Errors by status code\n\nNone\.", markdown)
