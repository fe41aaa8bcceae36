"""Settlement rules on a small interval worked out by hand: trades at node prices, fees, deviations, corrections."""

from __future__ import annotations

import random
from typing import Any

import pytest

from services.ledger.domain import settlement as settlement_module
from services.ledger.domain.ledger import FLAG_CORRECTION, FLAG_ESTIMATED, MAX_AMOUNT_NANO, Transfer
from services.ledger.domain.settlement import (
    AcceptedEnergy,
    ClearingResult,
    MeterEnergy,
    MeterQuality,
    RulesError,
    SettlementConflictError,
    SettlementInputError,
    SettlementInputs,
    SettlementRules,
    Trade,
    first_settlement_chunks,
    initial_meter_state,
    legs_to_transfers,
    merge_meter_state,
    meter_state_from_json,
    meter_state_to_json,
    plan_first_settlement,
    plan_resettlement,
    settlement_due_s,
    settlement_legs,
    validate_inputs,
)

START_S = 1_748_736_000


@pytest.fixture(params=["compiled", "python"])
def first_transfers_made_by(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A first settlement's transfers made by the compiled module, then by the Python loop."""
    if request.param == "compiled" and settlement_module._native_first_transfers is None:
        pytest.skip("services.ledger._native is not built")
    if request.param == "python":
        monkeypatch.setattr(settlement_module, "_native_first_transfers", None)
    return str(request.param)


RULES = SettlementRules.from_yaml(
    """
grid_operator: dso
utility: ewz
retail_tariff_micro_per_kwh: 300000
feed_in_tariff_micro_per_kwh: 80000
grid_fee_micro_per_kwh: 60000
grid_fee_same_feeder_micro_per_kwh: 30000
grid_fee_same_node_micro_per_kwh: 15000
feeders: {n1: f1, n2: f1, n3: f2}
"""
)
PRICES = {"n1": 200_000, "n2": 250_000, "n3": 180_000}


def clearing(trades: list[Trade] | None = None) -> ClearingResult:
    trades = trades or [Trade("alice", "n2", "bob", "n1", 1000), Trade("carol", "n3", "dave", "n3", 500)]
    bought: dict[str, int] = {}
    sold: dict[str, int] = {}
    for t in trades:
        bought[t.buyer_id] = bought.get(t.buyer_id, 0) + t.energy_wh
        sold[t.seller_id] = sold.get(t.seller_id, 0) + t.energy_wh
    accepted = tuple(
        AcceptedEnergy(p, bought.get(p, 0), sold.get(p, 0)) for p in sorted(bought.keys() | sold.keys())
    )
    return ClearingResult("demo", START_S, PRICES, tuple(trades), accepted)


METER = (
    MeterEnergy("alice", 1200, 0),
    MeterEnergy("bob", 0, 900),
    MeterEnergy("dave", 0, 600),
)


def by_code(transfers: list[Transfer]) -> dict[tuple[str, str, str], int]:
    return {(t.code, t.debit_account, t.credit_account): t.amount_nano for t in transfers}


def balances(transfers: list[Transfer]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in transfers:
        out[t.debit_account] = out.get(t.debit_account, 0) - t.amount_nano
        out[t.credit_account] = out.get(t.credit_account, 0) + t.amount_nano
    return out


def test_an_interval_settles_trades_at_node_prices_with_rent_fees_and_deviations() -> None:
    plan = plan_first_settlement(SettlementInputs(clearing(), METER), RULES)
    amounts = by_code(plan.transfers)
    assert amounts == {
        ("trade.purchase", "participant:alice", "market:demo"): 1000 * 250_000,
        ("trade.sale", "market:demo", "participant:bob"): 1000 * 200_000,
        ("grid_fee", "participant:alice", "grid_operator:dso"): 1000 * 30_000,  # same feeder f1
        ("trade.purchase", "participant:carol", "market:demo"): 500 * 180_000,
        ("trade.sale", "market:demo", "participant:dave"): 500 * 180_000,
        ("grid_fee", "participant:carol", "grid_operator:dso"): 500 * 15_000,  # same node
        ("congestion_rent", "market:demo", "grid_operator:dso"): 1000 * (250_000 - 200_000),
        # alice used 200 Wh more than she bought, bob delivered 100 Wh less than he sold: retail.
        ("deviation", "participant:alice", "utility:ewz"): 200 * 300_000,
        ("deviation", "participant:bob", "utility:ewz"): 100 * 300_000,
        # dave delivered 100 Wh more than he sold: feed-in.
        ("deviation", "utility:ewz", "participant:dave"): 100 * 80_000,
    }
    assert balances(plan.transfers)["market:demo"] == 0
    assert sum(balances(plan.transfers).values()) == 0
    # carol's meter is missing: settled as contracted, so no deviation, but flagged until measured.
    assert plan.estimated_participants == ("carol",)
    assert plan.meter_state["carol"] == (500, 0, MeterQuality.MISSING)
    assert all(t.flags == 0 for t in plan.transfers)


def test_transfers_are_deterministic_whatever_the_order_of_the_rows() -> None:
    base = plan_first_settlement(SettlementInputs(clearing(), METER), RULES).transfers
    trades = list(clearing().trades)
    meter = list(METER)
    rng = random.Random(3)
    for _ in range(5):
        rng.shuffle(trades)
        rng.shuffle(meter)
        again = plan_first_settlement(SettlementInputs(clearing(trades), tuple(meter)), RULES).transfers
        assert again == base
    assert len({t.transfer_id for t in base}) == len(base)
    assert all(t.linked_group == base[0].transfer_id for t in base)
    assert [t.transfer_id for t in base] == sorted(t.transfer_id for t in base)
    assert all(t.transfer_id.startswith(f"{START_S}.") for t in base)


def test_measured_data_for_a_missing_meter_books_only_the_difference_as_a_correction() -> None:
    inputs = SettlementInputs(clearing(), METER)
    first = plan_first_settlement(inputs, RULES)
    late = SettlementInputs(clearing(), (MeterEnergy("carol", 450, 0),))
    second = plan_resettlement(late, RULES, first.meter_state, 0)
    assert second is not None
    assert second.revision == 1
    assert second.estimated_participants == ()
    # carol used 50 Wh less than she bought: the utility pays her feed-in for 50 Wh.
    assert [
        (t.code, t.debit_account, t.credit_account, t.amount_nano, t.flags) for t in second.transfers
    ] == [("deviation", "utility:ewz", "participant:carol", 50 * 80_000, FLAG_CORRECTION)]
    assert not set(t.transfer_id for t in second.transfers) & set(t.transfer_id for t in first.transfers)
    # The same delivery again changes nothing.
    assert plan_resettlement(late, RULES, second.meter_state, 1) is None


def test_estimated_data_is_flagged_and_corrected_by_measured_data_in_either_direction() -> None:
    meter = (*METER, MeterEnergy("carol", 700, 0, MeterQuality.ESTIMATED))
    first = plan_first_settlement(SettlementInputs(clearing(), meter), RULES)
    estimated = [t for t in first.transfers if t.flags & FLAG_ESTIMATED]
    assert [(t.debit_account, t.amount_nano) for t in estimated] == [("participant:carol", 200 * 300_000)]
    second = plan_resettlement(
        SettlementInputs(clearing(), (MeterEnergy("carol", 400, 0),)), RULES, first.meter_state, 0
    )
    assert second is not None
    # From paying 200 Wh at retail to being paid 100 Wh at feed-in: the utility pays back both.
    (correction,) = second.transfers
    assert (correction.debit_account, correction.credit_account) == ("utility:ewz", "participant:carol")
    assert correction.amount_nano == 200 * 300_000 + 100 * 80_000
    assert correction.flags == FLAG_CORRECTION
    total = balances([*first.transfers, *second.transfers])
    assert total["participant:carol"] == -500 * 180_000 - 500 * 15_000 + 100 * 80_000


def test_meter_data_only_improves_and_contradicting_measurements_are_refused() -> None:
    state = {"a": (10, 0, MeterQuality.MISSING), "b": (5, 0, MeterQuality.MEASURED)}
    assert merge_meter_state(state, [MeterEnergy("a", 7, 0, MeterQuality.ESTIMATED)])["a"] == (
        7,
        0,
        MeterQuality.ESTIMATED,
    )
    assert merge_meter_state(state, [MeterEnergy("b", 9, 0, MeterQuality.ESTIMATED)]) == state
    assert merge_meter_state(state, [MeterEnergy("b", 5, 0)]) == state
    with pytest.raises(SettlementConflictError, match="'b'"):
        merge_meter_state(state, [MeterEnergy("b", 6, 0)])


def test_the_utility_standing_orders_book_to_the_utility_without_grid_fee_or_deviation() -> None:
    rules = SettlementRules.from_mapping({**RULES.to_mapping(), "utility_participant_id": "grid-supply"})
    trades = [Trade("alice", "n2", "grid-supply", "n1", 400)]
    plan = plan_first_settlement(SettlementInputs(clearing(trades), (MeterEnergy("alice", 400, 0),)), rules)
    assert by_code(plan.transfers) == {
        ("trade.purchase", "participant:alice", "market:demo"): 400 * 250_000,
        ("trade.sale", "market:demo", "utility:ewz"): 400 * 200_000,
        ("grid_fee", "participant:alice", "grid_operator:dso"): 400 * 30_000,
        ("congestion_rent", "market:demo", "grid_operator:dso"): 400 * 50_000,
    }


def test_the_seller_pays_the_grid_fee_when_the_rules_say_so() -> None:
    rules = SettlementRules.from_mapping({**RULES.to_mapping(), "grid_fee_payer": "seller"})
    plan = plan_first_settlement(SettlementInputs(clearing(), METER), rules)
    fees = {t.debit_account: t.amount_nano for t in plan.transfers if t.code == "grid_fee"}
    assert fees == {"participant:bob": 1000 * 30_000, "participant:dave": 500 * 15_000}


def test_rules_have_defaults_and_refuse_unknown_or_bad_fields() -> None:
    assert SettlementRules.from_mapping(None) == SettlementRules()
    assert SettlementRules.from_mapping(RULES.to_mapping()) == RULES
    with pytest.raises(RulesError, match="grid_fee_micro_per_kwhh"):
        SettlementRules.from_mapping({"grid_fee_micro_per_kwhh": 1})
    with pytest.raises(RulesError, match="retail_tariff_micro_per_kwh"):
        SettlementRules.from_mapping({"retail_tariff_micro_per_kwh": -1})
    with pytest.raises(RulesError, match="grid_fee_payer"):
        SettlementRules.from_mapping({"grid_fee_payer": "nobody"})
    with pytest.raises(RulesError, match="YAML"):
        SettlementRules.from_yaml("a: [")
    assert settlement_due_s(START_S, 900, RULES) == START_S + 900 + 900


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: {"trades": (Trade("alice", "n9", "bob", "n1", 10),)}, r"clearing.trades\[0\]: node 'n9'"),
        (
            lambda c: {"trades": (Trade("alice", "n1", "alice", "n1", 10),)},
            r"clearing.trades\[0\]: buyer and seller",
        ),
        (
            lambda c: {"trades": (Trade("al|ce", "n2", "bob", "n1", 10),)},
            r"clearing.trades\[0\]: participant id",
        ),
        (
            lambda c: {"trades": (*c.trades[:1], Trade("alice", "n2", "bob", "n1", 0))},
            r"clearing.trades\[1\].energy_wh",
        ),
        (lambda c: {"accepted": c.accepted[1:]}, r"has trades but no accepted row"),
        (
            lambda c: {"accepted": (AcceptedEnergy("alice", 999, 0), *c.accepted[1:])},
            r"clearing.accepted\[0\]",
        ),
        (lambda c: {"interval_start_s": START_S + 1}, r"interval_start_s"),
        (lambda c: {"node_prices_micro_per_kwh": {**PRICES, "n1": 10**10}}, r"node_prices\[n1\]"),
    ],
)
def test_bad_clearing_input_is_refused_naming_the_row(change, message: str) -> None:  # type: ignore[no-untyped-def]
    base = clearing()
    fields: dict[str, Any] = {
        "market_id": base.market_id,
        "interval_start_s": base.interval_start_s,
        "node_prices_micro_per_kwh": base.node_prices_micro_per_kwh,
        "trades": base.trades,
        "accepted": base.accepted,
    }
    fields.update(change(base))
    with pytest.raises(SettlementInputError, match=message):
        validate_inputs(SettlementInputs(ClearingResult(**fields), METER))


