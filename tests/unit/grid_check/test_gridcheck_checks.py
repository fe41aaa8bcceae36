"""Schedule checks and the re-check of clearing results against line limits."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from services.domain.errors import InvalidArgument
from services.grid_check.domain.checks import (
    ClearingToCheck,
    TradeFlow,
    check_schedule,
    injections_from_trades,
    recheck_clearing,
)
from services.grid_check.domain.limits import LineLimit
from services.grid_check.domain.network import FlowModel


def flows_of(result_lines: object) -> dict[str, float]:
    return {line.line_id: line.flow_w for line in result_lines}  # type: ignore[attr-defined]


def test_radial_flows_follow_from_the_injections_downstream_of_each_line(radial_model: FlowModel) -> None:
    result = check_schedule(radial_model, {"n0": -6_000, "n2": 10_000, "n3": -4_000})
    flows = flows_of(result.lines)
    # n2 exports 10 kW up through l2 (against its direction), n3 draws 4 kW through l3,
    # and the remaining 6 kW leave through l1 to the slack.
    assert flows["l2"] == pytest.approx(-10_000)
    assert flows["l3"] == pytest.approx(4_000)
    assert flows["l1"] == pytest.approx(-6_000)
    assert result.ok


def test_meshed_flows_split_in_inverse_proportion_to_path_reactance(triangle_model: FlowModel) -> None:
    # 12 kW from n0 to n1: the direct line (x=1) against the detour n0-n2-n1 (x=2+1).
    result = check_schedule(triangle_model, {"n0": 12_000, "n1": -12_000})
    flows = flows_of(result.lines)
    assert flows["a"] == pytest.approx(9_000)
    assert flows["c"] == pytest.approx(3_000)
    assert flows["b"] == pytest.approx(-3_000)


def test_loading_is_the_flow_magnitude_over_the_limit_in_percent(radial_model: FlowModel) -> None:
    result = check_schedule(radial_model, {"n0": 5_000, "n2": -5_000})
    loading = {line.line_id: line.loading_pct for line in result.lines}
    assert loading == pytest.approx({"l1": 10.0, "l2": 25.0, "l3": 0.0})


def test_a_flow_one_watt_over_its_limit_is_a_violation_naming_the_line(radial_model: FlowModel) -> None:
    result = check_schedule(radial_model, {"n0": 20_001, "n3": -20_001})
    assert [v.line_id for v in result.violations] == ["l3"]
    violation = result.violations[0]
    assert violation.flow_w == 20_001
    assert violation.capacity_w == 20_000
    assert "l3" in violation.message and "20000" in violation.message


def test_a_flow_exactly_at_its_limit_is_not_a_violation(radial_model: FlowModel) -> None:
    result = check_schedule(radial_model, {"n0": 20_000, "n3": -20_000})
    assert result.ok
    assert {line.line_id: line.loading_pct for line in result.lines}["l3"] == pytest.approx(100.0)


def test_a_flow_exactly_at_its_limit_on_a_loop_is_not_a_violation(triangle_model: FlowModel) -> None:
    # 100 kW n0 -> n2 splits evenly: a and b carry 50 kW, c 50 kW; limit them to 50 kW exactly.
    limits = {line_id: LineLimit(line_id, 50_000) for line_id in ("a", "b", "c")}
    result = check_schedule(triangle_model, {"n0": 100_000, "n2": -100_000}, limits)
    assert result.ok, result.violations


def test_injections_must_sum_to_zero_within_one_watt(radial_model: FlowModel) -> None:
    assert check_schedule(radial_model, {"n0": 1, "n2": 0}).ok
    with pytest.raises(InvalidArgument, match=r"sum to 2\.000 W"):
        check_schedule(radial_model, {"n0": 2, "n2": 0})


def test_the_slack_takes_the_imbalance_when_asked(radial_model: FlowModel) -> None:
    result = check_schedule(radial_model, {"n2": 7_000}, slack_balances=True)
    assert result.injections_w["n0"] == pytest.approx(-7_000)
    assert flows_of(result.lines)["l1"] == pytest.approx(-7_000)


def test_an_unknown_node_is_rejected_by_name(radial_model: FlowModel) -> None:
    with pytest.raises(InvalidArgument, match="'n9' is not a node"):
        check_schedule(radial_model, {"n0": 5, "n9": -5})


def test_limits_in_force_replace_the_ratings_and_their_reason_is_reported(radial_model: FlowModel) -> None:
    limits = {
        "l1": LineLimit("l1", 50_000),
        "l2": LineLimit("l2", 0, "maintenance"),
        "l3": LineLimit("l3", 20_000),
    }
    result = check_schedule(radial_model, {"n0": 10, "n2": -10}, limits)
    assert [v.line_id for v in result.violations] == ["l2"]
    assert "maintenance" in result.violations[0].message
    assert result.as_dict()["lines"][1]["loading_pct"] is None  # infinite loading has no JSON number


def test_trades_inject_at_the_seller_and_withdraw_at_the_buyer_as_average_power() -> None:
    injections = injections_from_trades(
        [TradeFlow("n2", "n3", 1_000), TradeFlow("n2", "n0", 250)], interval_s=900
    )
    assert injections == {"n2": 5_000, "n3": -4_000, "n0": -1_000}


def test_a_clearing_result_overloading_a_line_by_one_watt_fails_naming_the_line(
    make_model: Callable[..., FlowModel],
) -> None:
    model = make_model(
        [
            {"id": "feeder", "from": "n0", "to": "n1", "capacity_w": 50_003},
            {"id": "spur", "from": "n1", "to": "n2", "capacity_w": 90_000},
        ]
    )
    limits = {line_id: LineLimit(line_id, cap) for line_id, cap in model.ratings_w.items()}
    # 12,501 Wh in 15 minutes is 50,004 W: one watt over the feeder's limit.
    verdict = recheck_clearing(
        model,
        limits,
        ClearingToCheck(
            interval_start_s=1_800_000_000 - 1_800_000_000 % 900,
            interval_s=900,
            trades=(TradeFlow("n0", "n2", 12_501),),
        ),
    )
    assert not verdict.ok
    assert [(v.line_id, v.kind, v.flow_w) for v in verdict.violations] == [("feeder", "overload", 50_004)]


def test_a_feasible_clearing_result_with_matching_flows_passes(radial_model: FlowModel) -> None:
    limits = {line_id: LineLimit(line_id, cap) for line_id, cap in radial_model.ratings_w.items()}
    verdict = recheck_clearing(
        radial_model,
        limits,
        ClearingToCheck(
            interval_start_s=0,
            interval_s=900,
            trades=(TradeFlow("n2", "n3", 2_500), TradeFlow("n0", "n3", 500)),
            reported_flows_w={"l1": 2_000, "l2": -10_000, "l3": 12_000},
        ),
    )
    assert verdict.ok, verdict.violations


def test_a_reported_flow_that_differs_from_the_trades_fails_the_verdict(radial_model: FlowModel) -> None:
    limits = {line_id: LineLimit(line_id, cap) for line_id, cap in radial_model.ratings_w.items()}
    verdict = recheck_clearing(
        radial_model,
        limits,
        ClearingToCheck(
            interval_start_s=0,
            interval_s=900,
            trades=(TradeFlow("n0", "n3", 1_000),),
            reported_flows_w={"l1": 4_000, "l2": 0, "l3": 3_990},
        ),
    )
    assert not verdict.ok
    assert [(v.line_id, v.kind) for v in verdict.violations] == [("l3", "flow_mismatch")]


def test_a_reported_overload_fails_even_when_the_trades_are_within_limits(radial_model: FlowModel) -> None:
    limits = {line_id: LineLimit(line_id, cap) for line_id, cap in radial_model.ratings_w.items()}
    verdict = recheck_clearing(
        radial_model,
        limits,
        ClearingToCheck(
            interval_start_s=0,
            interval_s=3_600,
            injections_w={"n0": 20_000, "n2": -20_000},
            reported_flows_w={"l2": 20_001},
        ),
    )
    assert [(v.line_id, v.kind) for v in verdict.violations] == [("l2", "overload")]
    assert "reported flow 20001 W" in verdict.violations[0].message


def test_a_clearing_result_naming_an_unknown_node_fails_instead_of_raising(radial_model: FlowModel) -> None:
    limits = {line_id: LineLimit(line_id, cap) for line_id, cap in radial_model.ratings_w.items()}
    verdict = recheck_clearing(
        radial_model,
        limits,
        ClearingToCheck(interval_start_s=0, interval_s=900, trades=(TradeFlow("n0", "elsewhere", 10),)),
    )
    assert not verdict.ok
    assert verdict.violations[0].kind == "bad_input"
    assert "elsewhere" in verdict.violations[0].message
