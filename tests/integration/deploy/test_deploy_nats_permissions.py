"""The per-service NATS users of the Kubernetes deployment, on a real nats-server with the generated auth.conf.

Each service, logged in as its own user, can declare the streams, publish
its own events, consume (and acknowledge) the streams it reads, and ask or
answer its requests; it cannot publish another service's events, read
streams it has no business with, or delete streams.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from services.platform import subjects
from services.platform.nats_bus import NatsBus
from services.platform.nats_server import free_port, nats_server_binary

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "unit" / "deploy"))
from deploy_checks import K8S, load_script  # noqa: E402

# deploy/k8s/generate.py: the table of who publishes and consumes what, and the rendered users.
generate = load_script(K8S / "generate.py")

T = TypeVar("T")
PASSWORDS = {service: secrets.token_hex(12) for service in generate.ROLES}
DENIED_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A nats-server with JetStream as in the cluster (sync always) and the generated users."""
    folder = tmp_path_factory.mktemp("nats-users")
    shutil.copy(generate.AUTH_CONF, folder / "auth.conf")
    port = free_port()
    (folder / "nats.conf").write_text(
        f'listen: "127.0.0.1:{port}"\n'
        f'jetstream {{\n  store_dir: "{folder / "jetstream"}"\n  sync_interval: always\n}}\n'
        "max_payload: 8MB\n"
        "include auth.conf\n"
    )
    env = {**os.environ, **{generate.password_variable(name): pw for name, pw in PASSWORDS.items()}}
    with open(folder / "nats.log", "wb") as log:
        process = subprocess.Popen(
            [nats_server_binary(), "-c", str(folder / "nats.conf")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"nats-server exited: {(folder / 'nats.log').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                    if sock.recv(4) == b"INFO":
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout=60)

    return asyncio.run(bounded())


async def _connect(server_url: str, service: str, password: str | None = None) -> NatsBus:
    return await NatsBus.connect(
        f"nats://{service}:{password or PASSWORDS[service]}@{server_url}", name=service, timeout_s=3
    )


def _concrete(pattern: str, key: str) -> str:
    return pattern.replace(">", key) if pattern.endswith(">") else pattern


async def _denied(action: Awaitable[Any]) -> bool:
    """True if the action fails: a permission violation shows as an error or as no answer at all."""
    try:
        await asyncio.wait_for(action, timeout=DENIED_TIMEOUT_S)
    except Exception:
        return True
    return False


def test_a_wrong_password_is_refused(server_url: str) -> None:
    with pytest.raises(ConnectionError):
        _run(NatsBus.connect(f"nats://ledger:not-the-password@{server_url}", name="ledger", timeout_s=0.5))


def test_every_service_declares_the_streams_and_publishes_its_own_events(server_url: str) -> None:
    async def scenario() -> None:
        for service, role in generate.ROLES.items():
            bus = await _connect(server_url, service)
            try:
                await bus.ensure_streams()
                for pattern in role.publishes:
                    subject = _concrete(pattern, f"own-{service}")
                    assert await bus.publish(subject, b"x", event_id=f"{service}-{subject}"), subject
            finally:
                await bus.close()

    _run(scenario())


def test_no_service_publishes_another_services_events_or_deletes_a_stream(server_url: str) -> None:
    async def scenario() -> list[str]:
        buses = {service: await _connect(server_url, service) for service in generate.ROLES}
        try:
            await buses["ledger"].ensure_streams()
            attempts: list[tuple[str, Awaitable[bool]]] = []
            for service, bus in buses.items():
                own = set(generate.ROLES[service].publishes)
                for role in generate.ROLES.values():
                    for pattern in set(role.publishes) - own:
                        subject = _concrete(pattern, f"forged-by-{service}")
                        attempts.append(
                            (
                                f"{service} published {subject}",
                                _denied(bus.publish(subject, b"x", event_id=subject)),
                            )
                        )
                attempts.append(
                    (
                        f"{service} deleted stream CLEARING",
                        _denied(bus.js.delete_stream("CLEARING")),
                    )
                )
                attempts.append(
                    (
                        f"{service} purged stream LEDGER",
                        _denied(bus.js.purge_stream("LEDGER")),
                    )
                )
            results = await asyncio.gather(*(attempt for _, attempt in attempts))
            allowed = [what for (what, _), denied in zip(attempts, results, strict=True) if not denied]
            assert (await buses["ledger"].js.stream_info("CLEARING")).config.name == "CLEARING"
            return allowed
        finally:
            for bus in buses.values():
                await bus.close()

    allowed = _run(scenario())
    assert not allowed, "\n".join(allowed)


def test_every_consumer_reads_and_acknowledges_the_streams_it_consumes(server_url: str) -> None:
    producers = {pattern: service for service, role in generate.ROLES.items() for pattern in role.publishes}

    async def scenario() -> None:
        for service, role in generate.ROLES.items():
            for stream, pattern in role.consumes:
                producer = await _connect(server_url, producers[pattern])
                consumer = await _connect(server_url, service)
                durable = f"{service}-{stream.lower()}-check"
                subject = _concrete(pattern, f"for-{durable}")
                try:
                    await producer.ensure_streams()
                    await producer.publish(subject, b"payload", event_id=f"event-{durable}")
                    stop = asyncio.Event()
                    received = []
                    async for batch in consumer.pull(
                        stream, durable, subject, fetch_timeout_s=0.5, stop=stop
                    ):
                        for delivery in batch:
                            received.append(delivery.subject)
                            await delivery.ack()
                        stop.set()
                    assert received == [subject], f"{service} did not receive {subject}"
                    # The ack reached the server: nothing is left pending or unacknowledged.
                    deadline = time.monotonic() + 5
                    while await consumer.consumer_pending(stream, durable) and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                    assert await consumer.consumer_pending(stream, durable) == 0, (
                        f"{service} could not ack {stream}"
                    )
                finally:
                    await consumer.close()
                    await producer.close()

    _run(scenario())


def test_grid_check_follows_live_readings_with_an_ordered_consumer(server_url: str) -> None:
    async def scenario() -> None:
        ingest = await _connect(server_url, "meter_ingest")
        grid_check = await _connect(server_url, "grid_check")
        try:
            await ingest.ensure_streams()
            subject = subjects.keyed(subjects.METER_READINGS, "live-check")
            await ingest.publish(subject, b"readings", event_id="live-check-1")
            received: asyncio.Queue[str] = asyncio.Queue()

            async def on_message(msg: Any) -> None:
                await received.put(msg.subject)

            subscription = await grid_check.js.subscribe(
                f"{subjects.METER_READINGS}.>", stream="METERING", cb=on_message, ordered_consumer=True
            )
            try:
                seen = set()
                while subject not in seen:
                    seen.add(await asyncio.wait_for(received.get(), timeout=5))
            finally:
                await subscription.unsubscribe()
        finally:
            await grid_check.close()
            await ingest.close()

    _run(scenario())


def test_no_service_reads_a_stream_it_does_not_consume(server_url: str) -> None:
    async def scenario() -> list[str]:
        attempts: list[tuple[str, Awaitable[bool]]] = []
        buses = []
        for service, role in generate.ROLES.items():
            bus = await _connect(server_url, service)
            buses.append(bus)
            consumed = {stream for stream, _ in role.consumes}
            for spec in subjects.STREAMS:
                if spec.name in consumed:
                    continue
                js = bus.client.jetstream(timeout=DENIED_TIMEOUT_S)
                attempts.append(
                    (
                        f"{service} read {spec.name}",
                        _denied(
                            js.pull_subscribe(spec.subjects[0], durable=f"{service}-snoop", stream=spec.name)
                        ),
                    )
                )
        try:
            results = await asyncio.gather(*(attempt for _, attempt in attempts))
        finally:
            for bus in buses:
                await bus.close()
        return [what for (what, _), denied in zip(attempts, results, strict=True) if not denied]

    allowed = _run(scenario())
    assert not allowed, "\n".join(allowed)


def test_the_matcher_asks_grid_check_for_limits_and_nobody_else_may(server_url: str) -> None:
    async def scenario() -> tuple[bytes, list[str]]:
        grid_check = await _connect(server_url, "grid_check")
        others = {
            service: await _connect(server_url, service)
            for service in generate.ROLES
            if service != "grid_check"
        }
        try:

            async def answer(payload: bytes) -> bytes:
                return b"limits for " + payload

            await grid_check.serve(subjects.GRID_LIMITS_REQUEST, answer, queue="grid_check")
            await grid_check.serve(f"{subjects.GRID_LIMITS_REQUEST}.>", answer, queue="grid_check")
            await grid_check.client.flush()
            reply = await others["matcher"].request(
                subjects.keyed(subjects.GRID_LIMITS_REQUEST, 1767225600), b"1767225600", timeout_s=3
            )
            askers = [service for service in others if service != "matcher"]
            denied = await asyncio.gather(
                *(
                    _denied(others[service].request(subjects.GRID_LIMITS_REQUEST, b"x", timeout_s=1))
                    for service in askers
                )
            )
            return reply, [
                f"{service} got limits" for service, no in zip(askers, denied, strict=True) if not no
            ]
        finally:
            for bus in [grid_check, *others.values()]:
                await bus.close()

    reply, allowed = _run(scenario())
    assert reply == b"limits for 1767225600"
    assert not allowed, "\n".join(allowed)
