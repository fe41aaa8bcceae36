"""Domain errors every service raises; the gRPC layer maps each to one precise status code.

The domain never imports grpc: these classes carry the status name as plain
text, and `services.platform.grpc_server` translates them.
"""

from __future__ import annotations


class DomainError(Exception):
    """Base of the errors a request can end in; `status` is a gRPC status code name."""

    status = "INTERNAL"

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class InvalidArgument(DomainError, ValueError):
    """A request field breaks a rule; `field` names it."""

    status = "INVALID_ARGUMENT"


class NotFound(DomainError):
    """No such thing, or not one the caller may see."""

    status = "NOT_FOUND"


class AlreadyExists(DomainError):
    """The id exists with a different body."""

    status = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    """The request is well-formed but the state forbids it (e.g. after gate closure)."""

    status = "FAILED_PRECONDITION"


class Unauthenticated(DomainError):
    """Missing, expired or forged credentials."""

    status = "UNAUTHENTICATED"


class PermissionDenied(DomainError):
    """Authenticated, but not allowed to do this."""

    status = "PERMISSION_DENIED"


class ResourceExhausted(DomainError):
    """A rate or size limit; `retry_after_s` says when to try again."""

    status = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, field: str = "", retry_after_s: float = 0.0) -> None:
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s


class InvariantViolation(RuntimeError):
    """A broken invariant (e.g. the ledger does not balance): the process must stop loudly."""
