"""A bad meters file stops meter_ingest at start with one line that names the setting, the file and the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml


def test_a_bad_meters_file_exits_2_with_one_line_naming_the_entry_and_field(tmp_path: Path) -> None:
    meters = tmp_path / "meters.yaml"
    entry = {"meter_id": "m-1", "participant_id": "p-1", "node_id": "n1", "map": "eastron_sdm120"}
    meters.write_text(
        yaml.safe_dump({"meters": [{**entry, "modbus": {"host": "10.0.0.9", "framer": "ascii"}}]})
    )
    result = subprocess.run(
        [
            sys.executable, "-m", "services.meter_ingest", "--nats-url", "nats://127.0.0.1:1",
            "--database-url", f"sqlite:///{tmp_path / 'mi.db'}", "--meters-path", str(meters),
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--meters-path" in lines[0] and f"{meters}: meters[0].modbus.framer: must be 'socket'" in lines[0]
