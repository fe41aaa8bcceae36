"""The rendered NATS configuration forms a three-server JetStream cluster that services use through their own users.

The ConfigMap `nats-config` of the dev overlay is taken as rendered; only what
differs between a pod and this machine is rewritten (addresses and ports,
the data and pid paths, the route host names), and each rewrite must match
exactly once, so a change to the configuration shows up here.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.platform import subjects
from services.platform.nats_bus import NatsBus
from services.platform.nats_server import free_port, nats_server_binary

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "unit" / "deploy"))
from deploy_checks import K8S, load_script, of_kind, render  # noqa: E402

generate = load_script(K8S / "generate.py")
PASSWORDS = {service: secrets.token_hex(12) for service in generate.ROLES}
SERVERS = 3


def _rewrite(text: str, pattern: str, replacement: str) -> str:
    rewritten, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert count == 1, f"expected exactly one match of {pattern!r} in nats.conf, found {count}"
    return rewritten


def _local_config(nats_conf: str, index: int, folder: Path, ports: list[dict[str, int]]) -> str:
    own = ports[index]
    text = _rewrite(nats_conf, r"^listen: 0\.0\.0\.0:4222$", f"listen: 127.0.0.1:{own['client']}")
    text = _rewrite(text, r"^http_port: 8222$", f"http: 127.0.0.1:{own['http']}")
    text = _rewrite(text, r"^pid_file: /var/run/nats/nats\.pid$", f'pid_file: "{folder / "nats.pid"}"')
    text = _rewrite(text, r"^(\s*)store_dir: /data/jetstream$", rf'\1store_dir: "{folder / "jetstream"}"')
    text = _rewrite(text, r"^(\s*)listen: 0\.0\.0\.0:6222$", rf"\g<1>listen: 127.0.0.1:{own['cluster']}")
    for peer in range(SERVERS):
        text = _rewrite(
            text,
            rf"^(\s*)nats://nats-{peer}\.nats-headless:6222$",
            rf"\g<1>nats://127.0.0.1:{ports[peer]['cluster']}",
        )
    return text


def _get_json(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, {}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, int]]]:
    config_map = next(
        cm for cm in of_kind(render("dev"), "ConfigMap") if cm["metadata"]["name"].startswith("nats-config")
    )
    ports = [{"client": free_port(), "cluster": free_port(), "http": free_port()} for _ in range(SERVERS)]
    processes = []
    env = {**os.environ, **{generate.password_variable(name): pw for name, pw in PASSWORDS.items()}}
    root = tmp_path_factory.mktemp("nats-cluster")
    try:
        for index in range(SERVERS):
            folder = root / f"nats-{index}"
            folder.mkdir()
            (folder / "auth.conf").write_text(config_map["data"]["auth.conf"])
            (folder / "nats.conf").write_text(
                _local_config(config_map["data"]["nats.conf"], index, folder, ports)
            )
            with open(folder / "nats.log", "wb") as log:
                processes.append(
                    subprocess.Popen(
                        [nats_server_binary(), "-c", str(folder / "nats.conf")],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env={**env, "POD_NAME": f"nats-{index}"},
                    )
                )
        deadline = time.monotonic() + 30
        # The same check as the pods' startup and liveness probes.
        while not all(
            _get_json(f"http://127.0.0.1:{port['http']}/healthz?js-enabled-only=true")[0] == 200
            for port in ports
        ):
            for index, process in enumerate(processes):
                if process.poll() is not None:
                    raise RuntimeError((root / f"nats-{index}" / "nats.log").read_text())
            if time.monotonic() > deadline:
                raise TimeoutError("the NATS cluster did not become healthy")
            time.sleep(0.2)
        yield ports
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=15)


@pytest.mark.slow
def test_three_servers_route_to_each_other_and_sync_every_write(cluster: list[dict[str, int]]) -> None:
    names = set()
    for port in cluster:
        _, routes = _get_json(f"http://127.0.0.1:{port['http']}/routez")
        assert routes["num_routes"] >= SERVERS - 1
        _, varz = _get_json(f"http://127.0.0.1:{port['http']}/varz")
        names.add(varz["server_name"])
        assert varz["cluster"]["name"] == "p2pgrid"
        assert varz["jetstream"]["config"]["sync_always"] is True
    assert names == {f"nats-{index}" for index in range(SERVERS)}


@pytest.mark.slow
def test_a_clearing_request_published_on_one_server_is_consumed_and_acknowledged_on_another(
    cluster: list[dict[str, int]],
) -> None:
    async def scenario() -> None:
        deadline = time.monotonic() + 20
        while True:
            order_book = await NatsBus.connect(
                f"nats://order_book:{PASSWORDS['order_book']}@127.0.0.1:{cluster[0]['client']}",
                name="order_book",
            )
            try:
                # The first stream creation waits for the cluster to elect a meta leader.
                await order_book.ensure_streams()
                break
            except Exception:
                await order_book.close()
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        matcher = await NatsBus.connect(
            f"nats://matcher:{PASSWORDS['matcher']}@127.0.0.1:{cluster[2]['client']}", name="matcher"
        )
        try:
            subject = subjects.keyed(subjects.CLEARING_REQUEST, 1767225600)
            assert await order_book.publish(subject, b"frozen book", event_id="request-1767225600")
            assert not await order_book.publish(subject, b"frozen book", event_id="request-1767225600")
            stop = asyncio.Event()
            received = []
            async for batch in matcher.pull(
                "CLEARING",
                "matcher-cluster-check",
                f"{subjects.CLEARING_REQUEST}.>",
                fetch_timeout_s=1,
                stop=stop,
            ):
                for delivery in batch:
                    received.append((delivery.subject, delivery.data))
                    await delivery.ack()
                stop.set()
            assert received == [(subject, b"frozen book")]
            for _ in range(50):
                if await matcher.consumer_pending("CLEARING", "matcher-cluster-check") == 0:
                    break
                await asyncio.sleep(0.1)
            assert await matcher.consumer_pending("CLEARING", "matcher-cluster-check") == 0
        finally:
            await matcher.close()
            await order_book.close()

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))
