"""The Kustomize base and overlays: they render, every object is valid Kubernetes, and they match the services."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_checks import (
    DEPLOY,
    K8S,
    OVERLAYS,
    REPO,
    env_values,
    named,
    of_kind,
    render,
    require_module,
    require_tool,
    service_deployments,
    workloads,
)

from services.platform.subjects import STREAMS
from services.stack.supervisor import SERVICES

kubernetes_validate = require_module("kubernetes_validate")
SECRET_NAME = "p2pgrid-secrets"
GRPC_PORT = 50051
METRICS_PORT = 9464


def _validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def _settings_class(service: str) -> type[Any]:
    return importlib.import_module(f"services.{service}.settings").Settings  # type: ignore[no-any-return]


def _pod_specs(objects: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    return [(obj["metadata"]["name"], obj["spec"]["template"]["spec"]) for obj in workloads(objects)]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_every_overlay_renders_and_every_object_is_valid_against_the_kubernetes_schemas(overlay: str) -> None:
    objects = render(overlay)
    assert len(objects) > 30
    errors = []
    for obj in objects:
        try:
            _validate(obj)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not errors, "\n".join(errors)


def test_the_schema_check_rejects_a_misspelled_field_and_a_wrong_type() -> None:
    deployment = copy.deepcopy(named(render("dev"), "Deployment", "ledger"))
    misspelled = copy.deepcopy(deployment)
    misspelled["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": GRPC_PORT}}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(misspelled)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(wrong_type)


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_there_is_one_deployment_service_and_disruption_budget_per_service(overlay: str) -> None:
    objects = render(overlay)
    deployments = service_deployments(objects)
    assert sorted(deployments) == sorted(SERVICES)
    for service, deployment in deployments.items():
        name = deployment["metadata"]["name"]
        assert name == service.replace("_", "-")
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        for kind in ("Service", "PodDisruptionBudget"):
            selector = named(objects, kind, name)["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            assert selector.items() <= labels.items(), f"{kind}/{name} does not select its pods"
        assert named(objects, "Service", f"{name}-metrics")["spec"]["clusterIP"] == "None"
    nats_labels = named(objects, "StatefulSet", "nats")["spec"]["template"]["metadata"]["labels"]
    assert named(objects, "PodDisruptionBudget", "nats")["spec"]["selector"]["matchLabels"].items() <= (
        nats_labels.items()
    )


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_every_container_command_names_an_existing_service_module(overlay: str) -> None:
    deployments = service_deployments(render(overlay))
    assert deployments
    for service, deployment in deployments.items():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["python", "-m", f"services.{service}"]
        assert (REPO / "services" / service / "__main__.py").is_file(), f"services/{service}/__main__.py"


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_every_probe_and_port_matches_the_services_own_settings(overlay: str) -> None:
    objects = render(overlay)
    for service, deployment in service_deployments(objects).items():
        prefix = f"P2PGRID_{service.upper()}_"
        template = deployment["spec"]["template"]
        container = template["spec"]["containers"][0]
        env = env_values(container)
        grpc_port = int(env[f"{prefix}GRPC_PORT"]["value"])
        metrics_port = int(env[f"{prefix}METRICS_PORT"]["value"])
        # Bound to every interface: probes and peers reach the pod on its own address.
        assert env[f"{prefix}GRPC_HOST"]["value"] == "0.0.0.0"
        assert env[f"{prefix}METRICS_HOST"]["value"] == "0.0.0.0"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == grpc_port, f"{service} {probe}"
            assert container[probe]["grpc"].get("service", "") == "", (
                f"{service} {probe} checks the overall status"
            )
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports == {"grpc": grpc_port, "metrics": metrics_port}
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == metrics_port
        name = deployment["metadata"]["name"]
        service_ports = {port["name"]: port for port in named(objects, "Service", name)["spec"]["ports"]}
        assert service_ports["grpc"]["port"] == grpc_port
        assert service_ports["grpc"]["targetPort"] == "grpc"
        metrics_service = named(objects, "Service", f"{name}-metrics")
        assert [port["port"] for port in metrics_service["spec"]["ports"]] == [metrics_port]


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_every_service_setting_in_the_environment_exists_and_every_required_one_is_set(overlay: str) -> None:
    for service, deployment in service_deployments(render(overlay)).items():
        prefix = f"P2PGRID_{service.upper()}_"
        fields = dataclasses.fields(_settings_class(service))
        known = {f"{prefix}{field.name.upper()}" for field in fields}
        required = {
            f"{prefix}{field.name.upper()}"
            for field in fields
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        }
        env = env_values(deployment["spec"]["template"]["spec"]["containers"][0])
        ours = {name for name in env if name.startswith("P2PGRID_")}
        assert ours <= known, f"{service}: no such settings {sorted(ours - known)}"
        assert required <= ours, f"{service}: required settings missing {sorted(required - ours)}"


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_each_service_connects_to_nats_as_its_own_user_with_its_own_password(overlay: str) -> None:
    for service, deployment in service_deployments(render(overlay)).items():
        env = env_values(deployment["spec"]["template"]["spec"]["containers"][0])
        names = list(env)
        url = env[f"P2PGRID_{service.upper()}_NATS_URL"]["value"]
        assert url == f"nats://{service}:$(NATS_PASSWORD)@nats:4222"
        # Kubernetes expands $(NATS_PASSWORD) only from variables defined earlier in the list.
        assert names.index("NATS_PASSWORD") < names.index(f"P2PGRID_{service.upper()}_NATS_URL")
        assert env["NATS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": SECRET_NAME,
            "key": f"nats_password_{service}",
        }


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_every_pod_runs_as_a_non_root_user_without_capabilities_and_with_limits(overlay: str) -> None:
    for name, pod in _pod_specs(render(overlay)):
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True, name
        assert context["runAsUser"] > 0, name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod.get("automountServiceAccountToken") is False, name
        for container in pod["containers"] + pod.get("initContainers", []):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            assert "add" not in security["capabilities"], name
            resources = container["resources"]
            assert {"cpu", "memory"} <= resources["requests"].keys(), name
            assert {"cpu", "memory"} <= resources["limits"].keys(), name


def test_the_image_runs_as_the_unprivileged_user_the_service_pods_require() -> None:
    containerfile = (DEPLOY / "Containerfile").read_text()
    users = re.findall(r"^USER\s+(\d+)(?::(\d+))?\s*$", containerfile, flags=re.MULTILINE)
    assert users, "the Containerfile sets no numeric USER"
    uid, gid = users[-1]
    assert re.search(r"pip install \.", containerfile), "the image installs the project from the repository"
    for deployment in service_deployments(render("prod")).values():
        context = deployment["spec"]["template"]["spec"]["securityContext"]
        assert context["runAsUser"] == int(uid)
        assert context["runAsGroup"] == int(gid or uid)
        image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        assert image.startswith("registry.example.com/p2pgrid/p2pgrid:")


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_secrets_are_only_referenced_and_every_key_is_documented(overlay: str) -> None:
    objects = render(overlay)
    assert not of_kind(objects, "Secret"), "secrets are never part of the manifests"
    documented = set()
    for line in (K8S / "secrets.example.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            documented.add(line.split("=", 1)[0].strip())
    referenced = set()
    for name, pod in _pod_specs(objects):
        for container in pod["containers"]:
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == SECRET_NAME, f"{name} uses secret {ref['name']}"
                    referenced.add(ref["key"])
            assert not container.get("envFrom"), f"{name}: name each secret key it needs"
    assert referenced, "nothing refers to the secret"
    assert referenced <= documented, f"undocumented secret keys: {sorted(referenced - documented)}"


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_the_network_file_every_service_loads_is_in_the_mounted_configmap(overlay: str) -> None:
    objects = render(overlay)
    grids = next(
        cm for cm in of_kind(objects, "ConfigMap") if cm["metadata"]["name"].startswith("p2pgrid-grids")
    )
    market = next(
        cm for cm in of_kind(objects, "ConfigMap") if cm["metadata"]["name"].startswith("p2pgrid-market")
    )
    grid_path = Path(market["data"]["grid_path"])
    assert grid_path.name in grids["data"]
    users = 0
    for service, deployment in service_deployments(objects).items():
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        for entry in container["env"]:
            ref = entry.get("valueFrom", {}).get("configMapKeyRef")
            if ref and ref["key"] == "grid_path":
                users += 1
                assert ref["name"] == market["metadata"]["name"]
                volumes = {volume["name"]: volume for volume in pod["volumes"]}
                mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
                volume = volumes[mounts[str(grid_path.parent)]]
                assert volume["configMap"]["name"] == grids["metadata"]["name"], service
    # The matcher and grid_check load the network, the order book takes its nodes from it.
    assert users == 3


def test_the_generated_nats_users_and_configmap_copies_are_up_to_date() -> None:
    result = subprocess.run(
        [
            os.environ.get("PYTHON", str(REPO / ".venv" / "bin" / "python")),
            str(K8S / "generate.py"),
            "--check",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_nats_runs_three_clustered_servers_that_sync_every_write_and_nats_server_accepts_the_config(
    overlay: str, tmp_path: Path
) -> None:
    objects = render(overlay)
    statefulset = named(objects, "StatefulSet", "nats")
    assert statefulset["spec"]["replicas"] == 3
    config_map = next(
        cm for cm in of_kind(objects, "ConfigMap") if cm["metadata"]["name"].startswith("nats-config")
    )
    for name, text in config_map["data"].items():
        (tmp_path / name).write_text(text)
    nats_conf = config_map["data"]["nats.conf"]
    assert re.search(r"^\s*sync_interval:\s*always\s*$", nats_conf, flags=re.MULTILINE)
    headless = statefulset["spec"]["serviceName"]
    routes = set(re.findall(r"nats://([a-z0-9.-]+):6222", nats_conf))
    assert routes == {f"nats-{index}.{headless}" for index in range(3)}
    assert named(objects, "Service", headless)["spec"]["clusterIP"] == "None"
    # Every user's password is a variable the StatefulSet sets from the secret.
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    env = {entry["name"]: "x" for entry in container["env"]}
    for variable in re.findall(r"password:\s*\$([A-Z_]+)", config_map["data"]["auth.conf"]):
        assert variable in env, f"{variable} is not set in the NATS pods"
    users = set(re.findall(r"^\s*user:\s*(\w+)\s*$", config_map["data"]["auth.conf"], flags=re.MULTILINE))
    assert users == set(SERVICES)
    for stream in STREAMS:
        assert f'"$JS.API.STREAM.CREATE.{stream.name}"' in config_map["data"]["auth.conf"]
    nats_server = require_tool("nats-server")
    result = subprocess.run(
        [nats_server, "-t", "-c", str(tmp_path / "nats.conf")],
        capture_output=True,
        text=True,
        env={**os.environ, **env, "POD_NAME": "nats-0"},
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_finds_every_service_through_its_metrics_name_and_promtool_accepts_the_config(
    tmp_path: Path,
) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (dns,) = job["dns_sd_configs"]
    expected = {
        deployment["metadata"]["name"] + "-metrics"
        for deployment in service_deployments(render("dev")).values()
    }
    assert set(dns["names"]) == expected
    assert dns["port"] == METRICS_PORT
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dev_overlay_brings_postgresql_prometheus_and_grafana_and_prod_brings_none() -> None:
    dev = {(obj["kind"], obj["metadata"]["name"]) for obj in render("dev")}
    prod = {(obj["kind"], obj["metadata"]["name"]) for obj in render("prod")}
    for workload in (("StatefulSet", "postgres"), ("Deployment", "prometheus"), ("Deployment", "grafana")):
        assert workload in dev
        assert workload not in prod
    for objects, namespace in ((render("dev"), "p2pgrid-dev"), (render("prod"), "p2pgrid")):
        for obj in objects:
            if obj["kind"] != "Namespace":
                assert obj["metadata"].get("namespace") == namespace, obj["metadata"]["name"]
        ns = named(objects, "Namespace", namespace)
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