def test_bad_meter_input_is_refused_naming_the_row() -> None:
    with pytest.raises(SettlementInputError, match=r"meter_energy\[1\]: participant 'alice' appears twice"):
        validate_inputs(SettlementInputs(clearing(), (METER[0], METER[0])))
    with pytest.raises(SettlementInputError, match=r"meter_energy\[0\].import_wh"):
        validate_inputs(SettlementInputs(clearing(), (MeterEnergy("alice", -1, 0),)))
    with pytest.raises(SettlementInputError, match=r"quality"):
        validate_inputs(SettlementInputs(clearing(), (MeterEnergy("alice", 1, 0, MeterQuality.MISSING),)))


def test_the_recorded_form_round_trips_and_the_digest_ignores_row_order() -> None:
    inputs = SettlementInputs(clearing(), METER)
    again = SettlementInputs.from_json(inputs.to_json())
    assert again == inputs
    shuffled = clearing(list(reversed(clearing().trades)))
    assert shuffled.digest() == inputs.clearing.digest()
    assert clearing([Trade("alice", "n2", "bob", "n1", 1001)]).digest() != inputs.clearing.digest()
    with pytest.raises(SettlementInputError, match="recorded"):
        SettlementInputs.from_json({"market_id": "demo"})


def random_interval(rng: random.Random) -> tuple[ClearingResult, tuple[MeterEnergy, ...], SettlementRules]:
    """An interval with the awkward cases: zero and negative prices, zero tariffs and fees, fees paid by
    sellers, the utility on either side, trades of one participant between two of its nodes."""
    nodes = ["n1", "n2", "n3", "n4"]
    prices = {n: rng.choice([0, -50_000, 120_000, 200_000, rng.randrange(-(10**6), 10**6)]) for n in nodes}
    people = [f"p{i}" for i in range(rng.randrange(1, 12))] + ["utility-orders"]
    trades = []
    for _ in range(rng.randrange(0, 30)):
        buyer, seller = rng.choice(people), rng.choice(people)
        buyer_node, seller_node = rng.choice(nodes), rng.choice(nodes)
        if buyer == seller and buyer_node == seller_node:
            continue
        trades.append(Trade(buyer, buyer_node, seller, seller_node, rng.randrange(1, 5000)))
    bought: dict[str, int] = {}
    sold: dict[str, int] = {}
    for t in trades:
        bought[t.buyer_id] = bought.get(t.buyer_id, 0) + t.energy_wh
        sold[t.seller_id] = sold.get(t.seller_id, 0) + t.energy_wh
    accepted = tuple(AcceptedEnergy(p, bought.get(p, 0), sold.get(p, 0)) for p in sorted(bought | sold))
    meter = tuple(
        MeterEnergy(p, rng.randrange(0, 3000), rng.randrange(0, 3000), rng.choice(list(MeterQuality)[1:]))
        for p in people
        if rng.random() < 0.7
    )
    rules = SettlementRules.from_mapping(
        {
            "grid_operator": "dso",
            "utility": "ewz",
            "utility_participant_id": rng.choice(["utility-orders", None]),
            "retail_tariff_micro_per_kwh": rng.choice([0, 300_000]),
            "feed_in_tariff_micro_per_kwh": rng.choice([0, 80_000]),
            "grid_fee_micro_per_kwh": rng.choice([0, 60_000]),
            "grid_fee_same_feeder_micro_per_kwh": rng.choice([0, 30_000]),
            "grid_fee_same_node_micro_per_kwh": rng.choice([0, 15_000]),
            "feeders": {"n1": "f1", "n2": "f1"},
            "grid_fee_payer": rng.choice(["buyer", "seller"]),
        }
    )
    return ClearingResult("demo", START_S, prices, tuple(trades), accepted), meter, rules


