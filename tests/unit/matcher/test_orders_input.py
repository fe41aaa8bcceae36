"""Reading ORDERS.csv and checking the columns: bad input is rejected naming the row and the rule."""

from __future__ import annotations

import numpy as np
import pytest
from matcher_support import grid_from_lines, line, lp_optimum

from services.domain.grid import ConsistencyError, Grid, grid_from_dict
from services.matcher.domain.clearing import clear
from services.matcher.domain.orders import ClearingInput, OrderError, read_orders_csv, write_orders_csv
from services.matcher.domain.steps import aggregate, validate

HEADER = "order_id,participant_id,node_id,side,energy_wh,price_per_kwh\n"


@pytest.fixture
def grid() -> Grid:
    return grid_from_lines([line("l1", 0, 1, 50_000), line("l2", 1, 2, 20_000)], nodes=3)


def test_a_valid_file_becomes_columns_in_book_order_of_the_ids(grid: Grid) -> None:
    text = HEADER + "o2,p1,n2,buy,1500,0.2075\no1,p2,n0,SELL,700,0.1\n\n"
    request = read_orders_csv(text, grid)
    assert list(request.order_ids) == ["o2", "o1"]
    assert request.node_index.tolist() == [2, 0]
    assert request.is_buy.tolist() == [True, False]
    assert request.energy_wh.tolist() == [1500, 700]
    assert request.price_micro_per_kwh.tolist() == [207_500, 100_000]
    # Without a sequence column, book order is the order of the ids.
    assert request.sequence.tolist() == [1, 0]


def test_a_sequence_column_sets_book_order(grid: Grid) -> None:
    text = "order_id,participant_id,node_id,side,energy_wh,price_per_kwh,sequence\no1,p,n0,buy,1,0.1,9\no2,p,n0,buy,1,0.1,3\n"
    assert read_orders_csv(text, grid).sequence.tolist() == [9, 3]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            "o1,p,n0,buy,10,0.12345\n",
            "orders line 2 (order 'o1'): price 0.12345 per kWh is not on the market's tick of 0.0001 per kWh",
        ),
        ("o1,p,n9,buy,10,0.1\n", "orders line 2 (order 'o1'): node_id 'n9' is not a node of the grid"),
        ("o1,p,n0,buy,0,0.1\n", "orders line 2 (order 'o1'): energy_wh must be positive, got 0"),
        ("o1,p,n0,buy,-5,0.1\n", "orders line 2 (order 'o1'): energy_wh must be positive, got -5"),
        (
            "o1,p,n0,buy,1.5,0.1\n",
            "orders line 2 (order 'o1'): energy_wh must be a positive whole number of Wh, got '1.5'",
        ),
        (
            "o1,p,n0,buy,10,0.1\no1,p,n1,sell,5,0.1\n",
            "orders line 3 (order 'o1'): duplicate order_id: orders line 2 has it already",
        ),
        ("o1,p,n0,hold,10,0.1\n", "orders line 2 (order 'o1'): side must be 'buy' or 'sell', got 'hold'"),
        (
            "o1,p,n0,buy,10,cheap\n",
            "orders line 2 (order 'o1'): price_per_kwh: 'cheap' is not a decimal number",
        ),
        ("o1,p,n0,buy,10,0.1234567\n", "more than 6 decimal places"),
        ("o1,,n0,buy,10,0.1\n", "orders line 2 (order 'o1'): participant_id is empty"),
        ("o1,p,n0,buy,10\n", "orders line 2: expected 6 fields, got 5"),
    ],
)
def test_a_bad_row_is_rejected_naming_its_line_and_the_rule(grid: Grid, rows: str, message: str) -> None:
    with pytest.raises(OrderError) as caught:
        read_orders_csv(HEADER + rows, grid)
    assert message in str(caught.value)


def test_a_wrong_header_is_rejected(grid: Grid) -> None:
    with pytest.raises(OrderError, match=r"orders line 1: the header must be .*missing price_per_kwh"):
        read_orders_csv("order_id,participant_id,node_id,side,energy_wh\n", grid)
    with pytest.raises(OrderError, match=r"header .* is missing"):
        read_orders_csv("", grid)


