"""What a load run records: latency per RPC, errors by status code, and what the system accepted over time."""

from __future__ import annotations

import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

# Width of one bucket of the throughput timeline, in wall seconds.
TIMELINE_BUCKET_S = 5.0
# How many error texts are kept per (RPC, status code), as examples for the report.
ERROR_EXAMPLES = 3


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending sequence (the smallest value with `fraction` of them at or below it)."""
    if not ordered:
        raise ValueError("no values")
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def summarize_ms(latencies_s: Sequence[float]) -> dict[str, float | int]:
    """Count, p50, p95, p99 and max of latencies given in seconds, in milliseconds rounded to 0.01 ms."""
    ordered = sorted(latencies_s)
    if not ordered:
        return {"count": 0}
    return {
        "count": len(ordered),
        "p50_ms": round(percentile(ordered, 0.50) * 1000, 2),
        "p95_ms": round(percentile(ordered, 0.95) * 1000, 2),
        "p99_ms": round(percentile(ordered, 0.99) * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


def summarize(values: Sequence[float], digits: int = 3) -> dict[str, float | int]:
    """Count, p50, p95, max and mean of plain values (seconds), rounded."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0}
    return {
        "count": len(ordered),
        "p50": round(percentile(ordered, 0.50), digits),
        "p95": round(percentile(ordered, 0.95), digits),
        "max": round(ordered[-1], digits),
        "mean": round(sum(ordered) / len(ordered), digits),
    }


def rejection_reason(text: str) -> str:
    """A push summary's error text without the reading's index, ids and numbers, so that equal rules add up."""
    text = re.sub(r"^readings\[\d+\]", "readings[i]", text)
    text = re.sub(r"'[^']*'", "'…'", text)
    return re.sub(r"-?\d+(\.\d+)?", "N", text)


@dataclass
class Recorder:
    """Every call's latency and outcome, and accepted orders and readings per timeline bucket.

    Times are wall-clock `time.monotonic()` seconds; `started_s` is when the load began.
    """

    started_s: float = field(default_factory=time.monotonic)
    latencies_s: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    error_examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    orders_placed: int = 0
    orders_amended: int = 0
    # Orders whose last attempt failed in a way that leaves open whether the book stored them.
    orders_unknown: int = 0
    # Order actions the schedule asked for while every trader was still busy with its previous call.
    actions_skipped: int = 0
    readings_sent: int = 0
    readings_accepted: int = 0
    readings_rejected: int = 0
    # Readings of push calls that failed: how many of them the service took is not known.
    readings_in_failed_calls: int = 0
    reading_errors: Counter[str] = field(default_factory=Counter)
    _orders_timeline: Counter[int] = field(default_factory=Counter)
    _readings_timeline: Counter[int] = field(default_factory=Counter)

    def call(self, rpc: str, latency_s: float) -> None:
        self.latencies_s[rpc].append(latency_s)

    def error(self, rpc: str, code: str, details: str) -> None:
        self.errors[rpc][code] += 1
        examples = self.error_examples[f"{rpc} {code}"]
        if len(examples) < ERROR_EXAMPLES:
            examples.append(details[:300])

    def _bucket(self) -> int:
        return int((time.monotonic() - self.started_s) // TIMELINE_BUCKET_S)

    def order_acknowledged(self, amend: bool) -> None:
        if amend:
            self.orders_amended += 1
        else:
            self.orders_placed += 1
        self._orders_timeline[self._bucket()] += 1

    def readings_summary(self, accepted: int, rejected: int, errors: Sequence[str]) -> None:
        self.readings_accepted += accepted
        self.readings_rejected += rejected
        for text in errors:
            self.reading_errors[rejection_reason(text)] += 1
        self._readings_timeline[self._bucket()] += accepted

    @property
    def orders_acknowledged(self) -> int:
        return self.orders_placed + self.orders_amended

    def error_count(self) -> int:
        return sum(sum(codes.values()) for codes in self.errors.values())

    def timeline(self, until_s: float) -> list[dict[str, float]]:
        """Accepted orders and readings per second in each bucket from the start to `until_s` (monotonic)."""
        # A last bucket shorter than a twentieth of the width is left out: its rates would mean little.
        buckets = max(1, math.ceil((until_s - self.started_s) / TIMELINE_BUCKET_S - 0.05))
        rows = []
        for index in range(buckets):
            start_s = index * TIMELINE_BUCKET_S
            width_s = min(TIMELINE_BUCKET_S, max(until_s - self.started_s - start_s, 1e-9))
            rows.append(
                {
                    "from_s": start_s,
                    "orders_per_s": round(self._orders_timeline[index] / width_s, 1),
                    "readings_per_s": round(self._readings_timeline[index] / width_s, 1),
                }
            )
        return rows
