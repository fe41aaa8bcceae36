"""The GridCheck gRPC service: each method translates its message, calls the domain and translates back.

Only operators set limits: the caller's identity comes from its call token,
never from a request field. Read calls may be anonymous when the service
allows public reads; a token that is sent is verified all the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.domain.errors import InvalidArgument, PermissionDenied
from services.domain.grid import Grid, grid_to_dict
from services.domain.intervals import Interval
from services.gen.p2pgrid.gridcheck.v1 import grid_check_pb2 as pb
from services.gen.p2pgrid.gridcheck.v1 import grid_check_pb2_grpc as pb_grpc
from services.grid_check.adapters.convert import (
    injections_from_proto,
    limit_requests_from_proto,
    limits_to_proto,
    live_state_to_proto,
    schedule_check_to_proto,
)
from services.grid_check.adapters.limit_store import LimitBook
from services.grid_check.adapters.live_view import LiveView
from services.grid_check.domain.checks import check_schedule
from services.grid_check.domain.gridfile import dump_grid_yaml
from services.grid_check.domain.network import FlowModel
from services.platform.auth import AUTH_HEADER, TokenAuthenticator
from services.platform.grpc_server import Identity, current_identity

SERVICE_NAME = "p2pgrid.gridcheck.v1.GridCheck"
SET_LIMITS_METHOD = f"/{SERVICE_NAME}/SetLimits"


class GridCheckAuthenticator:
    """Tokens for every call, except that read calls without any credentials pass as anonymous when allowed."""

    def __init__(self, tokens: TokenAuthenticator, *, public_reads: bool) -> None:
        self.tokens = tokens
        self.public_reads = public_reads

    def authenticate(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> Identity | None:
        sent = any(key.lower() == AUTH_HEADER for key, _value in metadata)
        if not sent and self.public_reads and method != SET_LIMITS_METHOD:
            return None
        return self.tokens.authenticate(method, metadata)


class GridCheckServicer(pb_grpc.GridCheckServicer):
    """GridCheck over one grid, its limit book and its live view."""

    def __init__(
        self, *, grid: Grid, model: FlowModel, book: LimitBook, live: LiveView, interval_s: int
    ) -> None:
        self.model = model
        self.book = book
        self.live = live
        self.interval_s = interval_s
        # The network never changes while the service runs: build its answer once.
        self._network = pb.Network(
            grid_yaml=dump_grid_yaml(grid_to_dict(grid)),
            node_ids=model.node_ids,
            line_ids=model.line_ids,
            slack_node_id=model.slack,
        )

    def _interval(self, start_s: int, field: str) -> int:
        try:
            return Interval(start_s, self.interval_s).start_s
        except ValueError as exc:
            raise InvalidArgument(str(exc), field=field) from None

    async def GetNetwork(self, request: pb.GetNetworkRequest, context: Any) -> pb.Network:
        return self._network

    async def GetLimits(self, request: pb.GetLimitsRequest, context: Any) -> pb.Limits:
        start_s = self._interval(request.interval_start_s, "interval_start_s")
        return limits_to_proto(start_s, self.book.limits_for(start_s))

    async def SetLimits(self, request: pb.SetLimitsRequest, context: Any) -> pb.Limits:
        identity = current_identity()
        if not identity.operator:
            raise PermissionDenied(
                f"{identity.participant_id} is not a grid operator; only operators set limits"
            )
        start_s = self._interval(request.interval_start_s, "interval_start_s")
        until_s: int | None
        if request.open_ended:
            if request.until_interval_start_s:
                raise InvalidArgument("must be 0 when open_ended is set", field="until_interval_start_s")
            until_s = None
        else:
            until_s = request.until_interval_start_s or start_s + self.interval_s
        limits = await self.book.set(
            start_s=start_s,
            until_s=until_s,
            requests=limit_requests_from_proto(request.lines),
            set_by=identity.participant_id,
        )
        return limits_to_proto(start_s, limits)

    async def CheckSchedule(self, request: pb.CheckScheduleRequest, context: Any) -> pb.ScheduleCheck:
        start_s = self._interval(request.interval_start_s, "interval_start_s")
        check = check_schedule(
            self.model,
            injections_from_proto(request.injections),
            self.book.limits_for(start_s),
            slack_balances=request.slack_balances,
        )
        return schedule_check_to_proto(check)

    async def GetLiveState(self, request: pb.GetLiveStateRequest, context: Any) -> pb.LiveState:
        state, interval_start_s, fresh_meters = self.live.current()
        return live_state_to_proto(state, interval_start_s=interval_start_s, fresh_meters=fresh_meters)
