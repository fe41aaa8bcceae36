"""A meter reading: one poll's (or one pushed message's) decoded values with their time and status."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from services.meter_ingest.domain.quantities import Number, QuantityValue


class MeterStatus(StrEnum):
    """Whether the poller currently reaches the meter."""

    ONLINE = "online"
    # Several polls in a row got no answer; the meter is polled with back-off.
    OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class MeterReading:
    """Decoded values of one meter at one instant, every value valid or flagged with its reason.

    `read_at_s` is when the meter was read (Unix seconds on the service's
    clock, or the meter's own clock for pushed readings); `received_at_s` is
    when ingest got it, which validation compares for clock skew.
    """

    meter_id: str
    read_at_s: float
    values: Mapping[str, QuantityValue]
    status: MeterStatus = MeterStatus.ONLINE
    error: str = ""
    received_at_s: float | None = None
    sequence: int = 0
    notes: tuple[str, ...] = field(default=())

    def value(self, name: str) -> Number | None:
        """The valid value of `name`, or None when it is absent or flagged."""
        quantity = self.values.get(name)
        return quantity.value if quantity is not None and quantity.ok else None

    def valid_values(self) -> dict[str, Number]:
        return {name: q.value for name, q in self.values.items() if q.ok and q.value is not None}

    def invalid_values(self) -> dict[str, str]:
        return {name: q.quality.value for name, q in self.values.items() if not q.ok}

    def to_json_dict(self) -> dict[str, Any]:
        """Canonical quantities at the top level; flagged ones under `invalid` with their reason, never 0."""
        body: dict[str, Any] = {"meter_id": self.meter_id, "read_at_s": self.read_at_s}
        body.update(self.valid_values())
        invalid = self.invalid_values()
        if invalid:
            body["invalid"] = invalid
        body["status"] = self.status.value
        if self.error:
            body["error"] = self.error
        return body
