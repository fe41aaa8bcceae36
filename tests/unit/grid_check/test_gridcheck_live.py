"""The live view: metered power per node to injections and line loading."""

from __future__ import annotations

import pytest

from services.domain.errors import InvalidArgument
from services.grid_check.domain.limits import LineLimit
from services.grid_check.domain.live import LiveMeters, live_state
from services.grid_check.domain.network import FlowModel


def ratings(model: FlowModel) -> dict[str, LineLimit]:
    return {line_id: LineLimit(line_id, cap) for line_id, cap in model.ratings_w.items()}


def test_importing_sites_withdraw_and_the_slack_supplies_the_balance(radial_model: FlowModel) -> None:
    # n2 imports 3 kW, n3 exports 1 kW (negative meter power).
    state = live_state(radial_model, ratings(radial_model), {"n2": 3_000, "n3": -1_000}, as_of_s=10.0)
    assert state.injections_w == pytest.approx({"n0": 2_000, "n1": 0, "n2": -3_000, "n3": 1_000})
    flows = {line.line_id: line.flow_w for line in state.lines}
    assert flows == pytest.approx({"l1": 2_000, "l2": 3_000, "l3": -1_000})
    assert not state.violations


def test_an_overloaded_line_shows_up_as_a_live_violation(radial_model: FlowModel) -> None:
    state = live_state(radial_model, ratings(radial_model), {"n3": 25_000}, as_of_s=0.0)
    assert [v.line_id for v in state.violations] == ["l3"]
    assert {line.line_id: line.loading_pct for line in state.lines}["l3"] == pytest.approx(125.0)


def test_a_meter_at_an_unknown_node_is_rejected(radial_model: FlowModel) -> None:
    with pytest.raises(InvalidArgument, match="'n8'"):
        live_state(radial_model, ratings(radial_model), {"n8": 1.0}, as_of_s=0.0)


def test_the_latest_fresh_reading_of_each_meter_counts_once() -> None:
    meters = LiveMeters(stale_after_s=30)
    assert meters.update(meter_id="m1", node_id="n2", time_s=100, power_w=1_000)
    assert meters.update(meter_id="m2", node_id="n2", time_s=101, power_w=500)
    assert meters.update(meter_id="m1", node_id="n2", time_s=110, power_w=1_200)
    assert not meters.update(meter_id="m1", node_id="n2", time_s=105, power_w=9_999)  # out of order
    assert meters.power_by_node(now_s=120) == {"n2": 1_700}
    # m2 last spoke at 101: 30 s later it no longer counts; m1 (110) still does.
    assert meters.power_by_node(now_s=135) == {"n2": 1_200}
    assert meters.power_by_node(now_s=200) == {}