@pytest.mark.usefixtures("first_transfers_made_by")
def test_the_first_settlement_built_chunk_by_chunk_equals_the_transfers_of_its_legs() -> None:
    rng = random.Random(11)
    for _ in range(400):
        clearing_result, meter, rules = random_interval(rng)
        state = initial_meter_state(clearing_result, meter, rules)
        expected = legs_to_transfers(settlement_legs(clearing_result, state, rules), "demo", START_S, 0)
        for size in (1, 3, 256):
            chunks = list(first_settlement_chunks(clearing_result, state, rules, size))
            # Every chunk but the last is exactly `size` long.
            assert all(len(chunk) == size for chunk in chunks[:-1])
            assert all(0 < len(chunk) <= size for chunk in chunks)
            assert [t for chunk in chunks for t in chunk] == expected
        assert plan_first_settlement(SettlementInputs(clearing_result, meter), rules).transfers == expected


def test_the_stored_meter_state_is_sorted_json_with_qualities_as_numbers_and_reads_back() -> None:
    state = {
        "carol": (500, 0, MeterQuality.MISSING),
        "alice": (0, 1_000_000_000_000, MeterQuality.MEASURED),
        "bob": (7, 3, MeterQuality.ESTIMATED),
    }
    text = meter_state_to_json(state)
    assert text == '{"alice":[0,1000000000000,2],"bob":[7,3,1],"carol":[500,0,0]}'
    assert meter_state_from_json(text) == state


