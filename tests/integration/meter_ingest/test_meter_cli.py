"""`p2pgrid meters simulate` serves meters in its own process; `p2pgrid meters read` reads one and prints JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from services.cli import main
from services.meter_ingest.maps import MAPS_DIR, load_register_map


def _simulate(*args: str) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "meters", "simulate", "--port", "0", *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.kill()
        raise AssertionError("the simulator did not start")
    event = json.loads(line)
    assert event["event"] == "listening"
    return process, int(event["ports"][0])


@pytest.fixture
def stop_later() -> Iterator[list[subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.mark.parametrize("framer", ["socket", "rtu"])
def test_meters_read_prints_the_canonical_quantities_of_a_simulated_meter(
    framer: str, stop_later: list[subprocess.Popen[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    map_path = str(MAPS_DIR / "eastron_sdm630_v2.yaml")
    process, port = _simulate("--map", map_path, "--vectors", "--framer", framer)
    stop_later.append(process)
    code = main(["meters", "read", "--map", map_path, "--port", str(port), "--unit", "1", "--framer", framer])
    body = json.loads(capsys.readouterr().out)
    assert code == 0
    expected = load_register_map("eastron_sdm630_v2").test_vectors[0].expect
    for name in (
        "energy_import_wh",
        "energy_export_wh",
        "power_w",
        "voltage_l1_v",
        "current_l1_a",
        "frequency_hz",
    ):
        assert body[name] == pytest.approx(expected[name]), name
    assert body["voltage_l3_v"] == pytest.approx(229.8) and body["power_l2_w"] == 790
    assert "invalid" not in body


def test_meters_read_of_a_meter_that_does_not_answer_flags_everything_and_exits_1(
    stop_later: list[subprocess.Popen[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    process, port = _simulate(
        "--map", "eastron_sdm120", "--count", "2", "--speedup", "60", "--fault", "2:timeout"
    )
    stop_later.append(process)
    ok = main(
        ["meters", "read", "--map", "eastron_sdm120", "--port", str(port), "--unit", "1", "--timeout", "1"]
    )
    live = json.loads(capsys.readouterr().out)
    dead_code = main(
        ["meters", "read", "--map", "eastron_sdm120", "--port", str(port), "--unit", "2", "--timeout", "0.2"]
    )
    dead = json.loads(capsys.readouterr().out)
    assert ok == 0 and live["energy_import_wh"] > 0 and 45 < live["frequency_hz"] < 55
    assert dead_code == 1
    assert "energy_import_wh" not in dead and dead["invalid"]["energy_import_wh"] == "timeout"


def test_meters_simulate_rejects_an_unknown_fault_kind() -> None:
    command = ["meters", "simulate", "--map", "eastron_sdm120", "--port", "0", "--fault", "1:melted"]
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", *command],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "KIND must be one of" in result.stderr
