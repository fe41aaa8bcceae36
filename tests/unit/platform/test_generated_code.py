"""services/gen/ is exactly what `make proto` makes from proto/."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _differences(left: Path, right: Path) -> list[str]:
    comparison = filecmp.dircmp(left, right, ignore=["__pycache__"])
    found = [f"only in {left.name}: {n}" for n in comparison.left_only]
    found += [f"only in fresh output: {n}" for n in comparison.right_only]
    found += [f"differs: {n}" for n in comparison.diff_files]
    for name in comparison.common_dirs:
        found += [f"{name}/{d}" for d in _differences(left / name, right / name)]
    return found


def test_the_generated_code_is_not_stale(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    assert _differences(ROOT / "services" / "gen", out) == [], "run `make proto` and commit services/gen/"


def test_every_generated_file_is_headed_do_not_edit() -> None:
    for path in (ROOT / "services" / "gen").rglob("*.py*"):
        if path.suffix in (".py", ".pyi"):
            assert "DO NOT EDIT" in path.read_text().splitlines()[0], path
