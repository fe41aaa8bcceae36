"""The gRPC server every service runs: health, reflection, graceful stop, and one interceptor for errors, auth and metrics.

Handlers only translate: they raise `services.domain.errors.DomainError`
subclasses and the interceptor maps each to its precise status code. The auth
hook authenticates every call (except health and reflection) from its
metadata and makes the identity available to handlers through
`current_identity()`; handlers never take the acting participant from a
request field.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from services.domain.errors import DomainError, ResourceExhausted, Unauthenticated
from services.platform.metrics import Metrics

log = logging.getLogger(__name__)

_STATUS = {code.name: code for code in grpc.StatusCode}

# Methods that never need credentials.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling: a participant id, and whether it acts as the grid or market operator."""

    participant_id: str
    operator: bool = False


_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("p2pgrid_identity", default=None)


def current_identity() -> Identity:
    """The authenticated caller of the current RPC; UNAUTHENTICATED when there is none."""
    identity = _identity.get()
    if identity is None:
        raise Unauthenticated("this call needs credentials")
    return identity


def optional_identity() -> Identity | None:
    return _identity.get()


class Authenticator(Protocol):
    """Turns a call's metadata into an Identity, or raises Unauthenticated."""

    def authenticate(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> Identity | None: ...


def status_of(exc: DomainError) -> grpc.StatusCode:
    return _STATUS.get(exc.status, grpc.StatusCode.INTERNAL)


class PlatformInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Maps domain errors to status codes, authenticates, and records request metrics."""

    def __init__(self, metrics: Metrics, authenticator: Authenticator | None) -> None:
        self.metrics = metrics
        self.authenticator = authenticator
        self._requests = metrics.counter("p2pgrid_grpc_requests_total")
        self._latency = metrics.histogram("p2pgrid_grpc_request_duration_seconds")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        # The stubs type method handlers loosely; they are handled as Any here.
        handler: Any = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        short = method.rsplit("/", 1)[-1]
        metadata = tuple(details.invocation_metadata or ())

        def _authenticate() -> None:
            identity = None
            if self.authenticator is not None:
                identity = self.authenticator.authenticate(method, metadata)
            _identity.set(identity)

        async def _fail(context: grpc.aio.ServicerContext[Any, Any], exc: DomainError) -> None:
            code = status_of(exc)
            if isinstance(exc, ResourceExhausted) and exc.retry_after_s > 0:
                context.set_trailing_metadata((("retry-after-s", f"{exc.retry_after_s:.3f}"),))
            await context.abort(code, str(exc))

        def _record(code: str, started: float) -> None:
            self._requests.labels(service=self.metrics.service, method=short, code=code).inc()
            self._latency.labels(service=self.metrics.service, method=short).observe(
                time.perf_counter() - started
            )

        if handler.unary_unary is not None or handler.stream_unary is not None:
            inner: Any = handler.unary_unary or handler.stream_unary

            async def unary_response(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                started = time.perf_counter()
                code = "OK"
                try:
                    _authenticate()
                    return await inner(request, context)
                except DomainError as exc:
                    code = exc.status
                    await _fail(context, exc)
                except Exception as exc:
                    code = _code_of(context, exc)
                    raise
                finally:
                    _record(code, started)

            factory = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary is not None
                else grpc.stream_unary_rpc_method_handler
            )
            return factory(
                unary_response,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        inner_stream: Any = handler.unary_stream or handler.stream_stream

        async def stream_response(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            started = time.perf_counter()
            code = "OK"
            try:
                _authenticate()
                async for item in inner_stream(request, context):
                    yield item
            except DomainError as exc:
                code = exc.status
                await _fail(context, exc)
            except Exception as exc:
                code = _code_of(context, exc)
                raise
            finally:
                _record(code, started)

        factory = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream is not None
            else grpc.stream_stream_rpc_method_handler
        )
        return factory(
            stream_response,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _code_of(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> str:
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(exc, grpc.aio.AbortError):
        return "ABORTED"
    log.exception("unhandled error in an RPC")
    return "INTERNAL"


class GrpcServer:
    """A grpc.aio server with health and reflection; `serving()` and `stop()` flip the health status."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        authenticator: Authenticator | None = None,
        max_message_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self._interceptor = PlatformInterceptor(metrics, authenticator)
        self.server = grpc.aio.server(
            interceptors=[self._interceptor],
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names: list[str] = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        self.port = 0

    def set_authenticator(self, authenticator: Authenticator | None) -> None:
        self._interceptor.authenticator = authenticator

    def add(self, full_service_name: str) -> None:
        """Declare a service already added to `self.server` (for health and reflection)."""
        self.service_names.append(full_service_name)

    async def start(self, host: str, port: int) -> int:
        reflection.enable_server_reflection([*self.service_names, reflection.SERVICE_NAME], self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind gRPC to {host}:{port}")
        await self.server.start()
        await self.set_status(health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def set_status(self, status: int) -> None:
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        """Stop accepting calls and let in-flight ones finish for up to `grace_s`."""
        await self.set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace_s)
