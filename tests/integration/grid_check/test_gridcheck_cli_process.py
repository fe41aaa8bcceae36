"""The installed `p2pgrid` console script runs the grid commands end to end in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

GRIDS = Path(__file__).resolve().parents[3] / "deploy" / "grids"
P2PGRID = Path(sys.executable).with_name("p2pgrid")


def test_flows_on_the_shipped_feeder_names_the_overloaded_house_connection() -> None:
    completed = subprocess.run(
        [
            str(P2PGRID),
            "grid",
            "flows",
            "--grid",
            str(GRIDS / "lv_feeder.yaml"),
            "--injections",
            str(GRIDS / "examples" / "lv_feeder_noon.csv"),
            "--slack-balances",
            "--fail-on-violation",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 1, completed.stderr
    result = json.loads(completed.stdout)
    assert [v["line_id"] for v in result["violations"]] == ["C12-service"]
    trafo = next(line for line in result["lines"] if line["line_id"] == "trafo")
    # 12 x 8 kW exported on feeder A, 12 x 2 kW and 45 kW drawn elsewhere: 27 kW net export upstream.
    assert trafo["flow_w"] == -27_000


def test_an_unbalanced_schedule_exits_2_with_one_line_on_stderr(tmp_path: Path) -> None:
    injections = tmp_path / "inj.csv"
    injections.write_text("node_id,injection_w\nA01,500\n")
    completed = subprocess.run(
        [
            str(P2PGRID),
            "grid",
            "flows",
            "--grid",
            str(GRIDS / "lv_feeder.yaml"),
            "--injections",
            str(injections),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 2
    assert completed.stdout == ""
    assert completed.stderr.count("\n") == 1 and "sum to 500.000 W" in completed.stderr