@pytest.mark.usefixtures("first_transfers_made_by")
def test_a_leg_above_one_transfers_limit_refuses_the_first_settlement_naming_the_leg() -> None:
    # 10**12 Wh at 10**9 micro/kWh is 10**21 nano: beyond one transfer's 2**63 - 1.
    prices = {"n1": 10**9, "n2": -(10**9)}
    trades = (Trade("alice", "n1", "bob", "n2", 10**12), Trade("carol", "n1", "bob", "n1", 5))
    accepted = (
        AcceptedEnergy("alice", 10**12, 0),
        AcceptedEnergy("bob", 0, 10**12 + 5),
        AcceptedEnergy("carol", 5, 0),
    )
    clearing_result = ClearingResult("demo", START_S, prices, trades, accepted)
    rules = SettlementRules.from_mapping({"grid_operator": "dso", "utility": "ewz"})
    state = initial_meter_state(clearing_result, (), rules)
    assert MAX_AMOUNT_NANO < 10**21
    with pytest.raises(SettlementInputError, match=r"nano exceeds one transfer's limit"):
        list(first_settlement_chunks(clearing_result, state, rules))


class _Name(str):
    """A str subclass: not a name the checks accept, though it reads like one."""


def _mutations(clearing_result: ClearingResult, meter: tuple[MeterEnergy, ...]) -> list[Any]:
    """Variants of valid settlement input that break (or seem to break) one rule each."""
    import dataclasses

    out: list[Any] = []
    c = clearing_result
    if c.trades:
        t = c.trades[0]
        for field, value in [
            ("buyer_id", "bad name"),
            ("buyer_id", _Name(t.buyer_id)),
            ("seller_id", "x" * 101),
            ("buyer_node", "nowhere"),
            ("energy_wh", 0),
            ("energy_wh", True),
            ("energy_wh", 10**13),
            ("seller_id", t.buyer_id),
        ]:
            trades = (dataclasses.replace(t, **{field: value}), *c.trades[1:])
            out.append((dataclasses.replace(c, trades=trades), meter))
    if c.accepted:
        a = c.accepted[0]
        out.append((dataclasses.replace(c, accepted=(*c.accepted, a)), meter))
        out.append((dataclasses.replace(c, accepted=c.accepted[1:]), meter))
        out.append(
            (
                dataclasses.replace(
                    c, accepted=(dataclasses.replace(a, bought_wh=a.bought_wh + 1), *c.accepted[1:])
                ),
                meter,
            )
        )
        out.append(
            (
                dataclasses.replace(
                    c, accepted=(dataclasses.replace(a, sold_wh=float(a.sold_wh)), *c.accepted[1:])
                ),
                meter,
            )
        )
    if meter:
        m = meter[0]
        out.append((c, (*meter, m)))
        out.append((c, (dataclasses.replace(m, quality=MeterQuality.MISSING), *meter[1:])))
        out.append((c, (dataclasses.replace(m, import_wh=-1), *meter[1:])))
        out.append((c, (dataclasses.replace(m, participant_id="é"), *meter[1:])))
    return out


