"""Time-varying line limits: who may set what, for which intervals, and which limit is in force."""

from __future__ import annotations

import pytest

from services.domain.errors import FailedPrecondition, InvalidArgument
from services.grid_check.domain.limits import (
    LimitChange,
    LimitRequest,
    LimitSchedule,
    effective_limits,
    limits_from_dicts,
    set_limits,
)

RATINGS = {"l1": 50_000, "l2": 20_000}
DAY_S = 86_400
T0 = 1_800_000_000 - 1_800_000_000 % DAY_S  # midnight UTC
Q = 900  # one interval


def set_(
    schedule: LimitSchedule, start_s: int, until_s: int | None, *requests: LimitRequest, now_s: float = 0.0
) -> tuple[LimitSchedule, tuple[LimitChange, ...]]:
    return set_limits(
        schedule,
        ratings_w=RATINGS,
        start_s=start_s,
        until_s=until_s,
        requests=requests,
        set_by="operator-1",
        now_s=now_s,
    )


def test_without_changes_every_line_has_its_rating() -> None:
    limits = effective_limits(RATINGS, LimitSchedule(), T0)
    assert {k: (v.capacity_w, v.reason) for k, v in limits.items()} == {
        "l1": (50_000, "rating"),
        "l2": (20_000, "rating"),
    }


def test_a_maintenance_limit_holds_for_its_intervals_only() -> None:
    schedule, changes = set_(LimitSchedule(), T0 + 4 * Q, T0 + 8 * Q, LimitRequest("l2", 0, "maintenance"))
    assert [c.set_by for c in changes] == ["operator-1"]
    assert effective_limits(RATINGS, schedule, T0 + 3 * Q)["l2"].capacity_w == 20_000
    assert effective_limits(RATINGS, schedule, T0 + 4 * Q)["l2"].capacity_w == 0
    assert effective_limits(RATINGS, schedule, T0 + 7 * Q)["l2"].reason == "maintenance"
    assert effective_limits(RATINGS, schedule, T0 + 8 * Q)["l2"].capacity_w == 20_000
    assert effective_limits(RATINGS, schedule, T0 + 4 * Q)["l1"].capacity_w == 50_000


def test_the_latest_change_covering_an_interval_wins_whether_it_raises_or_lowers() -> None:
    schedule, _ = set_(LimitSchedule(), T0, None, LimitRequest("l1", 60_000, "winter rating"))
    schedule, _ = set_(schedule, T0 + 10 * Q, T0 + 12 * Q, LimitRequest("l1", 30_000, "operating envelope"))
    assert effective_limits(RATINGS, schedule, T0 + 9 * Q)["l1"].capacity_w == 60_000
    assert effective_limits(RATINGS, schedule, T0 + 11 * Q)["l1"].capacity_w == 30_000
    assert effective_limits(RATINGS, schedule, T0 + 500 * Q)["l1"].capacity_w == 60_000
    schedule, _ = set_(schedule, T0 + 11 * Q, T0 + 12 * Q, LimitRequest("l1", 45_000, "revised"))
    assert effective_limits(RATINGS, schedule, T0 + 10 * Q)["l1"].capacity_w == 30_000
    assert effective_limits(RATINGS, schedule, T0 + 11 * Q)["l1"].capacity_w == 45_000


def test_limits_cannot_be_set_once_the_gate_of_the_interval_has_closed() -> None:
    # The gate closes 300 s before the interval starts.
    set_(LimitSchedule(), T0 + Q, None, LimitRequest("l1", 1), now_s=T0 + Q - 301)
    with pytest.raises(FailedPrecondition, match="gate"):
        set_(LimitSchedule(), T0 + Q, None, LimitRequest("l1", 1), now_s=T0 + Q - 300)


@pytest.mark.parametrize(
    ("start_s", "until_s", "requests", "field"),
    [
        (T0, None, [LimitRequest("l9", 1)], "lines[0].line_id"),
        (T0, None, [LimitRequest("l1", -1)], "lines[0].capacity_w"),
        (T0, None, [LimitRequest("l1", 1), LimitRequest("l1", 2)], "lines[1].line_id"),
        (T0 + 1, None, [LimitRequest("l1", 1)], "interval_start_s"),
        (T0, T0, [LimitRequest("l1", 1)], "until_interval_start_s"),
        (T0, T0 + Q + 1, [LimitRequest("l1", 1)], "until_interval_start_s"),
        (T0, None, [], "lines"),
    ],
)
def test_bad_limit_requests_are_rejected_naming_the_field(
    start_s: int, until_s: int | None, requests: list[LimitRequest], field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        set_(LimitSchedule(), start_s, until_s, *requests)
    assert caught.value.field == field


def test_a_rejected_request_changes_nothing() -> None:
    schedule, _ = set_(LimitSchedule(), T0, None, LimitRequest("l1", 10))
    with pytest.raises(InvalidArgument):
        set_(schedule, T0, None, LimitRequest("l2", 5), LimitRequest("nope", 5))
    assert len(schedule.changes) == 1
    assert effective_limits(RATINGS, schedule, T0)["l2"].capacity_w == 20_000


def test_an_empty_operator_identity_is_rejected() -> None:
    with pytest.raises(InvalidArgument) as caught:
        set_limits(
            LimitSchedule(),
            ratings_w=RATINGS,
            start_s=T0,
            until_s=None,
            requests=[LimitRequest("l1", 1)],
            set_by="",
            now_s=0,
        )
    assert caught.value.field == "set_by"


def test_limits_from_records_keep_their_order_and_name_a_bad_row() -> None:
    schedule = limits_from_dicts(
        [
            {"line_id": "l1", "start_s": T0, "capacity_w": 40_000, "reason": "summer rating"},
            {"line_id": "l1", "start_s": T0 + Q, "until_s": T0 + 2 * Q, "capacity_w": 0},
        ],
        ratings_w=RATINGS,
    )
    assert effective_limits(RATINGS, schedule, T0)["l1"].reason == "summer rating"
    assert effective_limits(RATINGS, schedule, T0 + Q)["l1"].capacity_w == 0
    assert effective_limits(RATINGS, schedule, T0 + 2 * Q)["l1"].capacity_w == 40_000
    with pytest.raises(InvalidArgument) as caught:
        limits_from_dicts([{"line_id": "l2", "start_s": T0, "capacity_w": "lots"}], ratings_w=RATINGS)
    assert caught.value.field == "limits[0].capacity_w"
