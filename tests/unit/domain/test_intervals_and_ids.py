"""Intervals align to their length, simulated clocks run fast, and ids sort by creation time."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.domain.ids import new_id, participant_id_from_public_key
from services.domain.intervals import Interval, SimulatedClock


def test_an_interval_must_start_on_its_own_grid() -> None:
    with pytest.raises(ValueError, match="not aligned"):
        Interval(1_000, 900)
    interval = Interval.containing(1_767_225_601)
    assert interval.start_s == 1_767_225_600 and interval.end_s == 1_767_226_500
    assert interval.gate_closure_s() == 1_767_225_300
    assert interval.next().start_s == interval.end_s


def test_a_simulated_clock_runs_speedup_times_faster_than_the_wall() -> None:
    clock = SimulatedClock(start_s=1_000_000.0, speedup=600.0, anchor_wall_s=time.time())
    t0 = clock.now_s()
    asyncio.run(clock.sleep_until(t0 + 60))  # one simulated minute: 0.1 s of wall time
    assert clock.now_s() >= t0 + 60
    assert clock.now_s() < t0 + 60 + 600 * 0.5


def test_ids_made_in_a_row_sort_in_creation_order_and_never_repeat() -> None:
    ids = [new_id() for _ in range(20_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_a_participant_id_is_derived_from_its_public_key() -> None:
    assert participant_id_from_public_key(bytes(32)) == participant_id_from_public_key(bytes(32))
    assert participant_id_from_public_key(bytes(32)) != participant_id_from_public_key(b"\x01" + bytes(31))
    with pytest.raises(ValueError, match="32 bytes"):
        participant_id_from_public_key(b"short")


def test_a_simulated_clock_without_an_anchor_starts_when_it_is_made_and_then_runs() -> None:
    clock = SimulatedClock(start_s=5_000.0, speedup=1_000.0)
    assert 5_000.0 <= clock.now_s() < 5_000.0 + 1_000.0
    time.sleep(0.05)
    assert clock.now_s() >= 5_000.0 + 40.0
