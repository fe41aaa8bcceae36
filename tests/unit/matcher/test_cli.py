"""The `p2pgrid clear`, `p2pgrid clear verify` and `p2pgrid bench clearing` commands, run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cli import main

EXAMPLES = Path(__file__).resolve().parents[3] / "services" / "matcher" / "examples"


def test_clear_writes_a_result_that_verify_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "result.json"
    orders, grid = str(EXAMPLES / "orders.csv"), str(EXAMPLES / "feeder.yaml")
    assert main(["clear", "--orders", orders, "--grid", grid, "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    assert {"welfare_nano", "nodes", "orders", "lines", "trades", "congestion_rent_nano", "timings"} <= set(
        document
    )
    assert "cleared 8 orders" in capsys.readouterr().err
    assert main(["clear", "verify", "--orders", orders, "--grid", grid, "--result", str(out)]) == 0
    assert capsys.readouterr().out.startswith("ok: 8 orders")


def test_verify_exits_one_naming_the_first_violation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "result.json"
    orders, grid = str(EXAMPLES / "orders.csv"), str(EXAMPLES / "feeder.yaml")
    assert main(["clear", "--orders", orders, "--grid", grid, "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    document["nodes"][0]["price_micro_per_kwh"] += 100
    out.write_text(json.dumps(document))
    capsys.readouterr()
    assert main(["clear", "verify", "--orders", orders, "--grid", grid, "--result", str(out)]) == 1
    assert capsys.readouterr().err.startswith("violation: ")


def test_bad_input_exits_two_naming_the_line_and_the_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    orders = tmp_path / "orders.csv"
    orders.write_text(
        "order_id,participant_id,node_id,side,energy_wh,price_per_kwh\no1,p,n0,buy,10,0.10005\n"
    )
    assert main(["clear", "--orders", str(orders), "--grid", str(EXAMPLES / "feeder.yaml")]) == 2
    assert "line 2 (order 'o1'): price 0.10005 per kWh is not on the market's tick" in capsys.readouterr().err
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "interval_minutes: 15\nprice_tick_micro_per_kwh: 100\nslack: a\nnodes: [{id: a}, {id: b}]\nlines: []\n"
    )
    assert main(["clear", "--orders", str(orders), "--grid", str(grid)]) == 2
    assert "node b: is islanded" in capsys.readouterr().err


def test_clear_without_its_files_explains_itself(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["clear"]) == 2
    assert "--orders and --grid are required" in capsys.readouterr().err


def test_the_clearing_benchmark_prints_one_json_line_per_instance(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["bench", "clearing", "--sizes", "2000", "--networks", "single,radial100", "--repeat", "1"]) == 0
    )
    lines = [json.loads(text) for text in capsys.readouterr().out.splitlines()]
    assert [(line["n_orders"], line["network"]) for line in lines] == [(2000, "single"), (2000, "radial100")]
    for line in lines:
        assert line["ratio"] == pytest.approx(line["clear_s"] / line["sort_baseline_s"], rel=0.01)
    assert lines[1]["binding_lines"] > 0


def test_the_clearing_benchmark_runs_on_given_files(capsys: pytest.CaptureFixture[str]) -> None:
    orders, grid = str(EXAMPLES / "orders.csv"), str(EXAMPLES / "feeder.yaml")
    assert main(["bench", "clearing", "--orders-file", orders, "--grid", grid, "--repeat", "1"]) == 0
    (line,) = [json.loads(text) for text in capsys.readouterr().out.splitlines()]
    assert line["n_orders"] == 8 and line["network"] == "feeder"
