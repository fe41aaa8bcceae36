"""Generate the derived files of the Kubernetes base: NATS users and permissions, and the network and meter-map copies.

Run from the repository root:

    .venv/bin/python deploy/k8s/generate.py          # rewrite the generated files
    .venv/bin/python deploy/k8s/generate.py --check  # exit 1 if any is stale

`base/nats/auth.conf` gives each service its own NATS user whose publish and
subscribe permissions follow from `services/platform/subjects.py` and from
who produces and who consumes what (DESIGN.md §1 and §2, the `ROLES` table
below). `base/config/grids/` and `base/config/meters/` are copies of
`deploy/grids/*.yaml` and `hw/meters/*.yaml`: kustomize only reads files at
or below a kustomization's own folder, so the ConfigMaps are generated from
these copies.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from services.platform import subjects  # noqa: E402

BASE = REPO / "deploy" / "k8s" / "base"
AUTH_CONF = BASE / "nats" / "auth.conf"
CONFIG_KUSTOMIZATION = BASE / "config" / "kustomization.yaml"
COPIES = {
    REPO / "deploy" / "grids": BASE / "config" / "grids",
    REPO / "hw" / "meters": BASE / "config" / "meters",
}
ACCOUNT = "P2PGRID"


@dataclass(frozen=True)
class Role:
    """What one service does on NATS.

    `publishes`: JetStream subjects it produces. `consumes`: (stream, subject)
    pairs it reads through durable pull consumers. `requests`: core-NATS
    subjects it asks on. `serves`: core-NATS subjects it answers.
    """

    publishes: tuple[str, ...] = ()
    consumes: tuple[tuple[str, str], ...] = ()
    requests: tuple[str, ...] = ()
    serves: tuple[str, ...] = ()


def _all(subject: str) -> str:
    return f"{subject}.>"


def _consume(subject: str) -> tuple[str, str]:
    return subjects.stream_for(_all(subject)).name, _all(subject)


# DESIGN.md §1 and §2: ingest publishes readings and interval energy; the order
# book publishes order events and clearing requests and turns results into
# fills; the matcher clears requests, asking grid_check for limits; grid_check
# re-checks results, watches live readings and publishes verdicts and loading;
# the ledger settles from results and metered interval energy.
ROLES: dict[str, Role] = {
    "meter_ingest": Role(publishes=(_all(subjects.METER_READINGS), _all(subjects.INTERVAL_ENERGY))),
    "order_book": Role(
        publishes=(_all(subjects.ORDER_EVENTS), _all(subjects.CLEARING_REQUEST)),
        consumes=(_consume(subjects.CLEARING_RESULT),),
    ),
    "matcher": Role(
        publishes=(_all(subjects.CLEARING_RESULT),),
        consumes=(_consume(subjects.CLEARING_REQUEST),),
        requests=(subjects.GRID_LIMITS_REQUEST, _all(subjects.GRID_LIMITS_REQUEST)),
    ),
    "grid_check": Role(
        publishes=(_all(subjects.GRID_VERDICT), _all(subjects.GRID_LOADING)),
        consumes=(_consume(subjects.CLEARING_RESULT), _consume(subjects.METER_READINGS)),
        serves=(subjects.GRID_LIMITS_REQUEST, _all(subjects.GRID_LIMITS_REQUEST)),
    ),
    "ledger": Role(
        publishes=(_all(subjects.LEDGER_CHECKPOINT), _all(subjects.LEDGER_SETTLED)),
        consumes=(_consume(subjects.CLEARING_RESULT), _consume(subjects.INTERVAL_ENERGY)),
    ),
}


def password_variable(service: str) -> str:
    """The environment variable of the NATS pods that holds `service`'s password."""
    return f"NATS_PASSWORD_{service.upper()}"


