"""NetworkPolicies: evaluated against the flows of DESIGN.md §1, every needed flow is allowed and nothing else.

The evaluator follows the NetworkPolicy semantics of the Kubernetes API: a
pod selected by no policy of a direction is open in that direction; a
selected pod accepts a connection if any rule of any selecting policy
matches the peer (podSelector and namespaceSelector, both when given;
ipBlock for addresses outside the cluster) and the port (numbers, names
resolved on the destination pod, protocol TCP by default). A connection
needs both the source's egress and the destination's ingress.
"""

from __future__ import annotations

import dataclasses
import importlib
import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pytest
from deploy_checks import of_kind, render, service_deployments, workloads

from services.stack.supervisor import SERVICES


@dataclass(frozen=True)
class Pod:
    """A pod of a workload, or a pod standing for a client in another namespace."""

    name: str
    namespace: str
    labels: dict[str, str]
    ports: dict[str, tuple[int, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Address:
    """A host outside the cluster."""

    name: str
    ip: str


Peer = Pod | Address


def _matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Label selector semantics; an empty selector matches everything."""
    if selector is None:
        return True
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def _namespace_labels(namespace: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": namespace}


class Policies:
    def __init__(self, objects: tuple[dict[str, Any], ...]) -> None:
        self.policies = of_kind(objects, "NetworkPolicy")

    def _selecting(self, pod: Pod, direction: str) -> list[dict[str, Any]]:
        chosen = []
        for policy in self.policies:
            spec = policy["spec"]
            types = spec.get("policyTypes") or (["Ingress", "Egress"] if "egress" in spec else ["Ingress"])
            if (
                policy["metadata"]["namespace"] == pod.namespace
                and direction in types
                and _matches(spec["podSelector"], pod.labels)
            ):
                chosen.append(policy)
        return chosen

    @staticmethod
    def _peer_matches(entry: dict[str, Any], peer: Peer, policy_namespace: str) -> bool:
        if "ipBlock" in entry:
            if not isinstance(peer, Address):
                return False
            address = ipaddress.ip_address(peer.ip)
            block = entry["ipBlock"]
            return address in ipaddress.ip_network(block["cidr"]) and not any(
                address in ipaddress.ip_network(excluded) for excluded in block.get("except", [])
            )
        if not isinstance(peer, Pod):
            return False
        if "namespaceSelector" in entry:
            if not _matches(entry["namespaceSelector"], _namespace_labels(peer.namespace)):
                return False
        elif peer.namespace != policy_namespace:
            return False
        return _matches(entry.get("podSelector"), peer.labels)

    @staticmethod
    def _port_matches(rule: dict[str, Any], destination: Peer, port: int, protocol: str) -> bool:
        entries = rule.get("ports")
        if not entries:
            return True
        for entry in entries:
            if entry.get("protocol", "TCP") != protocol:
                continue
            wanted = entry.get("port")
            if wanted is None:
                return True
            if isinstance(wanted, str):
                # A named port is looked up on the destination pod.
                if isinstance(destination, Pod) and destination.ports.get(wanted) == (port, protocol):
                    return True
                continue
            if wanted <= port <= entry.get("endPort", wanted):
                return True
        return False

    def _allows(
        self, pod: Pod, direction: str, peer: Peer, destination: Peer, port: int, protocol: str
    ) -> bool:
        selecting = self._selecting(pod, direction)
        if not selecting:
            return True
        key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        for policy in selecting:
            for rule in policy["spec"].get(key, []) or []:
                peers = rule.get(peers_key)
                peer_ok = not peers or any(
                    self._peer_matches(entry, peer, policy["metadata"]["namespace"]) for entry in peers
                )
                if peer_ok and self._port_matches(rule, destination, port, protocol):
                    return True
        return False

    def allows(self, source: Peer, destination: Peer, port: int, protocol: str = "TCP") -> bool:
        if isinstance(source, Pod) and not self._allows(
            source, "Egress", destination, destination, port, protocol
        ):
            return False
        return not (
            isinstance(destination, Pod)
            and not self._allows(destination, "Ingress", source, destination, port, protocol)
        )


def _pods(objects: tuple[dict[str, Any], ...]) -> dict[str, Pod]:
    pods = {}
    for workload in workloads(objects):
        template = workload["spec"]["template"]
        ports = {
            port["name"]: (port["containerPort"], port.get("protocol", "TCP"))
            for container in template["spec"]["containers"]
            for port in container.get("ports", [])
        }
        name = workload["metadata"]["name"]
        replicas = workload["spec"].get("replicas", 1)
        for index in range(replicas if workload["kind"] == "StatefulSet" else 1):
            pod_name = f"{name}-{index}" if workload["kind"] == "StatefulSet" else name
            pods[pod_name] = Pod(
                pod_name, workload["metadata"]["namespace"], template["metadata"]["labels"], ports
            )
    return pods


def _with_database() -> list[str]:
    """Services whose settings take a database URL: they keep state in PostgreSQL."""
    stateful = []
    for service in SERVICES:
        settings = importlib.import_module(f"services.{service}.settings").Settings
        if any(item.name == "database_url" for item in dataclasses.fields(settings)):
            stateful.append(service)
    return stateful


OPERATOR = Pod("operator-console", "operations", {"p2pgrid.io/operator": "true"})
STRANGER = Pod("some-app", "other-team", {"app.kubernetes.io/name": "some-app"})
KUBE_DNS = Pod("coredns", "kube-system", {"k8s-app": "kube-dns"})
BOT = Address("a trading bot on the internet", "203.0.113.7")
GATEWAY = Address("a meter gateway pushing readings", "198.51.100.23")
MODBUS_METER = Address("a Modbus TCP meter", "192.0.2.40")
EXTERNAL_DATABASE = Address("the production PostgreSQL server", "10.20.30.40")
INTERNET = Address("anything else", "93.184.216.34")


def _flows(
    overlay: str,
) -> tuple[list[tuple[Peer, Peer, int, str]], list[tuple[Peer, Peer, int, str]], Policies]:
    """The needed flows (DESIGN.md §1) and flows that must stay closed, for one overlay."""
    objects = render(overlay)
    pods = _pods(objects)
    by_service = {
        service: pods[deployment["metadata"]["name"]]
        for service, deployment in service_deployments(objects).items()
    }
    grpc, metrics = 50051, 9464
    nats = [pods[f"nats-{index}"] for index in range(3)]
    if overlay == "dev":
        prometheus = pods["prometheus"]
        database: Peer = pods["postgres-0"]
    else:
        prometheus = Pod("prometheus-server", "monitoring", {"app.kubernetes.io/name": "prometheus"})
        database = EXTERNAL_DATABASE
    needed: list[tuple[Peer, Peer, int, str]] = [
        (BOT, by_service["order_book"], grpc, "TCP"),
        (GATEWAY, by_service["meter_ingest"], grpc, "TCP"),
        (BOT, by_service["ledger"], grpc, "TCP"),  # participants read statements and receipts
        (OPERATOR, by_service["grid_check"], grpc, "TCP"),
        (OPERATOR, by_service["matcher"], grpc, "TCP"),  # what-if clearings
        (by_service["meter_ingest"], MODBUS_METER, 502, "TCP"),
    ]
    for pod in by_service.values():
        needed += [(pod, server, 4222, "TCP") for server in nats]
        needed.append((prometheus, pod, metrics, "TCP"))
    for service in _with_database():
        needed.append((by_service[service], database, 5432, "TCP"))
    for one in nats:
        needed += [(one, other, 6222, "TCP") for other in nats if other is not one]
    for pod in pods.values():
        needed += [(pod, KUBE_DNS, 53, "UDP"), (pod, KUBE_DNS, 53, "TCP")]
    if overlay == "dev":
        needed += [
            (pods["grafana"], prometheus, 9090, "TCP"),
            (OPERATOR, pods["grafana"], 3000, "TCP"),
            (OPERATOR, prometheus, 9090, "TCP"),
        ]

    closed: list[tuple[Peer, Peer, int, str]] = [
        (BOT, nats[0], 4222, "TCP"),
        (STRANGER, nats[0], 4222, "TCP"),
        (BOT, nats[0], 6222, "TCP"),
        (BOT, by_service["grid_check"], grpc, "TCP"),
        (BOT, by_service["matcher"], grpc, "TCP"),
        (STRANGER, by_service["grid_check"], grpc, "TCP"),
        (BOT, by_service["order_book"], metrics, "TCP"),
        (STRANGER, by_service["ledger"], metrics, "TCP"),
        # Services talk through NATS only, never to each other directly.
        (by_service["order_book"], by_service["ledger"], grpc, "TCP"),
        (by_service["matcher"], by_service["grid_check"], grpc, "TCP"),
        (by_service["ledger"], by_service["order_book"], grpc, "TCP"),
        # Only the Modbus poller reaches meters; nothing reaches the internet.
        (by_service["order_book"], MODBUS_METER, 502, "TCP"),
        (by_service["meter_ingest"], MODBUS_METER, 503, "TCP"),
        (by_service["ledger"], INTERNET, 443, "TCP"),
        (nats[0], INTERNET, 443, "TCP"),
        (by_service["meter_ingest"], nats[0], 6222, "TCP"),
    ]
    stateless = [service for service in SERVICES if service not in _with_database()]
    closed += [(by_service[service], database, 5432, "TCP") for service in stateless]
    if overlay == "dev":
        closed += [
            (BOT, database, 5432, "TCP"),
            (STRANGER, database, 5432, "TCP"),
            (BOT, pods["grafana"], 3000, "TCP"),
            (BOT, prometheus, 9090, "TCP"),
            (prometheus, INTERNET, 443, "TCP"),
        ]
    return needed, closed, Policies(objects)


def _describe(flow: tuple[Peer, Peer, int, str]) -> str:
    source, destination, port, protocol = flow
    return f"{source.name} -> {destination.name}:{port}/{protocol}"


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_every_flow_the_services_need_is_allowed(overlay: str) -> None:
    needed, _, policies = _flows(overlay)
    blocked = [_describe(flow) for flow in needed if not policies.allows(*flow)]
    assert not blocked, "blocked flows:\n" + "\n".join(blocked)


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_flows_outside_the_design_are_denied(overlay: str) -> None:
    _, closed, policies = _flows(overlay)
    open_flows = [_describe(flow) for flow in closed if policies.allows(*flow)]
    assert not open_flows, "flows that should be closed:\n" + "\n".join(open_flows)


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_every_pod_is_isolated_by_default_in_both_directions(overlay: str) -> None:
    objects = render(overlay)
    policies = Policies(objects)
    for pod in _pods(objects).values():
        for direction in ("Ingress", "Egress"):
            names = [policy["metadata"]["name"] for policy in policies._selecting(pod, direction)]
            assert "default-deny" in names, f"{pod.name} is not isolated for {direction}"
    deny = next(policy for policy in policies.policies if policy["metadata"]["name"] == "default-deny")
    assert deny["spec"]["podSelector"] == {}
    assert not deny["spec"].get("ingress") and not deny["spec"].get("egress")


def test_without_the_default_deny_policy_unlisted_pods_would_be_open() -> None:
    # The evaluator itself: a pod no policy selects accepts anything.
    objects = tuple(
        obj
        for obj in render("dev")
        if not (obj["kind"] == "NetworkPolicy" and obj["metadata"]["name"] != "nats")
    )
    policies = Policies(objects)
    pods = _pods(objects)
    assert policies.allows(BOT, pods["ledger"], 9464)
    assert not policies.allows(BOT, pods["nats-0"], 4222)
