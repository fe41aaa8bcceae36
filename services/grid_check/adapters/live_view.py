"""The live view on NATS and Prometheus: metered power in, line loading and node injections out.

Readings come from the METERING stream (subjects `p2pgrid.metering.readings.>`)
through an ephemeral ordered consumer that starts `stale_after_s` in the
past, so a restarted service sees the meters' latest power at once and never
replays older history that could no longer count. The view is live, not a
record: it keeps no state in the database and needs no exactly-once delivery.

Each meter is mapped to its node by the meter map (`--meters-path`);
readings of unmapped meters and invalid readings are ignored. Every
`--live-publish-interval-s` the state is recomputed, the loading and
injection gauges are set, and a `LiveLoading` event is published when the
state changed since the last one published. New readings wake the view at
once (a burst is taken in one update), so the gauges follow the meters within
a fraction of a second while events stay at most one per interval.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from services.domain.ids import new_id
from services.domain.intervals import Clock, Interval
from services.gen.p2pgrid.events.v1 import events_pb2
from services.gen.p2pgrid.meteringest.v1 import meter_ingest_pb2
from services.grid_check.adapters.convert import loading_to_proto, violation_to_proto
from services.grid_check.adapters.limit_store import LimitBook
from services.grid_check.domain.live import LiveMeters, LiveState, live_state
from services.grid_check.domain.network import FlowModel
from services.platform.metrics import Metrics
from services.platform.nats_bus import NatsBus
from services.platform.subjects import GRID_LOADING, METER_READINGS, keyed

log = logging.getLogger(__name__)

METERING_STREAM = "METERING"
SOURCE_LIVE = "live"
LIVE_SUBJECT = keyed(GRID_LOADING, "live")
MS_PER_S = 1000
# Readings arriving within this long of each other are taken in one update of the view.
UPDATE_COALESCE_S = 0.1


class LiveView:
    """The latest power of every mapped meter and what it means for the lines."""

    def __init__(
        self,
        *,
        model: FlowModel,
        meter_nodes: Mapping[str, str],
        book: LimitBook,
        clock: Clock,
        metrics: Metrics,
        bus: NatsBus,
        interval_s: int,
        stale_after_s: float,
        publish_interval_s: float,
        producer: str,
    ) -> None:
        self.model = model
        self.meter_nodes = dict(meter_nodes)
        self.book = book
        self.clock = clock
        self.bus = bus
        self.interval_s = interval_s
        self.stale_after_s = stale_after_s
        self.publish_interval_s = publish_interval_s
        self.producer = producer
        self.meters = LiveMeters(stale_after_s=stale_after_s)
        self._unmapped: set[str] = set()
        self._violating: set[str] = set()
        self._last_published: tuple[Any, ...] | None = None
        self._published_at = -math.inf
        self._readings_arrived = asyncio.Event()
        self._subscription: Any = None
        self._loading = metrics.gauge("p2pgrid_line_loading_percent")
        self._injection = metrics.gauge("p2pgrid_node_injection_w")
        self._violations = metrics.counter("p2pgrid_grid_violations_total")

    # Readings in.

    def on_readings(self, data: bytes) -> int:
        """Take one ReadingsBatch; returns how many readings moved the view."""
        try:
            batch = events_pb2.ReadingsBatch.FromString(data)
        except DecodeError:
            log.warning("unreadable readings batch ignored")
            return 0
        taken = 0
        for reading in batch.readings:
            if reading.quality == meter_ingest_pb2.QUALITY_INVALID:
                continue
            node_id = self.meter_nodes.get(reading.meter_id)
            if node_id is None:
                if reading.meter_id not in self._unmapped:
                    self._unmapped.add(reading.meter_id)
                    log.warning("readings of meter %s ignored: it is not in the meter map", reading.meter_id)
                continue
            if self.meters.update(
                meter_id=reading.meter_id,
                node_id=node_id,
                time_s=reading.time_ms / MS_PER_S,
                power_w=float(reading.power_w),
            ):
                taken += 1
        if taken:
            self._readings_arrived.set()
        return taken

    async def _on_message(self, msg: Msg) -> None:
        try:
            self.on_readings(msg.data)
        except Exception:
            log.exception("readings batch could not be applied")

    async def subscribe(self) -> None:
        start = datetime.fromtimestamp(time.time() - self.stale_after_s, UTC)
        self._subscription = await self.bus.js.subscribe(
            f"{METER_READINGS}.>",
            stream=METERING_STREAM,
            cb=self._on_message,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start),
        )

    async def unsubscribe(self) -> None:
        if self._subscription is not None:
            try:
                await self._subscription.unsubscribe()
            except Exception:
                log.debug("readings subscription already gone")
            self._subscription = None

    # State out.

    def current(self) -> tuple[LiveState, int, int]:
        """The live state now, the interval whose limits it uses, and how many meters count."""
        now_s = self.clock.now_s()
        interval_start_s = Interval.containing(now_s, self.interval_s).start_s
        state = live_state(
            self.model,
            self.book.limits_for(interval_start_s),
            self.meters.power_by_node(now_s),
            as_of_s=now_s,
        )
        return state, interval_start_s, self.meters.fresh_meter_count(now_s)

    def _observe(self, state: LiveState) -> None:
        for line in state.lines:
            self._loading.labels(line=line.line_id).set(line.loading_pct)
        for node_id, injection_w in state.injections_w.items():
            self._injection.labels(node=node_id).set(injection_w)
        violating = {v.line_id for v in state.violations}
        for line_id in sorted(violating - self._violating):
            self._violations.labels(line=line_id, source=SOURCE_LIVE).inc()
            log.warning("live overload on line %s", line_id)
        self._violating = violating

    async def tick(self) -> bool:
        """Recompute and set the gauges; publish if the state changed and the last publish is old enough.

        Returns whether it published.
        """
        state, _interval_start_s, _fresh = self.current()
        self._observe(state)
        signature = (
            tuple((line.line_id, line.flow_w_rounded, line.capacity_w) for line in state.lines),
            tuple(v.message for v in state.violations),
        )
        if signature == self._last_published:
            return False
        if time.monotonic() - self._published_at < self.publish_interval_s:
            return False
        message = events_pb2.LiveLoading(
            header=events_pb2.EventHeader(
                event_id=f"grid-loading-{new_id()}",
                emitted_at_ms=int(time.time() * MS_PER_S),
                producer=self.producer,
            ),
            as_of_s=int(state.as_of_s),
            lines=[loading_to_proto(line) for line in state.lines],
            violations=[violation_to_proto(v) for v in state.violations],
        )
        await self.bus.publish(LIVE_SUBJECT, message.SerializeToString(), event_id=message.header.event_id)
        self._last_published = signature
        self._published_at = time.monotonic()
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Update soon after readings arrive and at least every publish interval, until `stop`.

        Readings arriving close together are taken in one update (`UPDATE_COALESCE_S`),
        so a burst of batches costs one recomputation; events go out at most once per
        publish interval. A failed publish is retried at the next update.
        """
        while not stop.is_set():
            self._readings_arrived.clear()
            try:
                await self.tick()
            except Exception:
                log.exception("live view update failed; retrying")
            waiters = [
                asyncio.ensure_future(stop.wait()),
                asyncio.ensure_future(self._readings_arrived.wait()),
            ]
            _done, pending = await asyncio.wait(
                waiters, timeout=self.publish_interval_s, return_when=asyncio.FIRST_COMPLETED
            )
            for waiter in pending:
                waiter.cancel()
            if not stop.is_set():
                await asyncio.sleep(min(UPDATE_COALESCE_S, self.publish_interval_s))
