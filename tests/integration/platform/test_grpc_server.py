"""The platform's gRPC server maps domain errors to precise status codes, authenticates calls and counts them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, ClassVar

import grpc
import pytest

from services.domain.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
)
from services.gen.p2pgrid.common.v1 import common_pb2
from services.gen.p2pgrid.matcher.v1 import matcher_pb2, matcher_pb2_grpc
from services.platform.grpc_server import GrpcServer, Identity, current_identity
from services.platform.metrics import Metrics


class FailingMatcher(matcher_pb2_grpc.MatcherServicer):
    """Raises the domain error named by the request's grid_yaml field, or echoes the caller."""

    ERRORS: ClassVar[dict[str, DomainError]] = {
        "invalid": InvalidArgument("must be positive", field="orders[3].energy_wh"),
        "closed": FailedPrecondition("gate closed at 2026-11-21T10:10Z for interval 2026-11-21T10:15Z"),
        "busy": ResourceExhausted("too many orders per second", retry_after_s=0.25),
    }

    async def Clear(self, request: matcher_pb2.ClearRequest, context: Any) -> common_pb2.ClearingResult:
        if request.grid_yaml in self.ERRORS:
            raise self.ERRORS[request.grid_yaml]
        return common_pb2.ClearingResult(
            stats=common_pb2.SolverStats(status=current_identity().participant_id)
        )


class HeaderAuthenticator:
    def authenticate(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> Identity:
        for key, value in metadata:
            if key == "x-test-participant":
                return Identity(str(value))
        raise Unauthenticated("this call needs credentials")


async def _call(grid_yaml: str, metadata: tuple[tuple[str, str], ...]) -> tuple[Any, Any]:
    metrics = Metrics("test")
    server = GrpcServer(metrics, authenticator=HeaderAuthenticator())
    matcher_pb2_grpc.add_MatcherServicer_to_server(FailingMatcher(), server.server)
    server.add("p2pgrid.matcher.v1.Matcher")
    port = await server.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = matcher_pb2_grpc.MatcherStub(channel).Clear(
                matcher_pb2.ClearRequest(grid_yaml=grid_yaml), metadata=metadata, timeout=5
            )
            try:
                return await call, metrics
            except grpc.aio.AioRpcError as exc:
                return exc, metrics
    finally:
        await server.stop(1)


def call(grid_yaml: str, participant: str | None = "p1") -> tuple[Any, Metrics]:
    metadata = (("x-test-participant", participant),) if participant else ()
    return asyncio.run(_call(grid_yaml, metadata))


@pytest.mark.parametrize(
    ("trigger", "code", "text"),
    [
        ("invalid", grpc.StatusCode.INVALID_ARGUMENT, "orders[3].energy_wh: must be positive"),
        ("closed", grpc.StatusCode.FAILED_PRECONDITION, "gate closed"),
        ("busy", grpc.StatusCode.RESOURCE_EXHAUSTED, "too many orders"),
    ],
)
def test_a_domain_error_becomes_its_precise_status_with_the_field_named(
    trigger: str, code: grpc.StatusCode, text: str
) -> None:
    error, metrics = call(trigger)
    assert isinstance(error, grpc.aio.AioRpcError)
    assert error.code() == code and text in (error.details() or "")
    sample = metrics.registry.get_sample_value(
        "p2pgrid_grpc_requests_total", {"service": "test", "method": "Clear", "code": code.name}
    )
    assert sample == 1.0


def test_a_rate_limited_call_says_when_to_retry() -> None:
    error, _metrics = call("busy")
    assert ("retry-after-s", "0.250") in tuple(error.trailing_metadata() or ())


def test_a_call_without_credentials_is_unauthenticated_and_never_reaches_the_handler() -> None:
    error, _metrics = call("ok", participant=None)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_handler_sees_the_authenticated_identity() -> None:
    result, metrics = call("ok", participant="p-alice")
    assert result.stats.status == "p-alice"
    assert (
        metrics.registry.get_sample_value(
            "p2pgrid_grpc_request_duration_seconds_count", {"service": "test", "method": "Clear"}
        )
        == 1.0
    )
