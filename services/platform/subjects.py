"""Every NATS subject and JetStream stream of p2pgrid, in one place, coarse to fine.

Subjects read `p2pgrid.<area>.<kind>[.<key>]`. Events that must not be lost
travel on JetStream streams (file storage; the server runs with
`sync_interval: always`); quick queries use core NATS request-reply.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "p2pgrid"


@dataclass(frozen=True, slots=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    description: str
    # Repeats of a Nats-Msg-Id inside this window are dropped by the server.
    duplicate_window_s: float = 3600.0
    max_age_s: float = 7 * 24 * 3600.0


# Order book events: placed, amended, cancelled.
ORDER_EVENTS = f"{PREFIX}.orders.events"
# Clearing requests at gate closure; the key is the interval start in Unix seconds.
CLEARING_REQUEST = f"{PREFIX}.clearing.request"
# Clearing results, one per interval.
CLEARING_RESULT = f"{PREFIX}.clearing.result"
# Batches of validated meter readings.
METER_READINGS = f"{PREFIX}.metering.readings"
# Per-interval import and export energy of every meter.
INTERVAL_ENERGY = f"{PREFIX}.metering.energy"
# grid_check's verdict on each clearing result, and live line loading.
GRID_VERDICT = f"{PREFIX}.grid.verdict"
GRID_LOADING = f"{PREFIX}.grid.loading"
# The ledger's signed checkpoints and settlement notices.
LEDGER_CHECKPOINT = f"{PREFIX}.ledger.checkpoint"
LEDGER_SETTLED = f"{PREFIX}.ledger.settled"
# Core NATS request-reply: line limits for an interval (answered by grid_check).
GRID_LIMITS_REQUEST = f"{PREFIX}.grid.limits"

# Test streams for the platform's own exactly-once checks.
PLATFORM_TEST = f"{PREFIX}.platform.test"

STREAMS: tuple[StreamSpec, ...] = (
    StreamSpec("ORDERS", (f"{ORDER_EVENTS}.>",), "order book events"),
    StreamSpec(
        "CLEARING", (f"{CLEARING_REQUEST}.>", f"{CLEARING_RESULT}.>"), "clearing requests and results"
    ),
    StreamSpec(
        "METERING", (f"{METER_READINGS}.>", f"{INTERVAL_ENERGY}.>"), "meter readings and interval energy"
    ),
    StreamSpec("GRID", (f"{GRID_VERDICT}.>", f"{GRID_LOADING}.>"), "grid verdicts and live loading"),
    StreamSpec(
        "LEDGER", (f"{LEDGER_CHECKPOINT}.>", f"{LEDGER_SETTLED}.>"), "ledger checkpoints and settlements"
    ),
    StreamSpec("PLATFORM", (f"{PLATFORM_TEST}.>",), "platform self-tests"),
)


def keyed(subject: str, *keys: str | int) -> str:
    """A concrete subject: `keyed(CLEARING_RESULT, 1767225600)` → `p2pgrid.clearing.result.1767225600`."""
    for key in keys:
        text = str(key)
        if not text or any(c in text for c in " .*>\t\r\n"):
            raise ValueError(
                f"subject key {text!r} must be a non-empty token without spaces, dots or wildcards"
            )
    return ".".join((subject, *map(str, keys)))


def stream_for(subject: str) -> StreamSpec:
    for spec in STREAMS:
        for pattern in spec.subjects:
            if subject.startswith(pattern.removesuffix(">")):
                return spec
    raise KeyError(f"no stream carries {subject!r}")
