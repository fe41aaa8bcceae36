"""Translations between grid_check's domain values and its protobuf messages, in one place."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from services.domain.errors import InvalidArgument
from services.gen.p2pgrid.common.v1 import common_pb2
from services.gen.p2pgrid.gridcheck.v1 import grid_check_pb2 as pb
from services.grid_check.domain.checks import (
    ClearingToCheck,
    LineLoading,
    ScheduleCheck,
    TradeFlow,
    Violation,
)
from services.grid_check.domain.limits import LimitRequest, LineLimit
from services.grid_check.domain.live import LiveState


def limits_to_proto(interval_start_s: int, limits: Mapping[str, LineLimit]) -> pb.Limits:
    return pb.Limits(
        interval_start_s=interval_start_s,
        lines=[
            pb.LineLimit(line_id=limit.line_id, capacity_w=limit.capacity_w, reason=limit.reason)
            for limit in limits.values()
        ],
    )


def limit_requests_from_proto(lines: Iterable[pb.LineLimit]) -> list[LimitRequest]:
    return [LimitRequest(line.line_id, line.capacity_w, line.reason) for line in lines]


def loading_to_proto(line: LineLoading) -> pb.LineLoading:
    return pb.LineLoading(
        line_id=line.line_id,
        flow_w=line.flow_w_rounded,
        loading_pct=line.loading_pct,
        capacity_w=line.capacity_w,
        reason=line.reason,
    )


def violation_to_proto(violation: Violation) -> pb.Violation:
    return pb.Violation(
        line_id=violation.line_id,
        flow_w=violation.flow_w,
        capacity_w=violation.capacity_w,
        message=violation.message,
        kind=violation.kind,
        loading_pct=violation.loading_pct,
    )


def injections_to_proto(injections_w: Mapping[str, float]) -> list[pb.NodeInjection]:
    return [
        pb.NodeInjection(node_id=node_id, injection_w=round(value_w))
        for node_id, value_w in injections_w.items()
    ]


def injections_from_proto(injections: Iterable[pb.NodeInjection]) -> dict[str, int]:
    """Injections per node; a node named twice is an error, not a sum."""
    result: dict[str, int] = {}
    for row, injection in enumerate(injections):
        if injection.node_id in result:
            raise InvalidArgument(f"{injection.node_id!r} appears twice", field=f"injections[{row}].node_id")
        result[injection.node_id] = injection.injection_w
    return result


def schedule_check_to_proto(check: ScheduleCheck) -> pb.ScheduleCheck:
    return pb.ScheduleCheck(
        lines=[loading_to_proto(line) for line in check.lines],
        violations=[violation_to_proto(v) for v in check.violations],
        injections=injections_to_proto(check.injections_w),
    )


def live_state_to_proto(state: LiveState, *, interval_start_s: int, fresh_meters: int) -> pb.LiveState:
    return pb.LiveState(
        as_of_s=int(state.as_of_s),
        injections=injections_to_proto(state.injections_w),
        lines=[loading_to_proto(line) for line in state.lines],
        violations=[violation_to_proto(v) for v in state.violations],
        interval_start_s=interval_start_s,
        fresh_meters=fresh_meters,
    )


def clearing_from_proto(result: common_pb2.ClearingResult, *, default_interval_s: int) -> ClearingToCheck:
    """What the re-check needs of a clearing result: its interval, its trades and the flows it reported."""
    return ClearingToCheck(
        interval_start_s=result.interval.start_s,
        interval_s=result.interval.length_s or default_interval_s,
        trades=tuple(
            TradeFlow(
                seller_node_id=trade.seller_node_id,
                buyer_node_id=trade.buyer_node_id,
                energy_wh=trade.energy_wh,
            )
            for trade in result.trades
        ),
        reported_flows_w={line.line_id: line.flow_w for line in result.lines} if result.lines else None,
    )