def test_the_compiled_row_checks_pass_valid_rows_and_only_rows_the_python_checks_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compiled = settlement_module._native_rows_pass
    if compiled is None:
        pytest.skip("services.ledger._native is not built")
    monkeypatch.setattr(settlement_module, "_native_rows_pass", None)

    def python_passes(c: ClearingResult, meter: tuple[MeterEnergy, ...]) -> bool:
        try:
            settlement_module.validate_rows(SettlementInputs(c, meter))
        except SettlementInputError:
            return False
        return True

    def compiled_passes(c: ClearingResult, meter: tuple[MeterEnergy, ...]) -> bool:
        return compiled(
            c.trades,
            c.accepted,
            meter,
            c.node_prices_micro_per_kwh,
            settlement_module.MAX_ENERGY_WH,
            MeterQuality.MEASURED,
            MeterQuality.ESTIMATED,
        )

    rng = random.Random(5)
    checked = refused = 0
    for _ in range(300):
        clearing_result, meter, _rules = random_interval(rng)
        assert python_passes(clearing_result, meter)
        assert compiled_passes(clearing_result, meter)
        for bad_clearing, bad_meter in _mutations(clearing_result, meter):
            expected = python_passes(bad_clearing, bad_meter)
            # Passing in compiled code means the Python checks pass; refusing hands the rows to them.
            if compiled_passes(bad_clearing, bad_meter):
                assert expected
            checked += 1
            refused += not expected
    assert refused > checked // 2  # the mutations mostly break a rule
