"""Request planning: pack the fields of one poll into as few Modbus reads as the meter allows.

Each read covers one function code, starts and counts in multiples of the
map's alignment (Eastron: even), holds at most `max_registers_per_request`
registers and skips at most `max_gap_registers` unread registers between two
fields (some meters refuse reads across undefined addresses). Within those
rules the greedy sweep (open a read at the first uncovered field, extend it
while the next field still fits) needs the fewest reads: any plan must open a
read at or before the first field, and no read starting there reaches further.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.meter_ingest.domain.register_map import Field, Transport


@dataclass(frozen=True, slots=True, order=True)
class ReadRequest:
    """One Modbus read: function 3 or 4, 0-based start address and register count."""

    function: int
    address: int
    count: int

    @property
    def end(self) -> int:
        return self.address + self.count

    def covers(self, f: Field) -> bool:
        return f.function == self.function and self.address <= f.address and f.end <= self.end


class PlanError(ValueError):
    """Fields that no read can cover under the transport's rules."""


def _align_down(value: int, alignment: int) -> int:
    return value - value % alignment


def _align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def plan_reads(
    fields: Iterable[Field],
    transport: Transport,
    *,
    max_gap_registers: int | None = None,
) -> list[ReadRequest]:
    """The fewest reads that cover every field; `max_gap_registers` overrides the map's value."""
    alignment = transport.alignment
    max_count = transport.max_registers_per_request
    max_gap = transport.max_gap_registers if max_gap_registers is None else max_gap_registers
    by_function: dict[int, list[tuple[int, int]]] = {}
    for f in fields:
        by_function.setdefault(f.function, []).append((f.address, f.end))
    requests: list[ReadRequest] = []
    for function in sorted(by_function):
        spans = sorted(set(by_function[function]))
        start = end = -1
        for lo, hi in spans:
            if _align_up(hi, alignment) - _align_down(lo, alignment) > max_count:
                raise PlanError(
                    f"fc{function} registers {lo}..{hi - 1} cannot be read in {max_count}-register reads "
                    f"aligned to {alignment}"
                )
            if start >= 0:
                new_end = max(end, hi)
                fits = _align_up(new_end, alignment) - start <= max_count
                if fits and lo - end <= max_gap:
                    end = new_end
                    continue
                requests.append(_request(function, start, end, alignment))
            start, end = _align_down(lo, alignment), hi
        if start >= 0:
            requests.append(_request(function, start, end, alignment))
    return requests


def _request(function: int, start: int, end: int, alignment: int) -> ReadRequest:
    stop = min(_align_up(end, alignment), 65536)
    return ReadRequest(function, start, stop - start)


def split_per_field(fields: Iterable[Field], transport: Transport) -> list[ReadRequest]:
    """One aligned read per field: the fallback when a packed read is refused (exception 2)."""
    return plan_reads(fields, transport, max_gap_registers=-1)
