"""Validation of meter readings (the V of VEE): what is usable, what is flagged, what is dropped.

Rules, per meter:
- A reading at or before the last one seen is a duplicate (or out of order) and is dropped.
- A reading whose meter clock differs from the receiving clock by more than
  `max_clock_skew_s` is flagged CLOCK_SKEW; its counters are not used for energy.
- A reading that comes more than `gap_s` after the last usable counter value is flagged GAP.
- Values outside the map's plausible range are flagged OUT_OF_RANGE (invalid).
- An energy counter never steps backwards: a value below the last accepted one is
  COUNTER_BACKWARDS (invalid) until an explicit `CounterReset` starts a new epoch,
  except a rollover the map declares. A rise faster than the meter's maximum power
  allows is COUNTER_JUMP (invalid). Neither moves the accepted state, so a counter
  that briefly reads 0 or garbage and then returns costs nothing.
Invalid values never become 0; accepted counters are exposed as monotone
`counter_wh` values per epoch for interval energy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from services.meter_ingest.domain.quantities import (
    ENERGY_COUNTERS,
    QUANTITIES,
    Kind,
    Quality,
    QuantityValue,
)
from services.meter_ingest.domain.readings import MeterReading, MeterStatus
from services.meter_ingest.domain.register_map import RegisterMap

SECONDS_PER_HOUR = 3600


@dataclass(frozen=True, slots=True)
class QuantityLimits:
    """What is plausible for one quantity of one meter."""

    range: tuple[float, float] | None = None
    max_rate_w: int | None = None
    rollover_wh: int | None = None


def limits_from_map(rmap: RegisterMap) -> dict[str, QuantityLimits]:
    """Plausibility limits from a register map; counters without max_rate_w use the power range."""
    power = rmap.quantities.get("power_w")
    power_limit = None
    if power is not None and power.range is not None:
        power_limit = int(max(abs(power.range[0]), abs(power.range[1])))
    limits: dict[str, QuantityLimits] = {}
    for name, quantity in rmap.quantities.items():
        counter = quantity.counter
        limits[name] = QuantityLimits(
            range=quantity.range,
            max_rate_w=(counter.max_rate_w or power_limit) if counter is not None else None,
            rollover_wh=counter.rollover_wh if counter is not None else None,
        )
    return limits


@dataclass(frozen=True, slots=True)
class VeeSettings:
    max_clock_skew_s: float = 30.0
    gap_s: float = 300.0
    # Counter resolution and timing jitter: a rise this much above max_rate_w x dt is still plausible.
    counter_slack_wh: int = 100


class ReadingFlag(StrEnum):
    CLOCK_SKEW = "clock_skew"
    GAP = "gap"
    OFFLINE = "offline"
    # The first usable counter value of an epoch (after start-up or a reset event).
    EPOCH_START = "epoch_start"


@dataclass(frozen=True, slots=True)
class CounterReset:
    """An explicit meter reset or replacement: counters start a new epoch at `at_s`.

    When the final reading of the old counter and the first of the new one at
    `at_s` are known (a replacement protocol), both epochs end and start exactly
    there and no energy is lost across the swap.
    """

    meter_id: str
    at_s: float
    kind: Literal["reset", "replacement"] = "reset"
    counters: tuple[str, ...] = ENERGY_COUNTERS
    final_wh: Mapping[str, int] = field(default_factory=dict)
    initial_wh: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EpochPoint:
    """One accepted value of an energy counter in its epoch (unwrapped), at time `t_s`."""

    counter: str
    epoch: int
    t_s: float
    value_wh: int


@dataclass(frozen=True, slots=True)
class ValidatedReading:
    """A reading after validation: flags, per-value quality, and accepted counters per epoch."""

    meter_id: str
    read_at_s: float
    values: Mapping[str, QuantityValue]
    flags: frozenset[ReadingFlag]
    # Accepted energy counters, monotone within their epoch (rollovers unwrapped).
    counter_wh: Mapping[str, int]
    epochs: Mapping[str, int]
    source: MeterReading

    def counter_points(self) -> list[EpochPoint]:
        """The accepted counters of this reading as points for interval energy."""
        return [
            EpochPoint(name, self.epochs[name], self.read_at_s, value)
            for name, value in self.counter_wh.items()
        ]


@dataclass(slots=True)
class _CounterState:
    epoch: int = 0
    last_wh: int | None = None  # unwrapped
    last_t: float | None = None
    offset_wh: int = 0


@dataclass(slots=True)
class VeeStats:
    duplicates_dropped: int = 0
    stale_dropped: int = 0
    invalid: dict[str, int] = field(default_factory=dict)

    def count(self, quality: Quality) -> None:
        self.invalid[quality.value] = self.invalid.get(quality.value, 0) + 1


class MeterValidator:
    """Validates one meter's readings in arrival order and keeps its counter epochs."""

    def __init__(
        self,
        meter_id: str,
        limits: Mapping[str, QuantityLimits] | None = None,
        settings: VeeSettings | None = None,
    ) -> None:
        self.meter_id = meter_id
        self.limits = dict(limits or {})
        self.settings = settings or VeeSettings()
        self.stats = VeeStats()
        self._last_read_at: float | None = None
        self._last_usable_at: float | None = None
        self._reset_at: float | None = None
        self._counters: dict[str, _CounterState] = {}

    def counter_state(self, name: str) -> tuple[int, int | None]:
        """(epoch, last accepted unwrapped value) of a counter."""
        state = self._counters.get(name, _CounterState())
        return state.epoch, state.last_wh

    def apply_reset(self, event: CounterReset) -> list[EpochPoint]:
        """Start a new epoch for the event's counters; readings taken before it are then stale.

        Returns the counter points the event itself fixes: the old epoch's final
        value and the new epoch's initial value, where the event gives them.
        """
        if event.meter_id != self.meter_id:
            raise ValueError(
                f"reset for meter {event.meter_id!r} given to the validator of {self.meter_id!r}"
            )
        if self._last_read_at is not None and event.at_s < self._last_read_at:
            raise ValueError(f"reset at {event.at_s} is before the last reading at {self._last_read_at}")
        points: list[EpochPoint] = []
        for name in event.counters:
            state = self._counters.setdefault(name, _CounterState())
            final = event.final_wh.get(name)
            if final is not None:
                if state.last_wh is not None and final + state.offset_wh < state.last_wh:
                    raise ValueError(
                        f"{name}: final_wh {final} of the reset is below the last accepted "
                        f"{state.last_wh - state.offset_wh}"
                    )
                points.append(EpochPoint(name, state.epoch, event.at_s, final + state.offset_wh))
            state.epoch += 1
            state.offset_wh = 0
            state.last_wh = None
            state.last_t = None
            initial = event.initial_wh.get(name)
            if initial is not None:
                state.last_wh = initial
                state.last_t = event.at_s
                points.append(EpochPoint(name, state.epoch, event.at_s, initial))
        self._reset_at = event.at_s if self._reset_at is None else max(self._reset_at, event.at_s)
        return points

    def validate(self, reading: MeterReading) -> ValidatedReading | None:
        """The reading with its flags and checked values, or None when it is a duplicate or stale."""
        t = reading.read_at_s
        if self._last_read_at is not None and t <= self._last_read_at:
            if t == self._last_read_at:
                self.stats.duplicates_dropped += 1
            else:
                self.stats.stale_dropped += 1
            return None
        if self._reset_at is not None and t < self._reset_at:
            self.stats.stale_dropped += 1
            return None
        self._last_read_at = t

        flags: set[ReadingFlag] = set()
        if reading.status is MeterStatus.OFFLINE:
            flags.add(ReadingFlag.OFFLINE)
        skewed = (
            reading.received_at_s is not None
            and abs(t - reading.received_at_s) > self.settings.max_clock_skew_s
        )
        if skewed:
            flags.add(ReadingFlag.CLOCK_SKEW)

        values: dict[str, QuantityValue] = {}
        for name, value in reading.values.items():
            values[name] = self._check_range(name, value)

        counter_wh: dict[str, int] = {}
        epochs: dict[str, int] = {}
        if not skewed:
            for name, value in list(values.items()):
                spec = QUANTITIES.get(name)
                if spec is None or spec.kind is not Kind.COUNTER or not value.ok:
                    continue
                checked, unwrapped, first = self._check_counter(name, value, t)
                values[name] = checked
                if unwrapped is not None:
                    counter_wh[name] = unwrapped
                    epochs[name] = self._counters[name].epoch
                    if first:
                        flags.add(ReadingFlag.EPOCH_START)
        if counter_wh:
            if self._last_usable_at is not None and t - self._last_usable_at > self.settings.gap_s:
                flags.add(ReadingFlag.GAP)
            self._last_usable_at = t
        for value in values.values():
            if not value.ok:
                self.stats.count(value.quality)
        return ValidatedReading(
            meter_id=reading.meter_id,
            read_at_s=t,
            values=values,
            flags=frozenset(flags),
            counter_wh=counter_wh,
            epochs=epochs,
            source=reading,
        )

    def _check_range(self, name: str, value: QuantityValue) -> QuantityValue:
        limits = self.limits.get(name)
        if not value.ok or limits is None or limits.range is None or value.value is None:
            return value
        lo, hi = limits.range
        if not lo <= value.value <= hi:
            return QuantityValue.invalid(Quality.OUT_OF_RANGE, f"{value.value} outside [{lo}, {hi}]")
        return value

    def _check_counter(
        self, name: str, value: QuantityValue, t: float
    ) -> tuple[QuantityValue, int | None, bool]:
        raw = value.value
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise TypeError(f"{self.meter_id} {name}: energy counters are whole Wh, got {raw!r}")
        state = self._counters.setdefault(name, _CounterState())
        limits = self.limits.get(name, QuantityLimits())
        unwrapped = raw + state.offset_wh
        if state.last_wh is None or state.last_t is None:
            state.last_wh, state.last_t = unwrapped, t
            return value, unwrapped, True
        dt = max(t - state.last_t, 0.0)
        allowed = self._allowed_rise_wh(limits, dt)
        if unwrapped < state.last_wh:
            rollover = limits.rollover_wh
            if rollover is not None:
                wrapped = unwrapped + rollover
                if wrapped >= state.last_wh and (allowed is None or wrapped - state.last_wh <= allowed):
                    state.offset_wh += rollover
                    state.last_wh, state.last_t = wrapped, t
                    return value, wrapped, False
            detail = f"{raw} below the last accepted {state.last_wh - state.offset_wh} without a reset event"
            return QuantityValue.invalid(Quality.COUNTER_BACKWARDS, detail), None, False
        if allowed is not None and unwrapped - state.last_wh > allowed:
            detail = (
                f"rose {unwrapped - state.last_wh} Wh in {dt:.1f} s, more than {allowed} Wh "
                f"at {limits.max_rate_w} W"
            )
            return QuantityValue.invalid(Quality.COUNTER_JUMP, detail), None, False
        state.last_wh, state.last_t = unwrapped, t
        return value, unwrapped, False

    def _allowed_rise_wh(self, limits: QuantityLimits, dt_s: float) -> int | None:
        if limits.max_rate_w is None:
            return None
        return int(limits.max_rate_w * dt_s / SECONDS_PER_HOUR) + self.settings.counter_slack_wh
