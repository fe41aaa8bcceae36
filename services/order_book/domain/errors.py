"""Errors of the order book beyond the shared domain errors."""

from __future__ import annotations

from services.domain.errors import DomainError


class Unavailable(DomainError):
    """The book could not store the request (e.g. the database failed); retrying the same request is safe."""

    status = "UNAVAILABLE"