def publish_allow(role: Role) -> list[str]:
    allow = [*role.publishes, *role.requests]
    # Every service declares the streams at start (`NatsBus.ensure_streams`):
    # it may read, create and update them, never delete or purge them.
    allow.append("$JS.API.INFO")
    allow.append("$JS.API.STREAM.NAMES")
    for spec in subjects.STREAMS:
        for action in ("INFO", "CREATE", "UPDATE"):
            allow.append(f"$JS.API.STREAM.{action}.{spec.name}")
    for stream in sorted({stream for stream, _ in role.consumes}):
        # Consumers on the streams it reads (durable pull consumers, and
        # ordered push consumers for live views): create, info, list, delete
        # (`CONSUMER.<action>.<stream>[.<consumer>...]`), the legacy durable
        # create, and fetching the next batch.
        allow.append(f"$JS.API.CONSUMER.*.{stream}")
        allow.append(f"$JS.API.CONSUMER.*.{stream}.>")
        allow.append(f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.>")
        allow.append(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.>")
        # Acks go to the reply subject of each delivered message. nats-server
        # 2.15 still sends `$JS.ACK.<stream>.<consumer>.<delivered>.<stream
        # seq>.<consumer seq>.<time>.<pending>`; the second form is the newer
        # layout with domain and account hash in front of the stream (ADR-15),
        # which servers may send instead.
        allow.append(f"$JS.ACK.{stream}.>")
        allow.append(f"$JS.ACK.*.*.{stream}.>")
        # Push and ordered consumers answer the server's flow-control requests.
        allow.append(f"$JS.FC.{stream}.>")
    return allow


def subscribe_allow(role: Role) -> list[str]:
    # Replies to requests and JetStream API calls, and pull-consumer batches,
    # arrive on the client's own inbox.
    allow = ["_INBOX.>"]
    allow.extend(subject for _, subject in role.consumes)
    allow.extend(role.serves)
    return list(dict.fromkeys(allow))


def _block(name: str, items: list[str], indent: str) -> list[str]:
    return [
        f"{indent}{name}: {{",
        f"{indent}  allow: [",
        *[f'{indent}    "{item}"' for item in items],
        f"{indent}  ]",
        f"{indent}}}",
    ]


def render_auth_conf() -> str:
    """The `accounts` block with one user per service, included by nats.conf."""
    lines = [
        "# Generated by deploy/k8s/generate.py from services/platform/subjects.py; do not edit.",
        "# One NATS user per service; passwords come from the pods' environment (Secret p2pgrid-secrets).",
        "accounts {",
        f"  {ACCOUNT} {{",
        "    jetstream: enabled",
        "    users: [",
    ]
    for service, role in ROLES.items():
        lines += [
            "      {",
            f"        user: {service}",
            f"        password: ${password_variable(service)}",
            "        permissions: {",
            *_block("publish", publish_allow(role), "          "),
            *_block("subscribe", subscribe_allow(role), "          "),
        ]
        if role.serves:
            # Answers to core-NATS requests go to the asker's inbox.
            lines.append("          allow_responses: true")
        lines += ["        }", "      }"]
    lines += ["    ]", "  }", "}"]
    return "\n".join(lines) + "\n"


def render_config_kustomization() -> str:
    """ConfigMaps `p2pgrid-grids` and `p2pgrid-meter-maps`, one key per file."""
    lines = [
        "# Generated by deploy/k8s/generate.py from deploy/grids/*.yaml and hw/meters/*.yaml; do not edit.",
        "apiVersion: kustomize.config.k8s.io/v1beta1",
        "kind: Kustomization",
        "configMapGenerator:",
    ]
    for name, copy_dir in (("p2pgrid-grids", "grids"), ("p2pgrid-meter-maps", "meters")):
        source_dir = next(source for source, copy in COPIES.items() if copy.name == copy_dir)
        lines += [f"  - name: {name}", "    files:"]
        lines += [f"      - {copy_dir}/{path.name}" for path in sorted(source_dir.glob("*.yaml"))]
    return "\n".join(lines) + "\n"


def expected_files() -> dict[Path, bytes]:
    files = {
        AUTH_CONF: render_auth_conf().encode(),
        CONFIG_KUSTOMIZATION: render_config_kustomization().encode(),
    }
    for source_dir, copy_dir in COPIES.items():
        for source in sorted(source_dir.glob("*.yaml")):
            files[copy_dir / source.name] = source.read_bytes()
    return files


def stale_files() -> list[str]:
    """Paths (relative to the repository) that are missing, different or no longer generated."""
    expected = expected_files()
    stale = [str(path.relative_to(REPO)) for path, data in expected.items() if _read(path) != data]
    for copy_dir in COPIES.values():
        for path in sorted(copy_dir.glob("*.yaml")):
            if path not in expected:
                stale.append(str(path.relative_to(REPO)))
    return stale


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def write() -> None:
    expected = expected_files()
    for copy_dir in COPIES.values():
        for path in copy_dir.glob("*.yaml"):
            if path not in expected:
                path.unlink()
    for path, data in expected.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if _read(path) != data:
            path.write_bytes(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files; exit 1 if any")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for path in stale:
            print(f"stale: {path}", file=sys.stderr)
        if stale:
            print("run: .venv/bin/python deploy/k8s/generate.py", file=sys.stderr)
        return 1 if stale else 0
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
