"""Validation of meter readings (the V of VEE): what is usable, what is flagged, what is dropped.

Rules, per meter:
- A reading at or before the last one seen is a duplicate (or out of order) and is dropped.
- A reading whose meter clock differs from the receiving clock by more than
  `max_clock_skew_s` is flagged CLOCK_SKEW; its counters are not used for energy,
  and its time does not become the meter's last one (a single timestamp years
  ahead would otherwise make every later reading look old).
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

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from services.meter_ingest.domain.quantities import (
    ENERGY_COUNTERS,
    Number,
    Quality,
    QuantityValue,
)
from services.meter_ingest.domain.readings import MeterReading, MeterStatus
from services.meter_ingest.domain.register_map import RegisterMap

SECONDS_PER_HOUR = 3600
IMPORT, EXPORT = ENERGY_COUNTERS
POWER = "power_w"


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
        # Derived from `limits` once: the hot path reads these.
        self._ranges = {name: lim.range for name, lim in self.limits.items() if lim.range is not None}
        self._max_rate_w = {
            name: lim.max_rate_w for name, lim in self.limits.items() if lim.max_rate_w is not None
        }
        unbounded = (-math.inf, math.inf)
        self._carried_ranges = (
            *self._ranges.get(IMPORT, unbounded),
            *self._ranges.get(EXPORT, unbounded),
            *self._ranges.get(POWER, unbounded),
        )
        self._carried_rates_w = (self._max_rate_w.get(IMPORT), self._max_rate_w.get(EXPORT))
        self.settings = settings or VeeSettings()
        self.stats = VeeStats()
        self._last_read_at: float | None = None
        self._last_usable_at: float | None = None
        self._reset_at: float | None = None
        self._counters: dict[str, _CounterState] = {IMPORT: _CounterState(), EXPORT: _CounterState()}
        self._carried_counters = (self._counters[IMPORT], self._counters[EXPORT])

    @property
    def last_read_at_s(self) -> float | None:
        """Time of the newest reading taken (valid or not); older ones are dropped."""
        return self._last_read_at

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
        usable = {name: q.value for name, q in reading.values.items() if q.ok and q.value is not None}
        check = self.check_values(reading.read_at_s, reading.received_at_s, usable)
        if check is None:
            return None
        values = dict(reading.values)
        for value in values.values():
            if not value.ok:
                self.stats.count(value.quality)
        for name, quality, detail in check.problems:
            values[name] = QuantityValue.invalid(quality, detail)
        flags = set(check.flags)
        if reading.status is MeterStatus.OFFLINE:
            flags.add(ReadingFlag.OFFLINE)
        return ValidatedReading(
            meter_id=reading.meter_id,
            read_at_s=reading.read_at_s,
            values=values,
            flags=frozenset(flags),
            counter_wh={p.counter: p.value_wh for p in check.points},
            epochs={p.counter: p.epoch for p in check.points},
            source=reading,
        )

    def check_values(
        self, t_s: float, received_at_s: float | None, values: Mapping[str, Number], *, counters: bool = True
    ) -> ValueCheck | None:
        """Validate plain values taken at `t_s`: every rule of the module, None when dropped.

        `values` holds only the values the source calls valid (`validate` passes
        a reading's valid values; the push path passes a message's fields).
        With `counters` False (an estimated reading) energy counters are
        range-checked but never accepted for energy. This runs once per
        reading at push rates, so the common case stays on a short path.
        """
        last = self._last_read_at
        if (last is not None and t_s <= last) or (self._reset_at is not None and t_s < self._reset_at):
            self._admit(t_s)  # counts the duplicate or stale reading
            return None
        skewed = received_at_s is not None and abs(t_s - received_at_s) > self.settings.max_clock_skew_s
        if not skewed:
            self._last_read_at = t_s
        use_counters = counters and not skewed
        ranges = self._ranges
        problems: list[tuple[str, Quality, str]] | None = None
        points: list[EpochPoint] = []
        epoch_start = False
        for name, value in values.items():
            bounds = ranges.get(name)
            if bounds is not None and not bounds[0] <= value <= bounds[1]:
                problems = problems or []
                problems.append((name, Quality.OUT_OF_RANGE, f"{value} outside [{bounds[0]}, {bounds[1]}]"))
                continue
            if not use_counters or name not in ENERGY_COUNTERS:
                continue
            problem, detail, unwrapped, first = self._accept_counter(name, value, t_s)
            if problem is not None:
                problems = problems or []
                problems.append((name, problem, detail))
            elif unwrapped is not None:
                points.append(EpochPoint(name, self._counters[name].epoch, t_s, unwrapped))
                epoch_start = epoch_start or first
        if not skewed and not epoch_start and problems is None and points:
            if self._note_usable(t_s):
                return ValueCheck((ReadingFlag.GAP,), (), tuple(points))
            return ValueCheck((), (), tuple(points))
        flags: list[ReadingFlag] = []
        if skewed:
            flags.append(ReadingFlag.CLOCK_SKEW)
        if epoch_start:
            flags.append(ReadingFlag.EPOCH_START)
        if points and self._note_usable(t_s):
            flags.append(ReadingFlag.GAP)
        for _name, quality, _detail in problems or ():
            self.stats.count(quality)
        return ValueCheck(tuple(flags), tuple(problems or ()), tuple(points))

    def accept_ordinary(
        self, t_s: float, received_at_s: float | None, import_wh: Number, export_wh: Number, power_w: Number
    ) -> tuple[int, int, int, int] | None:
        """Take a complete reading (both counters and total power, all valid) when no rule has anything to say.

        Returns (import epoch, import value, export epoch, export value) as
        accepted, exactly what `check_values` would accept for the same values
        with no flag and no problem. Anything else (a duplicate, a flag, an
        invalid value, the first value of an epoch) returns None and leaves the
        state untouched, so the caller hands the reading to `check_values`.
        This is the push path's per-reading cost, hence written out in one piece.
        """
        last = self._last_read_at
        if last is None or t_s <= last or (self._reset_at is not None and t_s < self._reset_at):
            return None
        settings = self.settings
        if received_at_s is not None and abs(t_s - received_at_s) > settings.max_clock_skew_s:
            return None
        usable = self._last_usable_at
        if usable is not None and t_s - usable > settings.gap_s:
            return None
        import_lo, import_hi, export_lo, export_hi, power_lo, power_hi = self._carried_ranges
        if not (
            import_lo <= import_wh <= import_hi
            and export_lo <= export_wh <= export_hi
            and power_lo <= power_w <= power_hi
        ):
            return None
        if type(import_wh) is not int or type(export_wh) is not int:
            return None
        imported, exported = self._carried_counters
        import_last, import_t = imported.last_wh, imported.last_t
        export_last, export_t = exported.last_wh, exported.last_t
        if import_last is None or import_t is None or export_last is None or export_t is None:
            return None
        import_new = import_wh + imported.offset_wh
        export_new = export_wh + exported.offset_wh
        import_dt, export_dt = t_s - import_t, t_s - export_t
        if import_new < import_last or export_new < export_last or import_dt < 0 or export_dt < 0:
            return None
        import_rate, export_rate = self._carried_rates_w
        slack = settings.counter_slack_wh
        # The same arithmetic as `_allowed_rise_wh`, so both paths draw the line at the same Wh.
        if (
            import_rate is not None
            and import_new - import_last > int(import_rate * import_dt / SECONDS_PER_HOUR) + slack
        ):
            return None
        if (
            export_rate is not None
            and export_new - export_last > int(export_rate * export_dt / SECONDS_PER_HOUR) + slack
        ):
            return None
        self._last_read_at = t_s
        self._last_usable_at = t_s
        imported.last_wh, imported.last_t = import_new, t_s
        exported.last_wh, exported.last_t = export_new, t_s
        return imported.epoch, import_new, exported.epoch, export_new

    # The rules, shared by `validate` and `check_values`.

    def _admit(self, t: float) -> bool:
        """Whether a reading at `t` is new; a new one becomes the last reading seen."""
        last = self._last_read_at
        if last is not None and t <= last:
            if t == last:
                self.stats.duplicates_dropped += 1
            else:
                self.stats.stale_dropped += 1
            return False
        if self._reset_at is not None and t < self._reset_at:
            self.stats.stale_dropped += 1
            return False
        self._last_read_at = t
        return True

    def _note_usable(self, t: float) -> bool:
        """Record a reading with usable counters at `t`; True when it comes after a gap."""
        gap = self._last_usable_at is not None and t - self._last_usable_at > self.settings.gap_s
        self._last_usable_at = t
        return gap

    def _accept_counter(
        self, name: str, raw: Number | None, t: float
    ) -> tuple[Quality | None, str, int | None, bool]:
        """(problem, detail, accepted unwrapped value, first of its epoch) for one counter value."""
        if type(raw) is not int:
            raise TypeError(f"{self.meter_id} {name}: energy counters are whole Wh, got {raw!r}")
        state = self._counters.get(name)
        if state is None:
            state = self._counters[name] = _CounterState()
        unwrapped = raw + state.offset_wh
        last_wh, last_t = state.last_wh, state.last_t
        if last_wh is not None and last_t is not None and unwrapped >= last_wh:
            # The common case: the counter moved forward; only its rate needs a look.
            max_rate_w = self._max_rate_w.get(name)
            if max_rate_w is None or unwrapped - last_wh <= (
                int(max_rate_w * (t - last_t if t > last_t else 0.0) / SECONDS_PER_HOUR)
                + self.settings.counter_slack_wh
            ):
                state.last_wh, state.last_t = unwrapped, t
                return None, "", unwrapped, False
        if state.last_wh is None or state.last_t is None:
            state.last_wh, state.last_t = unwrapped, t
            return None, "", unwrapped, True
        limits = self.limits.get(name, _NO_LIMITS)
        dt = t - state.last_t if t > state.last_t else 0.0
        allowed = self._allowed_rise_wh(limits, dt)
        if unwrapped < state.last_wh:
            rollover = limits.rollover_wh
            if rollover is not None:
                wrapped = unwrapped + rollover
                if wrapped >= state.last_wh and (allowed is None or wrapped - state.last_wh <= allowed):
                    state.offset_wh += rollover
                    state.last_wh, state.last_t = wrapped, t
                    return None, "", wrapped, False
            detail = f"{raw} below the last accepted {state.last_wh - state.offset_wh} without a reset event"
            return Quality.COUNTER_BACKWARDS, detail, None, False
        if allowed is not None and unwrapped - state.last_wh > allowed:
            detail = (
                f"rose {unwrapped - state.last_wh} Wh in {dt:.1f} s, more than {allowed} Wh "
                f"at {limits.max_rate_w} W"
            )
            return Quality.COUNTER_JUMP, detail, None, False
        state.last_wh, state.last_t = unwrapped, t
        return None, "", unwrapped, False

    def _allowed_rise_wh(self, limits: QuantityLimits, dt_s: float) -> int | None:
        if limits.max_rate_w is None:
            return None
        return int(limits.max_rate_w * dt_s / SECONDS_PER_HOUR) + self.settings.counter_slack_wh

    # State that must outlive the process (see `snapshot`).

    def snapshot(self) -> dict[str, Any]:
        """The validator's state as JSON-ready data; `restore` takes it back."""
        return {
            "last_read_at": self._last_read_at,
            "last_usable_at": self._last_usable_at,
            "reset_at": self._reset_at,
            "counters": {
                name: [state.epoch, state.last_wh, state.last_t, state.offset_wh]
                for name, state in self._counters.items()
            },
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        """Take back the state of `snapshot` (the meter's limits and settings stay as configured)."""
        try:
            self._last_read_at = _opt_float(data["last_read_at"])
            self._last_usable_at = _opt_float(data["last_usable_at"])
            self._reset_at = _opt_float(data["reset_at"])
            counters: dict[str, _CounterState] = {}
            for name, (epoch, last_wh, last_t, offset_wh) in dict(data["counters"]).items():
                counters[str(name)] = _CounterState(
                    epoch=int(epoch),
                    last_wh=None if last_wh is None else int(last_wh),
                    last_t=_opt_float(last_t),
                    offset_wh=int(offset_wh),
                )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"meter {self.meter_id}: unreadable validator state: {exc!r}") from None
        counters.setdefault(IMPORT, _CounterState())
        counters.setdefault(EXPORT, _CounterState())
        self._counters = counters
        self._carried_counters = (counters[IMPORT], counters[EXPORT])


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


_NO_LIMITS = QuantityLimits()


@dataclass(frozen=True, slots=True)
class ValueCheck:
    """What `check_values` found: reading flags, invalid values (name, quality, detail), accepted counters."""

    flags: tuple[ReadingFlag, ...]
    problems: tuple[tuple[str, Quality, str], ...]
    points: tuple[EpochPoint, ...]