def test_duplicate_sequence_numbers_are_rejected(grid: Grid) -> None:
    text = "order_id,participant_id,node_id,side,energy_wh,price_per_kwh,sequence\no1,p,n0,buy,1,0.1,4\no2,p,n0,buy,1,0.1,4\n"
    with pytest.raises(
        OrderError, match=r"orders line 3 \(order 'o2'\): duplicate sequence 4: orders line 2 has it already"
    ):
        read_orders_csv(text, grid)


def columns(grid: Grid, **overrides: object) -> ClearingInput:
    base: dict[str, object] = {
        "order_ids": ["a", "b", "c"],
        "participant_ids": ["p", "p", "p"],
        "node_index": np.array([0, 1, 2], dtype=np.int32),
        "is_buy": np.array([True, False, True]),
        "energy_wh": np.array([10, 20, 30], dtype=np.int64),
        "price_micro_per_kwh": np.array([100_000, 100_000, 200_000], dtype=np.int64),
        "sequence": np.array([1, 2, 3], dtype=np.int64),
    }
    base.update(overrides)
    return ClearingInput(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"price_micro_per_kwh": np.array([100_000, 100_050, 0], dtype=np.int64)},
            "row 2 (order 'b'): price 100050 micro per kWh is not on the market's tick",
        ),
        (
            {"node_index": np.array([0, 3, 0], dtype=np.int32)},
            "row 2 (order 'b'): node index 3 is not a node of the grid",
        ),
        (
            {"energy_wh": np.array([10, 0, 30], dtype=np.int64)},
            "row 2 (order 'b'): energy_wh 0 must be positive",
        ),
        (
            {"sequence": np.array([5, 2, 5], dtype=np.int64)},
            "row 3 (order 'c'): duplicate sequence 5: row 1 (order 'a') has it already",
        ),
        ({"energy_wh": np.array([10.0, 1.0, 3.0])}, "column energy_wh: must hold whole numbers"),
    ],
)
def test_columns_built_elsewhere_are_held_to_the_same_rules(
    grid: Grid, override: dict[str, object], message: str
) -> None:
    with pytest.raises(OrderError) as caught:
        clear(columns(grid, **override), grid)
    assert message in str(caught.value)


def test_a_disconnected_network_or_a_line_without_capacity_never_reaches_the_clearing() -> None:
    base = {
        "interval_minutes": 15,
        "price_tick_micro_per_kwh": 100,
        "slack": "n0",
        "nodes": [{"id": "n0"}, {"id": "n1"}],
    }
    with pytest.raises(ConsistencyError, match="node n1: is islanded"):
        grid_from_dict({**base, "lines": []})
    with pytest.raises(ConsistencyError, match="line l1: capacity_w is missing"):
        grid_from_dict({**base, "lines": [{"id": "l1", "from": "n0", "to": "n1"}]})


def test_the_csv_form_round_trips(grid: Grid) -> None:
    request = columns(grid)
    again = read_orders_csv(write_orders_csv(request, grid), grid)
    assert list(again.order_ids) == list(request.order_ids)
    for name in ("node_index", "is_buy", "energy_wh", "price_micro_per_kwh", "sequence"):
        assert getattr(again, name).tolist() == getattr(request, name).tolist()


def test_a_wide_price_range_is_aggregated_by_sorting_with_the_same_result(grid: Grid) -> None:
    # Prices from 0.0001 to 9.9 per kWh: too wide for the dense table, so the
    # steps come from a sort; the clearing must not notice.
    rng = np.random.default_rng(11)
    count = 40
    levels = rng.integers(1, 99_000, count)
    wide = columns(
        grid,
        order_ids=[f"o{i}" for i in range(count)],
        participant_ids=["p"] * count,
        node_index=rng.integers(0, 3, count).astype(np.int32),
        is_buy=rng.random(count) < 0.5,
        energy_wh=rng.integers(1, 100, count).astype(np.int64),
        price_micro_per_kwh=(levels * 100).astype(np.int64),
        sequence=np.arange(count, dtype=np.int64),
    )
    assert aggregate(validate(wide, grid), grid).order_step is not None
    result = clear(wide, grid)
    assert result.welfare_nano == pytest.approx(
        lp_optimum(wide, grid, limits_wh=np.floor(grid.line_limits_wh))
    )
