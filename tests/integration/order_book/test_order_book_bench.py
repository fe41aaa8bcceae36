"""`p2pgrid bench orders` run small: every phase prints its JSON line and every acknowledged order is stored."""

from __future__ import annotations

import json
import subprocess
import sys

from services.platform.nats_server import env_without_proxy


def test_the_orders_benchmark_prints_every_phase_and_stores_every_acknowledged_order() -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "bench",
            "orders",
            "--orders",
            "400",
            "--batch-size",
            "100",
            "--single-orders",
            "300",
            "--participants",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env_without_proxy(),
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = {line["phase"]: line for line in map(json.loads, completed.stdout.splitlines())}
    assert list(lines) == [
        "verify_baseline",
        "batch",
        "single",
        "unary_baseline",
        "null_server_ceiling",
        "check",
    ]
    assert lines["batch"]["accepted"] == 400
    # The ratio is taken before rounding the two rates it divides.
    assert (
        abs(
            lines["batch"]["ratio"] - lines["batch"]["orders_per_s"] / lines["batch"]["baseline_verify_per_s"]
        )
        < 2e-3
    )
    assert lines["single"]["accepted"] == 300
    for phase in ("single", "unary_baseline", "null_server_ceiling"):
        assert 0 < lines[phase]["p50_ms"] <= lines[phase]["p99_ms"]
    assert lines["null_server_ceiling"]["calls"] == 300
    assert lines["check"] == {"bench": "orders", "phase": "check", "stored": 700, "acknowledged": 700}
