"""Settlement of one delivery interval: from a clearing result and metered energy to ledger transfers.

Rules (each amount is exact: energy_wh × price_micro_per_kwh = amount_nano):

- Trades, at node prices. For every bilateral trade the buyer pays the market
  `energy_wh × price(buyer node)` (code `trade.purchase`) and the market pays
  the seller `energy_wh × price(seller node)` (`trade.sale`). Trades of the
  same buyer, seller and nodes in one interval are settled as one. A
  participant may trade with itself between two of its nodes (it pays at one
  node's price and is paid at the other's), never at one node.
- Congestion rent. What the market keeps, Σ purchases − Σ sales, goes to the
  grid operator (`congestion_rent`; the other way if negative), so the market
  account is back at zero after every interval.
- Grid fees. Per Wh traded, paid by the buyer (or the seller, per the rules)
  to the grid operator (`grid_fee`), at the same-node rate when both sides
  are at one node, the same-feeder rate when both nodes are on one feeder,
  else the full rate. The utility pays no grid fee.
- Deviations. Each participant's metered net energy (import − export) is
  compared with its contracted net energy (bought − sold). A shortfall is
  bought from the utility at the retail tariff, a surplus sold to the utility
  at the feed-in tariff (`deviation`).
- Missing meter data is settled on an estimate (by default: as contracted, so
  no deviation) and the transfers are flagged FLAG_ESTIMATED. When measured
  data arrives, the interval is settled again as a new revision that books
  only the differences, as correcting transfers (FLAG_CORRECTION).

Transfer ids are derived from (market, interval, revision, rule, parties),
so settling the same interval from the same inputs always yields the same
transfers, and a settlement that is repeated changes nothing.

Meter data for an interval only ever improves: missing < estimated <
measured. A delivery of lower or equal quality than what was settled is
ignored (redeliveries in any order are harmless); measured data that
contradicts earlier measured data is a conflict and is refused.
"""

from __future__ import annotations

import hashlib
import json
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import IntEnum, StrEnum
from typing import Any, NamedTuple

import yaml

from services.domain.intervals import DEFAULT_INTERVAL_S, Interval
from services.ledger.domain.hashing import compact_json, native, short_hex_digests
from services.ledger.domain.ledger import (
    ACCOUNT_NAME_PATTERN,
    FLAG_CORRECTION,
    FLAG_ESTIMATED,
    MAX_AMOUNT_NANO,
    AccountKind,
    LedgerError,
    Transfer,
    account_id,
)

NODE_PATTERN = r"[A-Za-z0-9._\-]{1,64}"
_NODE_RE = re.compile(NODE_PATTERN)
_NAME_RE = re.compile(ACCOUNT_NAME_PATTERN)
METER_ID_PATTERN = r"[A-Za-z0-9._:\-]{1,100}"
_METER_RE = re.compile(METER_ID_PATTERN)
MAX_ENERGY_WH = 10**12
MAX_PRICE_MICRO_PER_KWH = 10**9

CODE_PURCHASE = "trade.purchase"
CODE_SALE = "trade.sale"
CODE_GRID_FEE = "grid_fee"
CODE_CONGESTION_RENT = "congestion_rent"
CODE_DEVIATION = "deviation"


class SettlementInputError(ValueError):
    """Settlement input that breaks a rule; the message names the field or row and the rule."""


class SettlementConflictError(LedgerError, ValueError):
    """Input that contradicts what was already settled for the interval (another clearing, other measured data)."""


class RulesError(ValueError):
    """Settlement rules that cannot be used; the message names the field."""


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class Trade:
    """A bilateral match of the clearing: `energy_wh` from the seller (at its node) to the buyer (at its node)."""

    buyer_id: str
    buyer_node: str
    seller_id: str
    seller_node: str
    energy_wh: int


@dataclass(frozen=True, slots=True)
class AcceptedEnergy:
    """What one participant's orders got in the clearing, in total."""

    participant_id: str
    bought_wh: int
    sold_wh: int


@dataclass(frozen=True, slots=True)
class ClearingResult:
    """The part of a clearing result that settlement needs."""

    market_id: str
    interval_start_s: int
    node_prices_micro_per_kwh: Mapping[str, int]
    trades: tuple[Trade, ...]
    accepted: tuple[AcceptedEnergy, ...]
    interval_s: int = DEFAULT_INTERVAL_S

    def digest(self) -> str:
        """SHA-256 (hex) of a canonical form that does not depend on the order of rows."""
        canonical = {
            "market_id": self.market_id,
            "interval_start_s": self.interval_start_s,
            "interval_s": self.interval_s,
            "node_prices": sorted(self.node_prices_micro_per_kwh.items()),
            "trades": sorted(
                (t.buyer_id, t.buyer_node, t.seller_id, t.seller_node, t.energy_wh) for t in self.trades
            ),
            "accepted": sorted((a.participant_id, a.bought_wh, a.sold_wh) for a in self.accepted),
        }
        return hashlib.sha256(compact_json(canonical)).hexdigest()


class MeterQuality(IntEnum):
    """How good a participant's interval energy is; settlement only ever moves up this scale."""

    MISSING = 0
    """Nothing arrived by the metering deadline: the ledger's own estimate."""
    ESTIMATED = 1
    """Estimated by the metering service (validation, editing and estimation)."""
    MEASURED = 2


@dataclass(frozen=True, slots=True)
class MeterEnergy:
    """A participant's metered energy in one interval, import and export separately."""

    participant_id: str
    import_wh: int
    export_wh: int
    quality: MeterQuality = MeterQuality.MEASURED


