"""The load-test report's markdown shows every figure as its JSON holds it."""

from __future__ import annotations

import pytest

from loadtest.report import _cell


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        (108687.8, "108687.8"),
        (1234567.25, "1234567.25"),
        (187.5, "187.5"),
        (0.0, "0"),
        (0.0004, "0.000400"),
        (None, "-"),
        (True, "yes"),
        (12, "12"),
    ],
)
def test_a_report_cell_keeps_every_digit_of_its_figure(value: object, cell: str) -> None:
    assert _cell(value) == cell
    if isinstance(value, float):
        assert float(cell) == value
