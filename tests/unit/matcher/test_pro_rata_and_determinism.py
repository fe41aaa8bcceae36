"""Ties at the margin share pro rata, by largest remainder, then book order; row order never matters."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from matcher_support import book, single_node

from services.matcher.domain.clearing import clear
from services.matcher.domain.result import result_canonical_bytes


def fills(rows: list[tuple[str, str, str, int, int]], *, sequence: list[int] | None = None) -> dict[str, int]:
    grid = single_node()
    result = clear(book(rows, grid, sequence=sequence), grid)
    return dict(zip(result.order_ids, result.accepted_wh.tolist(), strict=True))


def test_marginal_sells_at_one_price_share_pro_rata_with_the_largest_remainder_first() -> None:
    rows = [
        ("s1", "n0", "sell", 100, 100_000),
        ("s2", "n0", "sell", 200, 100_000),
        ("s3", "n0", "sell", 300, 100_000),
        ("b1", "n0", "buy", 301, 200_000),
    ]
    # 301 of 600 Wh: exact shares 50.17, 100.33 and 150.5; floors give 300 and
    # the one Wh left goes to the largest remainder (s3's 0.5).
    assert fills(rows) == {"s1": 50, "s2": 100, "s3": 151, "b1": 301}


def test_equal_remainders_go_to_the_earlier_order_in_the_book() -> None:
    rows = [
        ("s1", "n0", "sell", 100, 100_000),
        ("s2", "n0", "sell", 100, 100_000),
        ("s3", "n0", "sell", 100, 100_000),
        ("b1", "n0", "buy", 200, 200_000),
    ]
    assert fills(rows) == {"s1": 67, "s2": 67, "s3": 66, "b1": 200}
    # Book order is the sequence, not the row: s3 first, then s2, then s1.
    assert fills(rows, sequence=[30, 20, 10, 40]) == {"s1": 66, "s2": 67, "s3": 67, "b1": 200}


def test_only_the_marginal_price_is_shared_orders_beyond_it_are_filled_or_rejected() -> None:
    rows = [
        ("s1", "n0", "sell", 50, 80_000),
        ("s2", "n0", "sell", 60, 100_000),
        ("s3", "n0", "sell", 40, 100_000),
        ("s4", "n0", "sell", 70, 120_000),
        ("b1", "n0", "buy", 100, 200_000),
    ]
    # s1 is below the price (filled); 50 Wh remain for s2 and s3 at the price (60:40); s4 is above it.
    assert fills(rows) == {"s1": 50, "s2": 30, "s3": 20, "s4": 0, "b1": 100}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 500), min_size=1, max_size=12),
    st.integers(1, 3000),
    st.randoms(use_true_random=False),
)
def test_pro_rata_shares_are_within_one_wh_of_exact_and_sum_to_the_accepted_energy(
    energies: list[int], demand: int, random: object
) -> None:
    rows = [(f"s{i}", "n0", "sell", energy, 100_000) for i, energy in enumerate(energies)]
    rows.append(("b", "n0", "buy", demand, 300_000))
    got = fills(rows)
    total = sum(energies)
    accepted = min(total, demand)
    assert sum(got[f"s{i}"] for i in range(len(energies))) == accepted == got["b"]
    for i, energy in enumerate(energies):
        exact = energy * accepted / total
        assert exact - 1 < got[f"s{i}"] < exact + 1
    # Shuffled rows, same sequence numbers: same shares.
    order = list(range(len(rows)))
    random.shuffle(order)  # type: ignore[attr-defined]
    shuffled = [rows[i] for i in order]
    assert fills(shuffled, sequence=order) == got


def test_the_same_orders_in_reverse_row_order_give_identical_bytes() -> None:
    grid = single_node()
    rng = np.random.default_rng(3)
    rows = [
        (
            f"o{i:03d}",
            "n0",
            "buy" if rng.random() < 0.5 else "sell",
            int(rng.integers(1, 50)),
            int(rng.integers(1, 6)) * 100_000,
        )
        for i in range(300)
    ]
    sequence = list(range(300))
    forward = clear(book(rows, grid, sequence=sequence), grid)
    backward = clear(book(rows[::-1], grid, sequence=sequence[::-1]), grid)
    assert result_canonical_bytes(forward) == result_canonical_bytes(backward)
    assert forward.timings_s and "timings" not in result_canonical_bytes(forward).decode()
