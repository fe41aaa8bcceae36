"""`p2pgrid up` runs the whole market on its own: bots trade, meters are polled, every interval clears and
settles, the ledger verifies, the report is written and everything stops cleanly."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

SERVICES = ("grid_check", "matcher", "order_book", "meter_ingest", "ledger")
CHARTS = ("prices.png", "volume.png", "line_loading.png", "settlement.png")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.slow
def test_p2pgrid_up_with_50_prosumers_for_8_intervals_clears_settles_verifies_and_writes_the_report(
    tmp_path: Path,
) -> None:
    report_dir = tmp_path / "report"
    workdir = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "up", "--prosumers", "50", "--intervals", "8",
         "--report-dir", str(report_dir), "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "8/8 intervals cleared, 8/8 settled" in result.stdout, output
    assert "(0 lost)" in result.stdout, output
    assert "ledger verified: OK" in result.stdout, output

    summary = json.loads((report_dir / "summary.json").read_text())
    intervals = summary["intervals"]
    assert len(intervals) == 8
    assert all(row["cleared"] and row["settled"] for row in intervals), intervals
    assert summary["ledger"]["verified"] is True
    # Every interval had orders and the meters were read: settlement is on metered energy.
    assert all(row["orders"] > 0 for row in intervals), intervals
    assert all(row["metered_import_wh"] > 0 for row in intervals), intervals
    # Every household appears by name.
    labels = {row["label"] for row in summary["participants"]}
    assert len(labels) == 50 and {"pv-0", "ev-2", "battery-3"} <= labels

    report = (report_dir / "report.md").read_text()
    assert "| ledger verified | yes" in report
    for chart in CHARTS:
        assert chart in report
        width, height = _png_size(report_dir / chart)
        assert width >= 400 and height >= 200
    for service in SERVICES:
        assert (workdir / "logs" / f"{service}.log").exists()
    # The meters file the stack wrote names one polled meter per household.
    meters = (workdir / "meters.yaml").read_text()
    assert meters.count("meter_id:") == 50 and meters.count("modbus:") == 50
