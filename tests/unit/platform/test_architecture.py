"""The tree keeps its architecture: pure domain code imports no framework, and every module says what it is for."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
FRAMEWORKS = ("grpc", "nats", "sqlalchemy", "pymodbus", "prometheus_client", "alembic", "psycopg")
SERVICES = ("meter_ingest", "order_book", "matcher", "grid_check", "ledger")


def _domain_modules() -> list[Path]:
    paths = list((ROOT / "services" / "domain").rglob("*.py"))
    for service in SERVICES:
        paths += list((ROOT / "services" / service / "domain").rglob("*.py"))
    return sorted(paths)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", _domain_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_domain_code_imports_no_framework_and_no_adapter(path: Path) -> None:
    for name in _imports(path):
        top = name.split(".")[0]
        assert top not in FRAMEWORKS, f"{path.relative_to(ROOT)} imports {name}"
        assert ".adapters" not in name and not name.startswith("services.platform"), (
            f"{path.relative_to(ROOT)} imports {name}"
        )


def test_services_never_import_each_other() -> None:
    for service in SERVICES:
        for path in (ROOT / "services" / service).rglob("*.py"):
            for name in _imports(path):
                for other in SERVICES:
                    if other != service:
                        assert not name.startswith(f"services.{other}"), (
                            f"{path.relative_to(ROOT)} imports {name}"
                        )


def test_every_hand_written_module_opens_with_a_docstring() -> None:
    missing = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        if "gen" in path.relative_to(ROOT).parts or path.stat().st_size == 0:
            continue
        if ast.get_docstring(ast.parse(path.read_text())) is None:
            missing.append(str(path.relative_to(ROOT)))
    assert missing == []


def test_every_command_and_every_service_explains_itself_with_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "up" in result.stdout and "bench" in result.stdout
    for service in SERVICES:
        result = subprocess.run(
            [sys.executable, "-m", f"services.{service}", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert "--nats-url" in result.stdout and f"P2PGRID_{service.upper()}_" in result.stdout
