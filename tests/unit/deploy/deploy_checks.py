"""Shared helpers of the deployment tests: the tools, rendering the overlays, and reading dashboard queries."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.platform.metrics import CATALOG

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = {"base": K8S / "base", "dev": K8S / "overlays" / "dev", "prod": K8S / "overlays" / "prod"}
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
INSTALL_HINT = "run scripts/install_test_tools.sh (prometheus, promtool) and `make setup` (kubectl)"


def find_tool(name: str) -> str | None:
    """The tool beside this Python (installed into the virtual environment by pip), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def require_tool(name: str) -> str:
    """The tool's path; without it the test fails when CI is set and is skipped otherwise."""
    path = find_tool(name)
    if path is None:
        message = f"{name} not found: {INSTALL_HINT}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_module(name: str) -> Any:
    """The imported module; without it the test fails when CI is set and is skipped otherwise."""
    try:
        return importlib.import_module(name)
    except ImportError:
        message = f"Python package for {name} not installed: run `make setup` (dev extras)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message, allow_module_level=True)


def load_script(path: Path) -> Any:
    """Import a script of deploy/ (generate.py, build_dashboards.py) as a module."""
    spec = importlib.util.spec_from_file_location(f"deploy_script_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """Every object `kubectl kustomize` renders for the overlay (`base`, `dev` or `prod`)."""
    kubectl = require_tool("kubectl")
    result = subprocess.run(
        [kubectl, "kustomize", str(OVERLAYS[overlay])], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {OVERLAYS[overlay]} failed:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def of_kind(objects: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def named(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    for obj in of_kind(objects, kind):
        if obj["metadata"]["name"] == name:
            return obj
    raise AssertionError(f"no {kind} named {name!r}")


def workloads(objects: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] in ("Deployment", "StatefulSet")]


def service_deployments(objects: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    """The p2pgrid service Deployments by service module name (`order_book`, ...)."""
    found = {}
    for deployment in of_kind(objects, "Deployment"):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        command = container.get("command", [])
        if command[:2] == ["python", "-m"] and command[2].startswith("services."):
            found[command[2].removeprefix("services.")] = deployment
    return found


def env_values(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The container's environment entries by name."""
    return {entry["name"]: entry for entry in container.get("env", [])}


# Dashboards.


@dataclass(frozen=True)
class DashboardQuery:
    dashboard: str
    panel: str
    ref_id: str
    expr: str

    @property
    def where(self) -> str:
        return f"{self.dashboard} / {self.panel} / {self.ref_id}"


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_queries() -> list[DashboardQuery]:
    """Every PromQL query of every panel of every dashboard."""
    queries = []
    for name, dashboard in dashboards().items():
        for panel in _panels(dashboard["panels"]):
            for target in panel.get("targets", []):
                queries.append(DashboardQuery(name, panel["title"], target["refId"], target["expr"]))
    return queries


def variable_queries() -> list[DashboardQuery]:
    """The `label_values(metric, label)` queries of the dashboards' template variables."""
    queries = []
    for name, dashboard in dashboards().items():
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                queries.append(
                    DashboardQuery(name, f"${variable['name']}", "variable", variable["definition"])
                )
    return queries


def substitute(expr: str, *, rate_interval: str = "1m", range_: str = "1h") -> str:
    """The query as Grafana sends it with every variable at All (`.*`)."""
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__range", range_)
    expr = expr.replace("$__interval", rate_interval)
    return re.sub(r"\$\{?([a-z_]+)\}?", ".*", expr)


_KEYWORDS = {
    # Aggregations, functions and modifiers appear only before "(" or as bare words.
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (a small lexer: enough for dashboards and rules)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery windows
    # Label lists of by/without/on/ignoring/group_left/group_right.
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def catalog_series() -> dict[str, str]:
    """Every series name the catalog's metrics export, mapped to the declared metric name."""
    series = {}
    for spec in CATALOG:
        if spec.kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                series[spec.name + suffix] = spec.name
        else:
            series[spec.name] = spec.name
    return series