@dataclass(frozen=True, slots=True)
class MeterReading:
    """One meter's energy in one interval, as the metering service reports it.

    A participant may have several meters; its interval energy is the sum over
    its meters, and its quality the worst of theirs (`participant_energy`).
    """

    meter_id: str
    participant_id: str
    import_wh: int
    export_wh: int
    quality: MeterQuality = MeterQuality.MEASURED


@dataclass(frozen=True, slots=True)
class SettlementInputs:
    clearing: ClearingResult
    meter_energy: tuple[MeterEnergy, ...]

    @property
    def market_id(self) -> str:
        return self.clearing.market_id

    @property
    def interval_start_s(self) -> int:
        return self.clearing.interval_start_s

    def to_json(self) -> dict[str, Any]:
        """The recorded form: plain JSON with integer units."""
        return {
            **clearing_to_json(self.clearing),
            "meter_energy": [
                [m.participant_id, m.import_wh, m.export_wh, m.quality.name.lower()]
                for m in self.meter_energy
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SettlementInputs:
        """Parse the recorded form; raises SettlementInputError naming the field."""
        try:
            meter = tuple(
                MeterEnergy(p, i, e, MeterQuality[str(q).upper()]) for p, i, e, q in data["meter_energy"]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SettlementInputError(f"recorded settlement input: {exc!r}") from exc
        inputs = cls(clearing_from_json(data), meter)
        validate_inputs(inputs)
        return inputs


def clearing_to_json(c: ClearingResult) -> dict[str, Any]:
    return {
        "market_id": c.market_id,
        "interval_start_s": c.interval_start_s,
        "interval_s": c.interval_s,
        "node_prices_micro_per_kwh": dict(sorted(c.node_prices_micro_per_kwh.items())),
        "trades": [[t.buyer_id, t.buyer_node, t.seller_id, t.seller_node, t.energy_wh] for t in c.trades],
        "accepted": [[a.participant_id, a.bought_wh, a.sold_wh] for a in c.accepted],
    }


def clearing_from_json(data: Mapping[str, Any]) -> ClearingResult:
    """Parse the recorded form of a clearing result (not validated: see validate_inputs)."""
    try:
        return ClearingResult(
            market_id=data["market_id"],
            interval_start_s=data["interval_start_s"],
            interval_s=data.get("interval_s", DEFAULT_INTERVAL_S),
            node_prices_micro_per_kwh=dict(data["node_prices_micro_per_kwh"]),
            trades=tuple(Trade(*row) for row in data["trades"]),
            accepted=tuple(AcceptedEnergy(*row) for row in data["accepted"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SettlementInputError(f"recorded clearing result: {exc!r}") from exc


def _check_int(value: object, where: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise SettlementInputError(f"{where} must be an integer from {low} to {high}, got {value!r}")
    return value


def validate_inputs(inputs: SettlementInputs) -> None:
    """Raise SettlementInputError for the first row that breaks a rule, naming it."""
    validate_interval(inputs.clearing)
    validate_rows(inputs)


def validate_interval(c: ClearingResult) -> None:
    """The part of `validate_inputs` that checks the clearing result's market, interval and node prices."""
    if not isinstance(c.market_id, str) or not _NAME_RE.fullmatch(c.market_id):
        raise SettlementInputError(f"clearing.market_id {c.market_id!r} must match {ACCOUNT_NAME_PATTERN}")
    _check_int(c.interval_s, "clearing.interval_s", 1, 86_400)
    _check_int(c.interval_start_s, "clearing.interval_start_s", 0, 2**62)
    try:
        Interval(c.interval_start_s, c.interval_s)
    except ValueError as exc:
        raise SettlementInputError(f"clearing.interval_start_s: {exc}") from exc
    for node, price in c.node_prices_micro_per_kwh.items():
        if not isinstance(node, str) or not _NODE_RE.fullmatch(node):
            raise SettlementInputError(f"clearing.node_prices: node {node!r} must match {NODE_PATTERN}")
        _check_int(price, f"clearing.node_prices[{node}]", -MAX_PRICE_MICRO_PER_KWH, MAX_PRICE_MICRO_PER_KWH)


def validate_rows(inputs: SettlementInputs) -> None:
    """The part of `validate_inputs` that checks trades, accepted energy and meter energy row by row
    (given a clearing result that passes `validate_interval`)."""
    c = inputs.clearing
    if _native_rows_pass is not None and _native_rows_pass(
        c.trades,
        c.accepted,
        inputs.meter_energy,
        c.node_prices_micro_per_kwh,
        MAX_ENERGY_WH,
        MeterQuality.MEASURED,
        MeterQuality.ESTIMATED,
    ):
        return  # every row passes the checks below, made in compiled code
    names: set[str] = set()

    def valid(name: object) -> bool:
        if isinstance(name, str) and _NAME_RE.fullmatch(name):
            names.add(name)
            return True
        return False

    # Each row is checked with one cheap condition; only a row that fails is examined again,
    # to name the field and the rule it broke.
    prices = c.node_prices_micro_per_kwh
    bought: dict[str, int] = {}
    sold: dict[str, int] = {}
    for i, t in enumerate(c.trades):
        buyer, seller, energy_wh = t.buyer_id, t.seller_id, t.energy_wh
        if not (
            type(buyer) is str
            and (buyer in names or valid(buyer))
            and type(seller) is str
            and (seller in names or valid(seller))
            and (buyer != seller or t.buyer_node != t.seller_node)
            and t.buyer_node in prices
            and t.seller_node in prices
            and type(energy_wh) is int
            and 1 <= energy_wh <= MAX_ENERGY_WH
        ):
            _explain_trade(f"clearing.trades[{i}]", t, prices)
        bought[buyer] = bought.get(buyer, 0) + energy_wh
        sold[seller] = sold.get(seller, 0) + energy_wh
    seen: set[str] = set()
    for i, a in enumerate(c.accepted):
        pid = a.participant_id
        if not (
            type(pid) is str
            and (pid in names or valid(pid))
            and pid not in seen
            and type(a.bought_wh) is int
            and type(a.sold_wh) is int
            and a.bought_wh == bought.get(pid, 0)
            and a.sold_wh == sold.get(pid, 0)
        ):
            _explain_accepted(f"clearing.accepted[{i}]", a, seen, bought, sold)
        seen.add(pid)
    for name in (bought.keys() | sold.keys()) - seen:
        raise SettlementInputError(f"clearing.accepted: participant {name!r} has trades but no accepted row")
    validate_meter_energy(inputs.meter_energy, names)


def validate_meter_energy(readings: Sequence[MeterEnergy], known_names: set[str] | None = None) -> None:
    """Raise SettlementInputError for the first reading that breaks a rule, naming it."""
    names = known_names if known_names is not None else set()

    def valid(name: object) -> bool:
        if isinstance(name, str) and _NAME_RE.fullmatch(name):
            names.add(name)
            return True
        return False

    seen: set[str] = set()
    measured, estimated = MeterQuality.MEASURED, MeterQuality.ESTIMATED
    for i, m in enumerate(readings):
        pid, import_wh, export_wh = m.participant_id, m.import_wh, m.export_wh
        if not (
            type(pid) is str
            and (pid in names or valid(pid))
            and pid not in seen
            and type(import_wh) is int
            and type(export_wh) is int
            and 0 <= import_wh <= MAX_ENERGY_WH
            and 0 <= export_wh <= MAX_ENERGY_WH
            and (m.quality is measured or m.quality is estimated)
        ):
            _explain_meter(f"meter_energy[{i}]", m, seen)
        seen.add(pid)


def validate_meter_readings(readings: Sequence[MeterReading]) -> None:
    """Raise SettlementInputError for the first meter reading that breaks a rule, naming it."""
    seen: set[str] = set()
    for i, r in enumerate(readings):
        where = f"meter_readings[{i}]"
        if not isinstance(r.meter_id, str) or not _METER_RE.fullmatch(r.meter_id):
            raise SettlementInputError(f"{where}: meter id {r.meter_id!r} must match {METER_ID_PATTERN}")
        if r.meter_id in seen:
            raise SettlementInputError(f"{where}: meter {r.meter_id!r} appears twice")
        seen.add(r.meter_id)
        if not isinstance(r.participant_id, str) or not _NAME_RE.fullmatch(r.participant_id):
            raise _bad_name(where, r.participant_id)
        _check_int(r.import_wh, f"{where}.import_wh", 0, MAX_ENERGY_WH)
        _check_int(r.export_wh, f"{where}.export_wh", 0, MAX_ENERGY_WH)
        if r.quality is not MeterQuality.MEASURED and r.quality is not MeterQuality.ESTIMATED:
            raise SettlementInputError(f"{where}.quality must be measured or estimated, got {r.quality!r}")


def participant_energy(readings: Iterable[MeterReading]) -> tuple[MeterEnergy, ...]:
    """Each participant's energy: import and export summed over its meters, the worst quality of them.

    Sorted by participant id, so that equal readings in any order give equal results.
    """
    totals: dict[str, tuple[int, int, MeterQuality]] = {}
    for r in readings:
        before = totals.get(r.participant_id)
        if before is None:
            totals[r.participant_id] = (r.import_wh, r.export_wh, r.quality)
        else:
            totals[r.participant_id] = (
                before[0] + r.import_wh,
                before[1] + r.export_wh,
                min(before[2], r.quality),
            )
    return tuple(MeterEnergy(p, i, e, q) for p, (i, e, q) in sorted(totals.items()))


def _bad_name(where: str, name: object) -> SettlementInputError:
    return SettlementInputError(f"{where}: participant id {name!r} must match {ACCOUNT_NAME_PATTERN}")


def _explain_trade(where: str, t: Trade, prices: Mapping[str, int]) -> None:
    for name in (t.buyer_id, t.seller_id):
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise _bad_name(where, name)
    if t.buyer_id == t.seller_id and t.buyer_node == t.seller_node:
        raise SettlementInputError(
            f"{where}: buyer and seller are both {t.buyer_id!r} at node {t.buyer_node!r} (a trade with itself)"
        )
    for node in (t.buyer_node, t.seller_node):
        if node not in prices:
            raise SettlementInputError(f"{where}: node {node!r} has no price in clearing.node_prices")
    _check_int(t.energy_wh, f"{where}.energy_wh", 1, MAX_ENERGY_WH)


def _explain_accepted(
    where: str, a: AcceptedEnergy, seen: set[str], bought: Mapping[str, int], sold: Mapping[str, int]
) -> None:
    if not isinstance(a.participant_id, str) or not _NAME_RE.fullmatch(a.participant_id):
        raise _bad_name(where, a.participant_id)
    if a.participant_id in seen:
        raise SettlementInputError(f"{where}: participant {a.participant_id!r} appears twice")
    _check_int(a.bought_wh, f"{where}.bought_wh", 0, MAX_ENERGY_WH)
    _check_int(a.sold_wh, f"{where}.sold_wh", 0, MAX_ENERGY_WH)
    raise SettlementInputError(
        f"{where}: participant {a.participant_id!r} accepted bought {a.bought_wh} / sold {a.sold_wh} Wh, "
        f"but its trades sum to {bought.get(a.participant_id, 0)} / {sold.get(a.participant_id, 0)} Wh"
    )


def _explain_meter(where: str, m: MeterEnergy, seen: set[str]) -> None:
    if not isinstance(m.participant_id, str) or not _NAME_RE.fullmatch(m.participant_id):
        raise _bad_name(where, m.participant_id)
    if m.participant_id in seen:
        raise SettlementInputError(f"{where}: participant {m.participant_id!r} appears twice")
    _check_int(m.import_wh, f"{where}.import_wh", 0, MAX_ENERGY_WH)
    _check_int(m.export_wh, f"{where}.export_wh", 0, MAX_ENERGY_WH)
    raise SettlementInputError(f"{where}.quality must be measured or estimated, got {m.quality!r}")


# --------------------------------------------------------------------------- rules


class FeePayer(StrEnum):
    BUYER = "buyer"
    SELLER = "seller"


class MissingEstimate(StrEnum):
    CONTRACTED = "contracted"
    """Estimate a missing meter at its contracted energy: no deviation until measured data arrives."""
    ZERO = "zero"
    """Estimate a missing meter at zero import and export."""


@dataclass(frozen=True, slots=True)
class SettlementRules:
    """How a market settles; loaded per market from YAML or a mapping, every field with a default."""

    grid_operator: str = "default"
    utility: str = "default"
    utility_participant_id: str | None = None
    """The utility's participant id in clearing results (its standing orders); its trades book to the utility."""
    retail_tariff_micro_per_kwh: int = 300_000
    feed_in_tariff_micro_per_kwh: int = 80_000
    grid_fee_micro_per_kwh: int = 60_000
    grid_fee_same_feeder_micro_per_kwh: int = 30_000
    grid_fee_same_node_micro_per_kwh: int = 15_000
    feeders: Mapping[str, str] = field(default_factory=dict)
    """node → feeder; nodes not listed are each their own feeder."""
    grid_fee_payer: FeePayer = FeePayer.BUYER
    missing_meter_estimate: MissingEstimate = MissingEstimate.CONTRACTED
    metering_delay_s: int = 900
    """An interval is settled no earlier than this long after it ends (the metering deadline)."""

    def __post_init__(self) -> None:
        for name in ("grid_operator", "utility"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
                raise RulesError(f"{name} {value!r} must match {ACCOUNT_NAME_PATTERN}")
        if self.utility_participant_id is not None and (
            not isinstance(self.utility_participant_id, str)
            or not _NAME_RE.fullmatch(self.utility_participant_id)
        ):
            raise RulesError(
                f"utility_participant_id {self.utility_participant_id!r} must match {ACCOUNT_NAME_PATTERN}"
            )
        for name in (
            "retail_tariff_micro_per_kwh",
            "feed_in_tariff_micro_per_kwh",
            "grid_fee_micro_per_kwh",
            "grid_fee_same_feeder_micro_per_kwh",
            "grid_fee_same_node_micro_per_kwh",
        ):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= MAX_PRICE_MICRO_PER_KWH:
                raise RulesError(
                    f"{name} must be an integer from 0 to {MAX_PRICE_MICRO_PER_KWH}, got {value!r}"
                )
        if type(self.metering_delay_s) is not int or self.metering_delay_s < 0:
            raise RulesError(
                f"metering_delay_s must be a non-negative integer, got {self.metering_delay_s!r}"
            )
        if not isinstance(self.feeders, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.feeders.items()
        ):
            raise RulesError("feeders must map node names to feeder names")
        if not isinstance(self.grid_fee_payer, FeePayer):
            raise RulesError(f"grid_fee_payer must be one of {[p.value for p in FeePayer]}")
        if not isinstance(self.missing_meter_estimate, MissingEstimate):
            raise RulesError(f"missing_meter_estimate must be one of {[m.value for m in MissingEstimate]}")

    @property
    def grid_operator_account(self) -> str:
        return account_id(AccountKind.GRID_OPERATOR, self.grid_operator)

    @property
    def utility_account(self) -> str:
        return account_id(AccountKind.UTILITY, self.utility)

    def grid_fee_for(self, buyer_node: str, seller_node: str) -> int:
        """The grid fee rate in micro-currency per kWh for energy from `seller_node` to `buyer_node`."""
        if buyer_node == seller_node:
            return self.grid_fee_same_node_micro_per_kwh
        feeder_b = self.feeders.get(buyer_node)
        if feeder_b is not None and feeder_b == self.feeders.get(seller_node):
            return self.grid_fee_same_feeder_micro_per_kwh
        return self.grid_fee_micro_per_kwh

    def to_mapping(self) -> dict[str, Any]:
        """A plain, JSON-able mapping that `from_mapping` reads back to equal rules."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Mapping):
                value = dict(sorted(value.items()))
            elif isinstance(value, StrEnum):
                value = value.value
            out[f.name] = value
        return out

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> SettlementRules:
        """Rules from a mapping; missing fields keep their defaults, unknown fields are an error."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise RulesError("settlement rules must be a mapping of field names to values")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RulesError(f"unknown settlement rule field(s) {unknown}; known: {sorted(known)}")
        values = dict(data)
        for name, enum in (("grid_fee_payer", FeePayer), ("missing_meter_estimate", MissingEstimate)):
            if name in values:
                try:
                    values[name] = enum(values[name])
                except ValueError:
                    raise RulesError(
                        f"{name} {values[name]!r} must be one of {[e.value for e in enum]}"
                    ) from None
        if "feeders" in values and values["feeders"] is not None:
            values["feeders"] = dict(values["feeders"])
        return cls(**values)

    @classmethod
    def from_yaml(cls, text: str) -> SettlementRules:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RulesError(f"settlement rules are not valid YAML: {exc}") from exc
        return cls.from_mapping(data)

    def to_json(self) -> str:
        return json.dumps(self.to_mapping(), sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------- meter state

MeterState = dict[str, tuple[int, int, MeterQuality]]
"""participant → (import_wh, export_wh, quality): the meter data an interval is settled on."""


def initial_meter_state(
    clearing: ClearingResult, delivered: Sequence[MeterEnergy], rules: SettlementRules
) -> MeterState:
    """The meter data of a first settlement: what was delivered, and an estimate for every missing meter."""
    state: MeterState = {m.participant_id: (m.import_wh, m.export_wh, m.quality) for m in delivered}
    utility_pid = rules.utility_participant_id
    contracted = rules.missing_meter_estimate is MissingEstimate.CONTRACTED
    missing = MeterQuality.MISSING
    for a in clearing.accepted:
        if a.participant_id in state or a.participant_id == utility_pid:
            continue
        if contracted:
            net_wh = a.bought_wh - a.sold_wh
            state[a.participant_id] = (max(net_wh, 0), max(-net_wh, 0), missing)
        else:
            state[a.participant_id] = (0, 0, missing)
    state.pop(utility_pid or "", None)
    return state


def merge_meter_state(old: MeterState, delivered: Sequence[MeterEnergy]) -> MeterState:
    """Improve `old` with better data from `delivered`; raises SettlementConflictError for contradicting measurements."""
    new = dict(old)
    for m in delivered:
        previous = old.get(m.participant_id)
        if previous is None or m.quality > previous[2]:
            new[m.participant_id] = (m.import_wh, m.export_wh, m.quality)
        elif (
            m.quality is MeterQuality.MEASURED
            and previous[2] is MeterQuality.MEASURED
            and (m.import_wh, m.export_wh) != previous[:2]
        ):
            raise SettlementConflictError(
                f"participant {m.participant_id!r}: measured {m.import_wh}/{m.export_wh} Wh import/export "
                f"contradicts the measured {previous[0]}/{previous[1]} Wh already settled"
            )
    return new


def meter_state_to_json(state: MeterState) -> str:
    """`{"<participant>":[import_wh,export_wh,quality],…}`, keys sorted (JSON writes the IntEnum as its value)."""
    return compact_json(dict(sorted(state.items()))).decode()


def meter_state_from_json(text: str) -> MeterState:
    data = json.loads(text)
    return {p: (int(i), int(e), MeterQuality(int(q))) for p, (i, e, q) in data.items()}


# --------------------------------------------------------------------------- legs and transfers


class Leg(NamedTuple):
    """One amount a rule says `payer` owes `payee` in an interval (negative: the payee owes the payer)."""

    key: tuple[str, ...]
    """(code, parties…): unique within an interval, stable across revisions."""
    payer: str
    payee: str
    amount_nano: int
    estimated: bool = False


_new_tuple = tuple.__new__

# Short tags in transfer ids, one per code, so that the legs of one trade share a digest.
CODE_TAGS = {
    CODE_PURCHASE: "tp",
    CODE_SALE: "ts",
    CODE_GRID_FEE: "gf",
    CODE_CONGESTION_RENT: "cr",
    CODE_DEVIATION: "dv",
}


def settlement_legs(
    clearing: ClearingResult, state: MeterState, rules: SettlementRules
) -> dict[tuple[str, ...], Leg]:
    """Every amount the rules say is owed for the interval, given the meter data in `state`."""
    prices = clearing.node_prices_micro_per_kwh
    market = account_id(AccountKind.MARKET, clearing.market_id)
    grid = rules.grid_operator_account
    utility = rules.utility_account
    utility_pid = rules.utility_participant_id
    accounts: dict[str, str] = {}

    def account_of(participant: str) -> str:
        found = accounts.get(participant)
        if found is None:
            found = utility if participant == utility_pid else f"participant:{participant}"
            accounts[participant] = found
        return found

    energy: dict[tuple[str, str, str, str], int] = {}
    for t in clearing.trades:
        k = (t.buyer_id, t.buyer_node, t.seller_id, t.seller_node)
        energy[k] = energy.get(k, 0) + t.energy_wh

    legs: dict[tuple[str, ...], Leg] = {}
    new = _new_tuple
    rent = 0
    fee_by_buyer = rules.grid_fee_payer is FeePayer.BUYER
    fee_rates: dict[tuple[str, str], int] = {}
    for (buyer, buyer_node, seller, seller_node), energy_wh in energy.items():
        buyer_account = account_of(buyer)
        seller_account = account_of(seller)
        purchase = energy_wh * prices[buyer_node]
        sale = energy_wh * prices[seller_node]
        rent += purchase - sale
        key = (CODE_PURCHASE, buyer, buyer_node, seller, seller_node)
        legs[key] = new(Leg, (key, buyer_account, market, purchase, False))
        key = (CODE_SALE, buyer, buyer_node, seller, seller_node)
        legs[key] = new(Leg, (key, market, seller_account, sale, False))
        fee_account = buyer_account if fee_by_buyer else seller_account
        if fee_account != utility:
            rate = fee_rates.get((buyer_node, seller_node))
            if rate is None:
                rate = fee_rates[(buyer_node, seller_node)] = rules.grid_fee_for(buyer_node, seller_node)
            key = (CODE_GRID_FEE, buyer, buyer_node, seller, seller_node)
            legs[key] = new(Leg, (key, fee_account, grid, energy_wh * rate, False))
    rent_key: tuple[str, ...] = (CODE_CONGESTION_RENT,)
    legs[rent_key] = Leg(rent_key, market, grid, rent)

    contracted = {a.participant_id: a.bought_wh - a.sold_wh for a in clearing.accepted}
    retail = rules.retail_tariff_micro_per_kwh
    feed_in = rules.feed_in_tariff_micro_per_kwh
    measured = MeterQuality.MEASURED
    for participant, (import_wh, export_wh, quality) in state.items():
        if participant == utility_pid:
            continue
        deviation_wh = (import_wh - export_wh) - contracted.get(participant, 0)
        amount = deviation_wh * (retail if deviation_wh > 0 else feed_in)
        deviation_key: tuple[str, ...] = (CODE_DEVIATION, participant)
        legs[deviation_key] = new(
            Leg, (deviation_key, account_of(participant), utility, amount, quality is not measured)
        )
    return legs


def correction_legs(
    old: Mapping[tuple[str, ...], Leg], new: Mapping[tuple[str, ...], Leg]
) -> dict[tuple[str, ...], Leg]:
    """What must be booked so that old + correction = new, leg by leg."""
    out: dict[tuple[str, ...], Leg] = {}
    for key in old.keys() | new.keys():
        before = old.get(key)
        after = new.get(key)
        delta = (after.amount_nano if after else 0) - (before.amount_nano if before else 0)
        base = after if after is not None else before
        assert base is not None
        if delta:
            out[key] = base._replace(amount_nano=delta, estimated=bool(after and after.estimated))
    return out


def id_stems(market_id: str, interval_start_s: int, revision: int, parties: Sequence[str]) -> list[str]:
    """The transfer ids without their tags, one per joined parties (`"|".join(key[1:])` of a leg):
    `<interval_start_s>.<first 30 hex digits of SHA-256(market|interval|revision|parties)>.`

    The legs of one trade share their parties, so their ids differ only in the
    tag (`CODE_TAGS`) appended to the stem.
    """
    prefix = f"{market_id}|{interval_start_s}|{revision}|"
    id_prefix = f"{interval_start_s}."
    return [f"{id_prefix}{d}." for d in short_hex_digests([prefix + p for p in parties], 30)]


def legs_to_transfers(
    legs: Mapping[tuple[str, ...], Leg], market_id: str, interval_start_s: int, revision: int
) -> list[Transfer]:
    """The transfers that book `legs`, sorted by id and all linked into one group (all or nothing)."""
    base_flags = FLAG_CORRECTION if revision else 0
    estimated_flags = base_flags | FLAG_ESTIMATED
    booked = [(key, leg) for key, leg in legs.items() if leg[3]]
    parties_of = {key[1:]: "|".join(key[1:]) for key, _leg in booked}
    stems = dict(
        zip(
            parties_of,
            id_stems(market_id, interval_start_s, revision, list(parties_of.values())),
            strict=True,
        )
    )
    staged: list[tuple[str, str, str, int, str, int]] = []
    push = staged.append
    for key, leg in booked:
        amount = leg[3]
        if amount > 0:
            debit, credit = leg[1], leg[2]
        else:
            debit, credit, amount = leg[2], leg[1], -amount
        if amount > MAX_AMOUNT_NANO:
            raise SettlementInputError(f"leg {key}: amount {amount} nano exceeds one transfer's limit")
        code = key[0]
        push(
            (
                stems[key[1:]] + CODE_TAGS[code],
                debit,
                credit,
                amount,
                code,
                estimated_flags if leg[4] else base_flags,
            )
        )
    if not staged:
        return []
    staged.sort()
    group = staged[0][0]
    new = _new_tuple
    return [
        new(Transfer, (tid, d, c, a, code, interval_start_s, group, f)) for tid, d, c, a, code, f in staged
    ]


@dataclass(frozen=True, slots=True)
class SettlementPlan:
    """What one settlement revision books and on which meter data it rests."""

    revision: int
    transfers: list[Transfer]
    meter_state: MeterState
    estimated_participants: tuple[str, ...]


FIRST_CHUNK_TRANSFERS = 256
"""Transfers per chunk of `first_settlement_chunks`."""


def first_settlement_chunks(
    clearing: ClearingResult,
    state: MeterState,
    rules: SettlementRules,
    chunk_transfers: int = FIRST_CHUNK_TRANSFERS,
) -> Iterator[list[Transfer]]:
    """The transfers of revision 0 in order, in chunks of `chunk_transfers` (the last one shorter):
    the same as `legs_to_transfers(settlement_legs(...), …, 0)`.

    A first settlement books every leg as it is, so the legs need not be kept
    by key for a later comparison. The ids sort by the digest of the legs'
    parties, so the order is known once each trade's parties (and each
    deviating participant) are hashed and those digests sorted; the transfers
    themselves are then built chunk by chunk, and a writer can store the first
    chunk while the next ones are built. The result is the same list (a unit
    test compares them); should two digests ever coincide, the list is built
    whole and sorted instead.
    """
    market_id = clearing.market_id
    start_s = clearing.interval_start_s
    prices = clearing.node_prices_micro_per_kwh
    utility = rules.utility_account
    utility_pid = rules.utility_participant_id

    energy: dict[tuple[str, str, str, str], int] = {}
    get = energy.get
    for t in clearing.trades:
        k = (t.buyer_id, t.buyer_node, t.seller_id, t.seller_node)
        energy[k] = get(k, 0) + t.energy_wh
    # What each id stands for, (id without its tag, kind, parties, amount): kind 0 a trade (its key
    # and energy), 1 the congestion rent, 2 a deviation (the participant and the amount it owes).
    # The ids share their prefix, so they sort as their digests.
    order: list[tuple[str, int, Any, int]] = [("", 0, k, e) for k, e in energy.items()]
    parties = ["|".join(k) for k in energy]
    rent = sum(e * (prices[bn] - prices[sn]) for (_b, bn, _s, sn), e in energy.items() if bn != sn)
    if rent:
        order.append(("", 1, None, rent))
        parties.append("")
    contracted = {a.participant_id: a.bought_wh - a.sold_wh for a in clearing.accepted}
    retail = rules.retail_tariff_micro_per_kwh
    feed_in = rules.feed_in_tariff_micro_per_kwh
    push = order.append
    for participant, (import_wh, export_wh, _quality) in state.items():
        if participant == utility_pid:
            continue
        deviation_wh = (import_wh - export_wh) - contracted.get(participant, 0)
        amount = deviation_wh * (retail if deviation_wh > 0 else feed_in)
        if amount:
            push(("", 2, participant, amount))
            parties.append(participant)
    # Every id's stem at once; the stems share their prefix, so the ids sort as their digests.
    order = [
        (stem, kind, what, amount)
        for stem, (_k, kind, what, amount) in zip(
            id_stems(market_id, start_s, 0, parties), order, strict=True
        )
    ]
    order.sort(key=_FIRST)
    if len(set(map(_FIRST, order))) != len(order):
        whole = legs_to_transfers(settlement_legs(clearing, state, rules), market_id, start_s, 0)
        for i in range(0, len(whole), chunk_transfers):
            yield whole[i : i + chunk_transfers]
        return

    market = account_id(AccountKind.MARKET, market_id)
    grid = rules.grid_operator_account
    fee_by_buyer = rules.grid_fee_payer is FeePayer.BUYER
    limit = MAX_AMOUNT_NANO
    new = _new_tuple
    measured = MeterQuality.MEASURED
    # Every participant with meter data has an account; others (only in trades) are added as met.
    accounts = {p: f"participant:{p}" for p in state}
    if utility_pid is not None:
        accounts[utility_pid] = utility
    fee_rates: dict[tuple[str, str], int] = {}
    group = ""
    chunk: list[Transfer] = []
    add = chunk.append

    def account_of(participant: str) -> str:
        found = accounts.get(participant)
        if found is None:
            found = accounts[participant] = (
                utility if participant == utility_pid else f"participant:{participant}"
            )
        return found

    def leg(tid: str, payer: str, payee: str, amount: int, code: str, flags: int) -> None:
        """Book a leg whatever its amount (the common case is inlined below, once `group` is known)."""
        nonlocal group
        if not amount:
            return
        if amount < 0:
            payer, payee, amount = payee, payer, -amount
        if amount > limit:
            raise SettlementInputError(f"leg {code} {tid}: amount {amount} nano exceeds one transfer's limit")
        if not group:
            group = tid
        add(new(Transfer, (tid, payer, payee, amount, code, start_s, group, flags)))

    if _native_first_transfers is not None:
        made = _native_first_transfers(
            order,
            Transfer,
            start_s,
            limit,
            SettlementInputError,
            accounts,
            account_of,
            fee_rates,
            rules.grid_fee_for,
            prices if type(prices) is dict else dict(prices),
            state,
            measured,
            fee_by_buyer,
            market,
            grid,
            utility,
            _NATIVE_CODES,
            _NATIVE_TAGS,
            FLAG_ESTIMATED,
        )
        for i in range(0, len(made), chunk_transfers):
            yield made[i : i + chunk_transfers]
        return

    account = accounts.get
    for tid, kind, parties, amount in order:
        if kind == 0:
            buyer, buyer_node, seller, seller_node = parties
            buyer_account = account(buyer) or account_of(buyer)
            seller_account = account(seller) or account_of(seller)
            # The legs of a trade in the order of their tags: gf, tp, ts.
            fee_account = buyer_account if fee_by_buyer else seller_account
            if fee_account != utility:
                rate = fee_rates.get((buyer_node, seller_node))
                if rate is None:
                    rate = fee_rates[(buyer_node, seller_node)] = rules.grid_fee_for(buyer_node, seller_node)
                fee = amount * rate
                if group and 0 < fee <= limit:
                    add(new(Transfer, (tid + "gf", fee_account, grid, fee, CODE_GRID_FEE, start_s, group, 0)))
                else:
                    leg(tid + "gf", fee_account, grid, fee, CODE_GRID_FEE, 0)
            purchase = amount * prices[buyer_node]
            if group and 0 < purchase <= limit:
                add(
                    new(
                        Transfer,
                        (tid + "tp", buyer_account, market, purchase, CODE_PURCHASE, start_s, group, 0),
                    )
                )
            else:
                leg(tid + "tp", buyer_account, market, purchase, CODE_PURCHASE, 0)
            sale = amount * prices[seller_node]
            if group and 0 < sale <= limit:
                add(new(Transfer, (tid + "ts", market, seller_account, sale, CODE_SALE, start_s, group, 0)))
            else:
                leg(tid + "ts", market, seller_account, sale, CODE_SALE, 0)
        elif kind == 2:
            flags = 0 if state[parties][2] is measured else FLAG_ESTIMATED
            payer = account(parties) or account_of(parties)
            if group and 0 < amount <= limit:
                add(
                    new(Transfer, (tid + "dv", payer, utility, amount, CODE_DEVIATION, start_s, group, flags))
                )
            elif group and 0 < -amount <= limit:  # a surplus: the utility pays the participant
                add(
                    new(
                        Transfer, (tid + "dv", utility, payer, -amount, CODE_DEVIATION, start_s, group, flags)
                    )
                )
            else:
                leg(tid + "dv", payer, utility, amount, CODE_DEVIATION, flags)
        else:
            leg(tid + "cr", market, grid, amount, CODE_CONGESTION_RENT, 0)
        if len(chunk) >= chunk_transfers:
            while len(chunk) >= chunk_transfers:
                yield chunk[:chunk_transfers]
                chunk = chunk[chunk_transfers:]
            add = chunk.append
    if chunk:
        yield chunk


_FIRST = operator.itemgetter(0)

_NATIVE_CODES = (CODE_GRID_FEE, CODE_PURCHASE, CODE_SALE, CODE_DEVIATION, CODE_CONGESTION_RENT)
_NATIVE_TAGS = tuple(CODE_TAGS[code] for code in _NATIVE_CODES)
# The loop of `first_settlement_chunks` and the checks of `validate_rows` in compiled code, when
# services/ledger/_native.c was built.
_native_first_transfers: Callable[..., list[Transfer]] | None = (
    None if native is None else native.first_settlement_transfers
)
_native_rows_pass: Callable[..., bool] | None = None if native is None else native.settlement_rows_pass


def first_settlement_transfers(
    clearing: ClearingResult, state: MeterState, rules: SettlementRules
) -> list[Transfer]:
    """The transfers of revision 0 as one list (see `first_settlement_chunks`)."""
    return [t for chunk in first_settlement_chunks(clearing, state, rules) for t in chunk]


def plan_first_settlement(inputs: SettlementInputs, rules: SettlementRules) -> SettlementPlan:
    state = initial_meter_state(inputs.clearing, inputs.meter_energy, rules)
    return SettlementPlan(
        revision=0,
        transfers=first_settlement_transfers(inputs.clearing, state, rules),
        meter_state=state,
        estimated_participants=estimated_participants(state),
    )


def plan_resettlement(
    inputs: SettlementInputs, rules: SettlementRules, old_state: MeterState, last_revision: int
) -> SettlementPlan | None:
    """The correcting revision for better meter data, or None when the delivery changes nothing."""
    state = merge_meter_state(old_state, inputs.meter_energy)
    if state == old_state:
        return None
    old_legs = settlement_legs(inputs.clearing, old_state, rules)
    new_legs = settlement_legs(inputs.clearing, state, rules)
    revision = last_revision + 1
    return SettlementPlan(
        revision=revision,
        transfers=legs_to_transfers(
            correction_legs(old_legs, new_legs), inputs.market_id, inputs.interval_start_s, revision
        ),
        meter_state=state,
        estimated_participants=estimated_participants(state),
    )


def plan_restaged_settlement(
    inputs: SettlementInputs, rules: SettlementRules, old_state: MeterState, last_revision: int
) -> SettlementPlan | None:
    """The correcting revision when `inputs` holds all meter data known for the interval, or None if nothing changed.

    Held (staged) meter data only ever improves, meter by meter, and a
    contradicting measurement is refused when it arrives; so the held data is
    the best knowledge of the interval and the new meter state is computed
    from it afresh (with estimates for meters still missing) instead of being
    merged into the old one. This also books a participant whose second meter
    arrived after the first settlement: its measured total grew, which is a
    correction, not a contradiction.
    """
    state = initial_meter_state(inputs.clearing, inputs.meter_energy, rules)
    if state == old_state:
        return None
    old_legs = settlement_legs(inputs.clearing, old_state, rules)
    new_legs = settlement_legs(inputs.clearing, state, rules)
    revision = last_revision + 1
    return SettlementPlan(
        revision=revision,
        transfers=legs_to_transfers(
            correction_legs(old_legs, new_legs), inputs.market_id, inputs.interval_start_s, revision
        ),
        meter_state=state,
        estimated_participants=estimated_participants(state),
    )


def estimated_participants(state: MeterState) -> tuple[str, ...]:
    """The participants whose meter data in `state` is not measured, sorted."""
    measured = MeterQuality.MEASURED
    return tuple(sorted(p for p, (_i, _e, q) in state.items() if q is not measured))


def settlement_due_s(interval_start_s: int, interval_s: int, rules: SettlementRules) -> int:
    """The earliest time an interval may be settled: its end plus the metering delay."""
    return interval_start_s + interval_s + rules.metering_delay_s
