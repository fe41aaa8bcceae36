"""Grafana dashboards and alert rules: every query parses with promtool and names only catalog metrics and labels."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_checks import (
    ALERTS,
    DASHBOARDS,
    DEPLOY,
    K8S,
    catalog_series,
    dashboard_queries,
    dashboards,
    load_script,
    metric_names,
    require_tool,
    substitute,
    variable_queries,
)

from services.platform.metrics import SPECS

LABEL_VALUES = re.compile(
    r"^label_values\((?P<metric>[a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*(?P<label>[a-zA-Z_]\w*)\)$"
)


def _alert_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [(rule["alert"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def _labels_used(expr: str) -> set[str]:
    """Label names in matchers, grouping clauses and vector-matching clauses."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    labels = set()
    for matchers in re.findall(r"\{([^}]*)\}", text):
        labels.update(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    for clause in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        labels.update(label.strip() for label in clause.split(",") if label.strip())
    return labels


def _check_names(where: str, expr: str) -> list[str]:
    series = catalog_series()
    names = metric_names(expr)
    problems = []
    if not names:
        problems.append(f"{where}: selects no metric: {expr}")
    unknown = names - series.keys()
    if unknown:
        problems.append(f"{where}: not in services/platform/metrics.py: {sorted(unknown)}")
    allowed = {label for name in names & series.keys() for label in SPECS[series[name]].labels}
    if any(name.endswith("_bucket") for name in names):
        allowed.add("le")
    stray = _labels_used(expr) - allowed
    if stray:
        problems.append(f"{where}: labels {sorted(stray)} are not labels of {sorted(names)}")
    return problems


def test_the_four_dashboards_exist_and_the_configmap_carries_exactly_them() -> None:
    names = set(dashboards())
    assert names == {
        "p2pgrid-market.json",
        "p2pgrid-grid.json",
        "p2pgrid-metering.json",
        "p2pgrid-services.json",
    }
    kustomization = yaml.safe_load((DEPLOY / "grafana" / "kustomization.yaml").read_text())
    generator = next(
        item for item in kustomization["configMapGenerator"] if item["name"] == "grafana-dashboards"
    )
    assert {Path(path).name for path in generator["files"]} == names


def test_every_panel_query_names_only_catalog_metrics_and_their_labels() -> None:
    problems = []
    for query in dashboard_queries():
        problems += _check_names(query.where, substitute(query.expr))
    assert not problems, "\n".join(problems)
    assert len(dashboard_queries()) >= 40


def test_every_variable_lists_a_label_of_a_catalog_metric() -> None:
    for query in variable_queries():
        match = LABEL_VALUES.match(query.expr)
        assert match, f"{query.where}: expected label_values(metric, label), got {query.expr}"
        spec = SPECS.get(match["metric"])
        assert spec is not None, f"{query.where}: {match['metric']} is not in the catalog"
        assert match["label"] in spec.labels, (
            f"{query.where}: {match['metric']} has no label {match['label']}"
        )


def test_every_alert_rule_names_only_catalog_metrics_and_their_labels() -> None:
    problems = []
    for alert, expr in _alert_expressions():
        problems += _check_names(f"alert {alert}", expr)
    assert not problems, "\n".join(problems)


def test_the_name_check_catches_an_unknown_metric_and_a_misspelled_label() -> None:
    assert _check_names("probe", "rate(p2pgrid_orders_placed_total[1m])")
    assert _check_names("probe", "sum by (nodes) (p2pgrid_node_price_micro_per_kwh)")
    assert not _check_names("probe", "sum by (node) (p2pgrid_node_price_micro_per_kwh)")


def test_every_dashboard_query_and_alert_rule_parses_with_promtool(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    queries = dashboard_queries()
    rules = {
        "groups": [
            {
                "name": "dashboard-queries",
                "rules": [
                    {"record": f"p2pgrid:dashboard_query:{index}", "expr": substitute(query.expr)}
                    for index, query in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    result = subprocess.run(
        [promtool, "check", "rules", str(path), str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout + result.stderr


def test_promtool_rejects_a_broken_query(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    path = tmp_path / "broken.yml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "r", "expr": "sum by (node (x)"}]}]})
    )
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0


@pytest.mark.parametrize("name", sorted(path.name for path in DASHBOARDS.glob("*.json")))
def test_every_dashboard_is_well_formed_for_grafana(name: str) -> None:
    dashboard = dashboards()[name]
    assert dashboard["uid"] == name.removesuffix(".json")
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    occupied: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        position = panel["gridPos"]
        assert position["x"] >= 0 and position["x"] + position["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(position["x"], position["x"] + position["w"])
            for y in range(position["y"], position["y"] + position["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"{panel['title']} has no query"
        assert panel["description"], f"{panel['title']} has no description"
        for target in panel["targets"]:
            # Every variable a query uses is defined (or is one of Grafana's own).
            for variable in re.findall(r"\$\{?(\w+)\}?", target["expr"]):
                assert variable.startswith("__") or variable in variables, f"{panel['title']}: ${variable}"


def test_the_dashboards_are_built_from_their_description() -> None:
    built = load_script(DEPLOY / "grafana" / "build_dashboards.py").rendered()
    stale = [path.name for path, text in built.items() if not path.exists() or path.read_text() != text]
    assert not stale, f"stale: {stale}; run .venv/bin/python deploy/grafana/build_dashboards.py"
    assert set(built) == set(DASHBOARDS.glob("*.json"))


def test_grafana_provisioning_points_at_the_mounted_dashboards_and_prometheus() -> None:
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "p2pgrid.yaml").read_text()
    )
    path = provider["providers"][0]["options"]["path"]
    grafana = yaml.safe_load_all((K8S / "components" / "monitoring" / "grafana.yaml").read_text())
    deployment = next(doc for doc in grafana if doc["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts[path]]["configMap"]["name"] == "grafana-dashboards"
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )
    (source,) = datasource["datasources"]
    assert source["type"] == "prometheus"
    env = {entry["name"]: entry.get("value") for entry in container["env"]}
    assert source["url"] == "${P2PGRID_PROMETHEUS_URL}"
    assert env["P2PGRID_PROMETHEUS_URL"] == "http://prometheus:9090"
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(path + "/") and (DASHBOARDS / Path(home).name).is_file()
    assert json.loads((DASHBOARDS / Path(home).name).read_text())["uid"] == "p2pgrid-market"
