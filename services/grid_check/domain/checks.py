"""Checks of injections against line limits: schedules, clearing results (re-checked independently) and their verdicts.

A line is overloaded when the magnitude of its flow exceeds the limit in force
for the interval (see `limits.py`), by more than float rounding can explain
(`FlowModel.flow_tolerance_w`). Flows are average power over the interval in
watts, positive from the line's `from` node to its `to` node; loading is
`100 * |flow| / limit`.

A clearing result is re-checked from its trades alone: every trade moves its
energy from the seller's node to the buyer's node, so the trades give the net
injection of every node, the PTDFs give the flows, and the flows are held
against the limits. Flows the matcher reported are compared with the
recomputed ones too. Any violation makes the verdict fail: it means the
matcher is wrong, so the verdict names each offending line.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from services.domain.errors import InvalidArgument
from services.domain.units import SECONDS_PER_HOUR
from services.grid_check.domain.limits import LineLimit
from services.grid_check.domain.network import FlowModel

ViolationKind = Literal["overload", "flow_mismatch", "unknown_line", "bad_input"]
# A reported flow is an integer (rounded average power); more than this from the
# recomputed flow means the matcher computed a different flow.
FLOW_MISMATCH_TOLERANCE_W = 1.0


@dataclass(frozen=True, slots=True)
class LineLoading:
    """The flow on one line and how close it is to its limit."""

    line_id: str
    flow_w: float
    capacity_w: int
    loading_pct: float
    reason: str = "rating"

    @property
    def flow_w_rounded(self) -> int:
        return round(self.flow_w)

    def as_dict(self) -> dict[str, Any]:
        return {
            "line_id": self.line_id,
            "flow_w": self.flow_w_rounded,
            "loading_pct": _json_pct(self.loading_pct),
            "capacity_w": self.capacity_w,
        }


@dataclass(frozen=True, slots=True)
class Violation:
    """A line (or an input) that breaks a rule; `message` says which and by how much."""

    line_id: str
    flow_w: int
    capacity_w: int
    message: str
    kind: ViolationKind = "overload"
    loading_pct: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "line_id": self.line_id,
            "kind": self.kind,
            "flow_w": self.flow_w,
            "capacity_w": self.capacity_w,
            "loading_pct": _json_pct(self.loading_pct),
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class ScheduleCheck:
    """Flows, loading and violations for one set of injections."""

    lines: tuple[LineLoading, ...]
    violations: tuple[Violation, ...]
    injections_w: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def as_dict(self) -> dict[str, Any]:
        return {
            "lines": [line.as_dict() for line in self.lines],
            "violations": [v.as_dict() for v in self.violations],
        }


def _json_pct(value: float) -> float | None:
    # JSON has no infinity: a non-zero flow on a line limited to 0 W reports null.
    return round(value, 4) if math.isfinite(value) else None


def loading_pct(flow_w: float, capacity_w: int, tolerance_w: float = 0.0) -> float:
    """`100 * |flow| / capacity`; a line limited to 0 W is at 0 % when idle and infinitely loaded otherwise."""
    if capacity_w > 0:
        return 100.0 * abs(flow_w) / capacity_w
    return 0.0 if abs(flow_w) <= tolerance_w else math.inf


def _limits_or_ratings(model: FlowModel, limits: Mapping[str, LineLimit] | None) -> dict[str, LineLimit]:
    if limits is None:
        return {line_id: LineLimit(line_id, rating_w) for line_id, rating_w in model.ratings_w.items()}
    missing = [line_id for line_id in model.line_ids if line_id not in limits]
    if missing:
        raise ValueError(f"no limit given for line {missing[0]!r}")
    return dict(limits)


def _overload_message(line_id: str, flow_w: float, limit: LineLimit, *, what: str = "flow") -> str:
    excess_w = abs(flow_w) - limit.capacity_w
    return (
        f"line {line_id}: {what} {round(flow_w)} W exceeds its limit of {limit.capacity_w} W "
        f"({limit.reason}) by {excess_w:.3f} W"
    )


def assess_flows(
    model: FlowModel,
    flows_w: npt.NDArray[np.float64],
    limits: Mapping[str, LineLimit],
    tolerance_w: float,
) -> tuple[tuple[LineLoading, ...], tuple[Violation, ...]]:
    """Loading of every line and the overloaded ones, in the grid's line order."""
    loadings: list[LineLoading] = []
    violations: list[Violation] = []
    for line_id, flow in zip(model.line_ids, flows_w.tolist(), strict=True):
        limit = limits[line_id]
        pct = loading_pct(flow, limit.capacity_w, tolerance_w)
        loadings.append(LineLoading(line_id, flow, limit.capacity_w, pct, limit.reason))
        if abs(flow) > limit.capacity_w + tolerance_w:
            violations.append(
                Violation(
                    line_id=line_id,
                    flow_w=round(flow),
                    capacity_w=limit.capacity_w,
                    message=_overload_message(line_id, flow, limit),
                    kind="overload",
                    loading_pct=pct,
                )
            )
    return tuple(loadings), tuple(violations)


