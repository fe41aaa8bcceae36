"""Protobuf events to and from the ledger's domain values: clearing results and interval energy in, checkpoints and settlements out."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from services.gen.p2pgrid.events.v1 import events_pb2
from services.ledger.domain.checkpoint import Checkpoint
from services.ledger.domain.outcomes import SettlementOutcome
from services.ledger.domain.settlement import (
    AcceptedEnergy,
    ClearingResult,
    MeterQuality,
    MeterReading,
    Trade,
)

PRODUCER = "ledger"

_QUALITY = {
    events_pb2.ENERGY_FLAG_MEASURED: MeterQuality.MEASURED,
    # Interpolated and estimated values come from the metering service's validation, editing and
    # estimation; measured data arriving later replaces them (and corrects the settlement).
    events_pb2.ENERGY_FLAG_INTERPOLATED: MeterQuality.ESTIMATED,
    events_pb2.ENERGY_FLAG_ESTIMATED: MeterQuality.ESTIMATED,
}


class EventError(ValueError):
    """An event the ledger cannot read; the message names the field and the rule it broke."""


@dataclass(frozen=True, slots=True)
class ClearingEvent:
    event_id: str
    clearing: ClearingResult
    self_trades_left_out: int
    """Trades of a participant with itself, which settle nothing and are not booked (see `clearing_event`)."""


@dataclass(frozen=True, slots=True)
class EnergyEvent:
    event_id: str
    interval_start_s: int
    readings: tuple[MeterReading, ...]
    unassigned_meters: int
    """Meters without a participant (e.g. feeder meters): nobody to settle them with."""


def clearing_event(data: bytes, market_id: str) -> ClearingEvent:
    """Read a ClearingResultEvent into the clearing result that settlement needs.

    Each participant's accepted energy is the sum of its trades (the matcher's
    trades sum per order to its accepted energy). A trade whose buyer and
    seller are the same participant (its own buy and sell orders matched) is
    left out: the participant pays and is paid the same energy, at the one
    price of its node, and uses no line, so it books nothing.
    """
    try:
        event = events_pb2.ClearingResultEvent.FromString(data)
    except DecodeError as exc:
        raise EventError(f"not a ClearingResultEvent: {exc}") from None
    if not event.HasField("result"):
        raise EventError("result: is required")
    result = event.result
    if result.interval.length_s <= 0:
        raise EventError(f"result.interval.length_s must be positive, got {result.interval.length_s}")
    prices: dict[str, int] = {}
    for i, node in enumerate(result.nodes):
        if node.node_id in prices:
            raise EventError(f"result.nodes[{i}]: node {node.node_id!r} has two prices")
        prices[node.node_id] = node.price_micro_per_kwh
    trades = []
    self_trades = 0
    bought: dict[str, int] = {}
    sold: dict[str, int] = {}
    for t in result.trades:
        if t.buyer_participant_id == t.seller_participant_id and t.buyer_node_id == t.seller_node_id:
            self_trades += 1
            continue
        trades.append(
            Trade(
                buyer_id=t.buyer_participant_id,
                buyer_node=t.buyer_node_id,
                seller_id=t.seller_participant_id,
                seller_node=t.seller_node_id,
                energy_wh=t.energy_wh,
            )
        )
        bought[t.buyer_participant_id] = bought.get(t.buyer_participant_id, 0) + t.energy_wh
        sold[t.seller_participant_id] = sold.get(t.seller_participant_id, 0) + t.energy_wh
    accepted = tuple(
        AcceptedEnergy(p, bought.get(p, 0), sold.get(p, 0)) for p in sorted(bought.keys() | sold.keys())
    )
    clearing = ClearingResult(
        market_id=market_id,
        interval_start_s=result.interval.start_s,
        node_prices_micro_per_kwh=prices,
        trades=tuple(trades),
        accepted=accepted,
        interval_s=result.interval.length_s,
    )
    return ClearingEvent(event.header.event_id, clearing, self_trades)


def energy_event(data: bytes) -> EnergyEvent:
    """Read an IntervalEnergy event (one batch of an interval's meters) into meter readings."""
    try:
        event = events_pb2.IntervalEnergy.FromString(data)
    except DecodeError as exc:
        raise EventError(f"not an IntervalEnergy event: {exc}") from None
    if not event.HasField("interval"):
        raise EventError("interval: is required")
    readings = []
    unassigned = 0
    for i, m in enumerate(event.meters):
        if not m.meter_id:
            raise EventError(f"meters[{i}].meter_id: is required")
        if not m.participant_id:
            unassigned += 1
            continue
        quality = _QUALITY.get(m.flag)
        if quality is None:
            raise EventError(
                f"meters[{i}].flag must be ENERGY_FLAG_MEASURED, _INTERPOLATED or _ESTIMATED, got {m.flag}"
            )
        readings.append(MeterReading(m.meter_id, m.participant_id, m.import_wh, m.export_wh, quality))
    return EnergyEvent(event.header.event_id, event.interval.start_s, tuple(readings), unassigned)


def settled_event_id(outcome: SettlementOutcome) -> str:
    return f"ledger-settled-{outcome.interval_start_s}-r{outcome.revision}"


def checkpoint_event_id(checkpoint: Checkpoint) -> str:
    return f"ledger-checkpoint-{checkpoint.tree_size}"


def settled_event(
    outcome: SettlementOutcome, traded_amount_nano: int, emitted_at_ms: int
) -> events_pb2.IntervalSettled:
    """The notice of one settlement revision: `transfers` it booked, `traded_amount_nano` paid for trades."""
    return events_pb2.IntervalSettled(
        header=events_pb2.EventHeader(
            event_id=settled_event_id(outcome), emitted_at_ms=emitted_at_ms, producer=PRODUCER
        ),
        interval_start_s=outcome.interval_start_s,
        transfers=outcome.transfer_count,
        traded_amount_nano=traded_amount_nano,
    )


def checkpoint_event(
    checkpoint: Checkpoint, interval_start_s: int, emitted_at_ms: int
) -> events_pb2.CheckpointEvent:
    return events_pb2.CheckpointEvent(
        header=events_pb2.EventHeader(
            event_id=checkpoint_event_id(checkpoint), emitted_at_ms=emitted_at_ms, producer=PRODUCER
        ),
        interval_start_s=interval_start_s,
        tree_size=checkpoint.tree_size,
        root_hash=checkpoint.root_hash,
        signature=checkpoint.signature,
    )
