"""Interval energy out, exactly once: released intervals go to the outbox with the meter state that released them.

Every `tick_s` (wall clock) the publisher asks each meter's pipeline for the
intervals that ended at least `metering_delay_s` ago (service clock) and that
every counter has reported (`MeterEnergyPipeline.release`). Those become
IntervalEnergy events, one or more per interval (meters sorted by id,
`per_message` each); they are written to the outbox in the same transaction
as the released meters' state, and the outbox relay publishes them with
their event id as `Nats-Msg-Id`. Meters that report an interval later (an
offline meter that comes back) follow in later events of the same interval.
Every `checkpoint_s` the state of every meter that took readings is saved as
well, so that little is missing after a crash (see `state_store.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict

from services.domain.intervals import Clock, Interval
from services.meter_ingest.adapters.convert import interval_energy_messages
from services.meter_ingest.adapters.ingest import Ingestor
from services.meter_ingest.adapters.state_store import MeterStateStore
from services.meter_ingest.domain.interval_energy import MeterIntervalEnergy
from services.meter_ingest.domain.meter_config import MeterConfig
from services.platform.metrics import Metrics
from services.platform.outbox import OutboxRelay

log = logging.getLogger(__name__)

# Wall seconds between scans for meters that completed an interval after its boundary passed.
LATE_SCAN_S = 1.0


class EnergyPublisher:
    """Releases complete intervals and saves meter state; the outbox relay does the publishing."""

    def __init__(
        self,
        ingestor: Ingestor,
        store: MeterStateStore,
        relay: OutboxRelay,
        clock: Clock,
        metrics: Metrics,
        *,
        metering_delay_s: float,
        per_message: int,
        checkpoint_s: float,
        producer: str,
        tick_s: float = 0.2,
    ) -> None:
        self.ingestor = ingestor
        self.store = store
        self.relay = relay
        self.clock = clock
        self.metering_delay_s = metering_delay_s
        self.per_message = per_message
        self.checkpoint_s = checkpoint_s
        self.producer = producer
        self.tick_s = tick_s
        self._published = metrics.counter("p2pgrid_interval_energy_published_total")
        self._last_checkpoint = time.monotonic()
        self._scanned_boundary: int | None = None
        self._scanned_at = 0.0

    async def tick(self, *, checkpoint: bool = False) -> int:
        """Release what is due and save state when due; returns how many meter intervals were released."""
        cutoff_s = self.clock.now_s() - self.metering_delay_s
        boundary = int(cutoff_s // self.ingestor.interval_s)
        # Every meter is asked when the cutoff passes a boundary; meters that report late are found by the
        # scan every `LATE_SCAN_S`, so thousands of meters are not walked five times a second for nothing.
        released: list[tuple[MeterIntervalEnergy, MeterConfig]] = []
        if (
            checkpoint
            or boundary != self._scanned_boundary
            or time.monotonic() - self._scanned_at >= LATE_SCAN_S
        ):
            released = self.ingestor.release(cutoff_s)
            self._scanned_boundary = boundary
            self._scanned_at = time.monotonic()
        due = checkpoint or time.monotonic() - self._last_checkpoint >= self.checkpoint_s
        if not released and not due:
            return 0
        by_interval: dict[Interval, list[tuple[MeterIntervalEnergy, MeterConfig]]] = defaultdict(list)
        for energy, config in released:
            by_interval[energy.interval].append((energy, config))
        emitted_at_ms = int(time.time() * 1000)
        events = [
            message
            for interval in sorted(by_interval)
            for message in interval_energy_messages(
                interval,
                by_interval[interval],
                producer=self.producer,
                emitted_at_ms=emitted_at_ms,
                per_message=self.per_message,
            )
        ]
        meter_ids = {energy.meter_id for energy, _ in released}
        if due:
            meter_ids |= self.ingestor.take_dirty()
            self._last_checkpoint = time.monotonic()
        # The snapshot is taken here, on the event loop, so it matches the released intervals exactly.
        states = self.ingestor.snapshots(sorted(meter_ids))
        await asyncio.to_thread(self.store.save, states, self.ingestor.interval_s, events)
        if events:
            self.relay.notify()
            for energy, _config in released:
                self._published.labels(flag=energy.quality.label).inc()
            log.info(
                "interval energy released",
                extra={
                    "meter_intervals": len(released),
                    "events": len(events),
                    "intervals": len(by_interval),
                },
            )
        return len(released)

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until `stop`, then save every changed meter once more."""
        while not stop.is_set():
            await self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.tick_s)
        await self.tick(checkpoint=True)