def check_schedule(
    model: FlowModel,
    injections_w: Mapping[str, float],
    limits: Mapping[str, LineLimit] | None = None,
    *,
    slack_balances: bool = False,
) -> ScheduleCheck:
    """Flows per line, loading in percent and violations for injections per node.

    `limits` are the limits in force for the schedule's interval (from
    `effective_limits`); without them the grid's ratings apply. Raises
    `InvalidArgument` for an unknown node or injections that do not balance
    (unless `slack_balances`).
    """
    limits_in_force = _limits_or_ratings(model, limits)
    vector = model.injection_vector(injections_w, slack_balances=slack_balances)
    flows = model.flows_w(vector)
    loadings, violations = assess_flows(model, flows, limits_in_force, model.flow_tolerance_w(vector))
    return ScheduleCheck(
        lines=loadings,
        violations=violations,
        injections_w=dict(zip(model.node_ids, vector.tolist(), strict=True)),
    )


# --------------------------------------------------------------------------------------------
# Clearing results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TradeFlow:
    """What the re-check needs of a trade: where the energy leaves and enters the grid."""

    seller_node_id: str
    buyer_node_id: str
    energy_wh: int


@dataclass(frozen=True, slots=True)
class ClearingToCheck:
    """A clearing result as grid_check re-checks it.

    Either `trades` or `injections_w` gives the node injections (trades win
    when both are given); `reported_flows_w` are the flows the matcher
    published, if any, compared line by line with the recomputed ones.
    """

    interval_start_s: int
    interval_s: int
    trades: tuple[TradeFlow, ...] = ()
    injections_w: Mapping[str, float] | None = None
    reported_flows_w: Mapping[str, int] | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """grid_check's verdict on one clearing result: pass, or fail naming every violation."""

    interval_start_s: int
    ok: bool
    violations: tuple[Violation, ...]
    lines: tuple[LineLoading, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "interval_start_s": self.interval_start_s,
            "ok": self.ok,
            "violations": [v.as_dict() for v in self.violations],
            "lines": [line.as_dict() for line in self.lines],
        }


def injections_from_trades(trades: Iterable[TradeFlow], interval_s: int) -> dict[str, Fraction]:
    """Net average injection per node in watts, exactly: sellers' nodes inject, buyers' nodes withdraw."""
    if interval_s <= 0:
        raise InvalidArgument(f"must be positive, got {interval_s}", field="interval_s")
    energy_wh: dict[str, int] = {}
    for row, trade in enumerate(trades):
        if trade.energy_wh < 0:
            raise InvalidArgument(
                f"must not be negative, got {trade.energy_wh}", field=f"trades[{row}].energy_wh"
            )
        energy_wh[trade.seller_node_id] = energy_wh.get(trade.seller_node_id, 0) + trade.energy_wh
        energy_wh[trade.buyer_node_id] = energy_wh.get(trade.buyer_node_id, 0) - trade.energy_wh
    return {node_id: Fraction(wh * SECONDS_PER_HOUR, interval_s) for node_id, wh in energy_wh.items()}


def recheck_clearing(model: FlowModel, limits: Mapping[str, LineLimit], clearing: ClearingToCheck) -> Verdict:
    """Recompute a clearing result's flows from its injections and judge them against the interval's limits.

    Never raises on bad content: a node the grid does not know, injections
    that do not balance or a reported line that does not exist fail the
    verdict with a violation saying so, because a wrong result must still be
    reported, not dropped.
    """
    limits_in_force = _limits_or_ratings(model, limits)
    bad: list[Violation] = []
    try:
        if clearing.trades or clearing.injections_w is None:
            exact = injections_from_trades(clearing.trades, clearing.interval_s)
            injections = {node_id: float(value) for node_id, value in exact.items()}
        else:
            injections = dict(clearing.injections_w)
        vector = model.injection_vector(injections)
    except InvalidArgument as exc:
        bad.append(Violation(line_id="", flow_w=0, capacity_w=0, message=str(exc), kind="bad_input"))
        return Verdict(clearing.interval_start_s, ok=False, violations=tuple(bad))
    flows = model.flows_w(vector)
    tolerance_w = model.flow_tolerance_w(vector)
    loadings, overloads = assess_flows(model, flows, limits_in_force, tolerance_w)
    violations = list(overloads)
    if clearing.reported_flows_w is not None:
        for line_id, reported_w in clearing.reported_flows_w.items():
            index = model.line_index.get(line_id)
            if index is None:
                violations.append(
                    Violation(
                        line_id=line_id,
                        flow_w=reported_w,
                        capacity_w=0,
                        message=f"line {line_id}: the result reports a flow on a line the grid does not have",
                        kind="unknown_line",
                    )
                )
                continue
            recomputed_w = float(flows[index])
            limit = limits_in_force[line_id]
            if abs(reported_w - recomputed_w) > FLOW_MISMATCH_TOLERANCE_W + tolerance_w:
                violations.append(
                    Violation(
                        line_id=line_id,
                        flow_w=reported_w,
                        capacity_w=limit.capacity_w,
                        message=(
                            f"line {line_id}: the result reports {reported_w} W but its trades give "
                            f"{recomputed_w:.3f} W"
                        ),
                        kind="flow_mismatch",
                        loading_pct=loading_pct(reported_w, limit.capacity_w, tolerance_w),
                    )
                )
            if abs(reported_w) > limit.capacity_w and not any(
                v.line_id == line_id and v.kind == "overload" for v in violations
            ):
                violations.append(
                    Violation(
                        line_id=line_id,
                        flow_w=reported_w,
                        capacity_w=limit.capacity_w,
                        message=_overload_message(line_id, reported_w, limit, what="reported flow"),
                        kind="overload",
                        loading_pct=loading_pct(reported_w, limit.capacity_w, tolerance_w),
                    )
                )
    return Verdict(
        interval_start_s=clearing.interval_start_s,
        ok=not violations,
        violations=tuple(violations),
        lines=loadings,
    )
