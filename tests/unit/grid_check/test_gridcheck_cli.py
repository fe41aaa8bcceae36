"""`p2pgrid grid import` and `p2pgrid grid flows`, run through the real command parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cli import main
from services.domain.grid import load_grid

GRIDS = Path(__file__).resolve().parents[3] / "deploy" / "grids"

GRID_YAML = """interval_minutes: 15
price_tick_micro_per_kwh: 100
slack: n0
nodes: [{id: n0}, {id: n1}, {id: n2}]
lines:
  - {id: l1, from: n0, to: n1, capacity_w: 50000, reactance_pu: 0.01}
  - {id: l2, from: n1, to: n2, capacity_w: 20000}
"""


@pytest.fixture
def grid_file(tmp_path: Path) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(GRID_YAML)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def flows(
    capsys: pytest.CaptureFixture[str], grid: Path, tmp_path: Path, csv: str, *extra: str
) -> tuple[int, str, str]:
    injections = tmp_path / "inj.csv"
    injections.write_text(csv)
    return run(capsys, "grid", "flows", "--grid", str(grid), "--injections", str(injections), *extra)


def test_flows_prints_each_line_with_flow_and_loading(
    capsys: pytest.CaptureFixture[str], grid_file: Path, tmp_path: Path
) -> None:
    code, out, _ = flows(capsys, grid_file, tmp_path, "node_id,injection_w\nn0,15000\nn2,-15000\n")
    assert code == 0
    result = json.loads(out)
    assert [(line["line_id"], line["flow_w"], line["loading_pct"]) for line in result["lines"]] == [
        ("l1", 15000, 30.0),
        ("l2", 15000, 75.0),
    ]
    assert result["violations"] == []


def test_flows_reports_an_overload_naming_the_line_and_can_fail_on_it(
    capsys: pytest.CaptureFixture[str], grid_file: Path, tmp_path: Path
) -> None:
    csv = "node_id,injection_w\nn2,20001\nn0,-20001\n"
    code, out, _ = flows(capsys, grid_file, tmp_path, csv)
    assert code == 0
    violation = json.loads(out)["violations"][0]
    assert (violation["line_id"], violation["flow_w"], violation["capacity_w"]) == ("l2", -20001, 20000)
    code, _, _ = flows(capsys, grid_file, tmp_path, csv, "--fail-on-violation")
    assert code == 1


@pytest.mark.parametrize(
    ("csv", "expected"),
    [
        ("node_id,injection_w\nn0,5\nn7,-5\n", "row 3: node_id 'n7' is not a node of the grid"),
        ("node_id,injection_w\nn0,5.5\nn2,-5.5\n", "row 2: injection_w '5.5' is not an integer"),
        ("node,injection_w\nn0,5\n", "row 1: missing column 'node_id'"),
        ("node_id,injection_w\nn0,5\nn2,-3\n", "injections sum to 2.000 W; they must sum to zero within 1 W"),
    ],
)
def test_bad_injections_exit_2_naming_the_row_and_the_rule(
    capsys: pytest.CaptureFixture[str], grid_file: Path, tmp_path: Path, csv: str, expected: str
) -> None:
    code, out, err = flows(capsys, grid_file, tmp_path, csv)
    assert code == 2
    assert out == ""
    assert expected in err


def test_the_slack_balances_when_asked(
    capsys: pytest.CaptureFixture[str], grid_file: Path, tmp_path: Path
) -> None:
    code, out, _ = flows(capsys, grid_file, tmp_path, "node_id,injection_w\nn2,-4000\n", "--slack-balances")
    assert code == 0
    assert [line["flow_w"] for line in json.loads(out)["lines"]] == [4000, 4000]


def test_limits_for_the_interval_replace_the_ratings(
    capsys: pytest.CaptureFixture[str], grid_file: Path, tmp_path: Path
) -> None:
    limits = tmp_path / "limits.yaml"
    limits.write_text(
        "- {line_id: l2, start_s: 1800000000, until_s: 1800003600, capacity_w: 1000, reason: maintenance}\n"
    )
    csv = "node_id,injection_w\nn0,1500\nn2,-1500\n"
    args = ("--limits", str(limits), "--interval-start-s")
    code, out, _ = flows(capsys, grid_file, tmp_path, csv, *args, "1800000900")
    assert code == 0
    assert [v["line_id"] for v in json.loads(out)["violations"]] == ["l2"]
    assert "maintenance" in json.loads(out)["violations"][0]["message"]
    code, out, _ = flows(capsys, grid_file, tmp_path, csv, *args, "1800003600")
    assert code == 0
    assert json.loads(out)["violations"] == []


def test_a_bad_grid_file_exits_2_naming_the_element(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID_YAML.replace("capacity_w: 20000", "capacity_w: -1"))
    code, _, err = flows(capsys, grid, tmp_path, "node_id,injection_w\n")
    assert code == 2
    assert "line l2: capacity_w must not be negative" in err
    code, _, err = flows(capsys, tmp_path / "missing.yaml", tmp_path, "node_id,injection_w\n")
    assert code == 2 and "missing.yaml" in err


def test_import_writes_a_grid_file_that_loads_and_summarises_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_path = tmp_path / "ieee14.yaml"
    source = GRIDS / "sources" / "case14.m"
    code, out, _ = run(capsys, "grid", "import", "--from", "matpower", str(source), "--out", str(out_path))
    assert code == 0
    summary = json.loads(out)
    assert (summary["nodes"], summary["lines"], summary["transformers"], summary["slack"]) == (
        14,
        20,
        3,
        "bus1",
    )
    grid = load_grid(out_path)
    assert len(grid.lines) == 20 and grid.slack == "bus1"


def test_import_of_a_file_it_cannot_read_exits_2_naming_the_problem(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    source = tmp_path / "computed.m"
    source.write_text((GRIDS / "sources" / "case14.m").read_text() + "mpc.bus(:, 3) = 0;\n")
    code, _, err = run(
        capsys, "grid", "import", "--from", "matpower", str(source), "--out", str(tmp_path / "x.yaml")
    )
    assert code == 2
    assert "unsupported statement 'mpc.bus(:, 3) = 0;'" in err
    assert not (tmp_path / "x.yaml").exists()
    code, _, err = run(
        capsys, "grid", "import", "--from", "pandapower", str(source), "--out", str(tmp_path / "x.yaml")
    )
    assert code == 2 and "not JSON" in err
