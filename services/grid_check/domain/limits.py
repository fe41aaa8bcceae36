"""Line limits that change over time: maintenance, seasonal ratings and operating envelopes per interval.

A line's limit for an interval is its rating from the grid file, unless the
operator has set a limit covering that interval. Set limits are changes kept
in order; the most recently set change covering an interval wins, whether it
lowers the limit (maintenance, a dynamic operating envelope) or raises it (a
winter rating). A change covers the intervals from `start_s` (inclusive) up to
`until_s` (exclusive), or every later interval when `until_s` is None.

A limit of 0 W keeps the line's flow at zero; it does not take the line out of
the network model (the PTDFs stay those of the grid file). A real switching
change of the topology is a new grid file.

Limits can only be set for intervals whose gate has not closed: the matcher
has already been given the limits of a closed interval, and grid_check must
re-check its result against the same ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from services.domain.errors import FailedPrecondition, InvalidArgument
from services.domain.intervals import DEFAULT_GATE_CLOSURE_S, DEFAULT_INTERVAL_S, Interval

RATING_REASON = "rating"


@dataclass(frozen=True, slots=True)
class LineLimit:
    """The limit in force on one line for one interval, and why."""

    line_id: str
    capacity_w: int
    reason: str = RATING_REASON


@dataclass(frozen=True, slots=True)
class LimitChange:
    """One limit set by an operator for a range of intervals."""

    seq: int
    line_id: str
    start_s: int
    until_s: int | None
    capacity_w: int
    reason: str
    set_by: str

    def covers(self, interval_start_s: int) -> bool:
        return self.start_s <= interval_start_s and (self.until_s is None or interval_start_s < self.until_s)


@dataclass(frozen=True, slots=True)
class LimitRequest:
    """A limit the operator asks for, before validation."""

    line_id: str
    capacity_w: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class LimitSchedule:
    """All limits set so far, oldest first. Immutable: `with_changes` returns a new schedule."""

    changes: tuple[LimitChange, ...] = field(default=())

    def next_seq(self) -> int:
        return self.changes[-1].seq + 1 if self.changes else 1

    def with_changes(self, changes: Iterable[LimitChange]) -> LimitSchedule:
        merged = self.changes + tuple(changes)
        seqs = [c.seq for c in merged]
        if seqs != sorted(seqs) or len(set(seqs)) != len(seqs):
            raise ValueError("limit changes must have strictly increasing seq")
        return LimitSchedule(merged)


def set_limits(
    schedule: LimitSchedule,
    *,
    ratings_w: Mapping[str, int],
    start_s: int,
    until_s: int | None,
    requests: Iterable[LimitRequest],
    set_by: str,
    now_s: float,
    interval_s: int = DEFAULT_INTERVAL_S,
    gate_closure_s: int = DEFAULT_GATE_CLOSURE_S,
) -> tuple[LimitSchedule, tuple[LimitChange, ...]]:
    """Validate the operator's limits for `[start_s, until_s)` and append them to `schedule`.

    `ratings_w` maps every line of the grid to its rating (unknown lines are
    rejected). `until_s` None means open-ended; callers offering "one interval"
    pass `start_s + interval_s`. All of the request is accepted or none of it.
    Raises `InvalidArgument` naming the field and `FailedPrecondition` when the
    gate of `start_s` has closed at `now_s`.
    """
    if not set_by:
        raise InvalidArgument("the operator identity is empty", field="set_by")
    try:
        Interval(start_s, interval_s)
    except ValueError as exc:
        raise InvalidArgument(str(exc), field="interval_start_s") from None
    if until_s is not None:
        if until_s <= start_s:
            raise InvalidArgument(
                f"{until_s} is not after interval_start_s {start_s}", field="until_interval_start_s"
            )
        if until_s % interval_s != 0:
            raise InvalidArgument(
                f"{until_s} is not aligned to the interval length of {interval_s} s",
                field="until_interval_start_s",
            )
    gate_s = Interval(start_s, interval_s).gate_closure_s(gate_closure_s)
    if now_s >= gate_s:
        raise FailedPrecondition(
            f"the gate of interval {Interval(start_s, interval_s).iso()} closed at {gate_s}; "
            "limits can only be set for intervals still open for trading",
            field="interval_start_s",
        )
    changes: list[LimitChange] = []
    seen: set[str] = set()
    seq = schedule.next_seq()
    for row, request in enumerate(requests):
        where = f"lines[{row}]"
        if request.line_id not in ratings_w:
            raise InvalidArgument(f"{request.line_id!r} is not a line of the grid", field=f"{where}.line_id")
        if request.line_id in seen:
            raise InvalidArgument(
                f"{request.line_id!r} appears twice in one request", field=f"{where}.line_id"
            )
        if request.capacity_w < 0:
            raise InvalidArgument(
                f"must be zero or positive, got {request.capacity_w}", field=f"{where}.capacity_w"
            )
        seen.add(request.line_id)
        changes.append(
            LimitChange(
                seq=seq,
                line_id=request.line_id,
                start_s=start_s,
                until_s=until_s,
                capacity_w=request.capacity_w,
                reason=request.reason or "set by operator",
                set_by=set_by,
            )
        )
        seq += 1
    if not changes:
        raise InvalidArgument("no line limits given", field="lines")
    return schedule.with_changes(changes), tuple(changes)


def effective_limits(
    ratings_w: Mapping[str, int], schedule: LimitSchedule, interval_start_s: int
) -> dict[str, LineLimit]:
    """The limit in force on every line for the interval starting at `interval_start_s`.

    The latest change covering the interval wins; lines without one keep
    their rating. The result has one entry per line of `ratings_w`, in its order.
    """
    latest: dict[str, LimitChange] = {}
    for change in schedule.changes:
        if change.covers(interval_start_s) and change.line_id in ratings_w:
            latest[change.line_id] = change
    limits: dict[str, LineLimit] = {}
    for line_id, rating_w in ratings_w.items():
        in_force = latest.get(line_id)
        if in_force is None:
            limits[line_id] = LineLimit(line_id, rating_w, RATING_REASON)
        else:
            limits[line_id] = LineLimit(line_id, in_force.capacity_w, in_force.reason)
    return limits


def limits_from_dicts(
    entries: Iterable[Mapping[str, object]], *, ratings_w: Mapping[str, int]
) -> LimitSchedule:
    """A schedule from plain records (a YAML file or a database), validated row by row.

    Each record has `line_id`, `start_s`, optional `until_s`, `capacity_w`,
    optional `reason` and `set_by`. Rows keep their order: later rows win.
    """
    changes: list[LimitChange] = []
    for row, entry in enumerate(entries):
        where = f"limits[{row}]"
        line_id = entry.get("line_id")
        if not isinstance(line_id, str) or line_id not in ratings_w:
            raise InvalidArgument(f"{line_id!r} is not a line of the grid", field=f"{where}.line_id")
        start_s = entry.get("start_s")
        until_s = entry.get("until_s")
        capacity_w = entry.get("capacity_w")
        if not isinstance(start_s, int) or isinstance(start_s, bool):
            raise InvalidArgument(
                f"must be an integer (Unix seconds), got {start_s!r}", field=f"{where}.start_s"
            )
        if until_s is not None and (not isinstance(until_s, int) or isinstance(until_s, bool)):
            raise InvalidArgument(
                f"must be an integer (Unix seconds), got {until_s!r}", field=f"{where}.until_s"
            )
        if until_s is not None and until_s <= start_s:
            raise InvalidArgument(f"{until_s} is not after start_s {start_s}", field=f"{where}.until_s")
        if not isinstance(capacity_w, int) or isinstance(capacity_w, bool) or capacity_w < 0:
            raise InvalidArgument(f"must be an integer >= 0, got {capacity_w!r}", field=f"{where}.capacity_w")
        changes.append(
            LimitChange(
                seq=row + 1,
                line_id=line_id,
                start_s=start_s,
                until_s=until_s,
                capacity_w=capacity_w,
                reason=str(entry.get("reason") or "set by operator"),
                set_by=str(entry.get("set_by") or "file"),
            )
        )
    return LimitSchedule(tuple(changes))
