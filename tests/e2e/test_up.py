"""`p2pgrid up` runs the whole market on its own: bots trade, every interval clears and settles, everything stops cleanly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_p2pgrid_up_clears_and_settles_every_interval_and_stops_cleanly(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "up", "--intervals", "2", "--speedup", "240", "--prosumers", "8",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2/2 intervals cleared, 2/2 settled" in result.stdout
    # Every interval gets orders; whether its book crosses depends on the hour (no PV at night).
    orders = [int(n) for n in re.findall(r"orders +([0-9]+)", result.stdout)]
    traded = [float(kwh) for kwh in re.findall(r"traded +([0-9.]+) kWh", result.stdout)]
    assert len(orders) == 2 and all(n > 0 for n in orders), result.stdout
    assert len(traded) == 2 and sum(traded) > 0, result.stdout
    for service in ("grid_check", "matcher", "order_book", "meter_ingest", "ledger"):
        assert (tmp_path / "logs" / f"{service}.log").exists()
