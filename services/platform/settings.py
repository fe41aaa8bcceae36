"""Typed settings for every service: each field is a flag and an environment variable with the service's prefix.

A settings class is a frozen dataclass whose fields carry `setting(...)`
metadata. `load_settings` reads, in order of precedence, command-line flags,
then environment variables (`P2PGRID_<SERVICE>_<FIELD>`), then defaults, and
converts and checks every value. Any bad value raises `SettingsError` naming
the setting; `exit_on_settings_error` turns that into one line on stderr and
exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast, get_type_hints
from urllib.parse import urlsplit

from services.domain.intervals import Clock, RealClock, SimulatedClock

EXIT_SETTINGS = 2
T = TypeVar("T")


class SettingsError(ValueError):
    """A setting that is missing or malformed; `name` is the flag without dashes."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    check: Callable[[Any], None] | None = None,
    choices: Sequence[str] | None = None,
) -> Any:
    """Declare a settings field: its help text, an optional check and allowed choices."""
    metadata = {"help": help, "check": check, "choices": choices}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_nats_url(value: str) -> None:
    for part in value.split(","):
        parts = urlsplit(part.strip())
        if parts.scheme not in ("nats", "tls", "ws", "wss") or not parts.hostname:
            raise ValueError(f"{part!r} is not a NATS URL (expected nats://HOST:PORT)")
        try:
            parts.port  # noqa: B018 - parsing the port validates it
        except ValueError as exc:
            raise ValueError(f"{part!r} has an invalid port") from exc


def check_database_url(value: str) -> None:
    from services.platform.db import parse_database_url

    parse_database_url(value)


def check_port(value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"{value} is not a TCP port (0-65535; 0 picks a free one)")


def check_positive(value: float) -> None:
    if value <= 0:
        raise ValueError(f"{value} must be positive")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServiceSettings:
    """Settings every service has. Services subclass this and add their own fields."""

    nats_url: str = setting(
        help="NATS server URL(s), comma-separated, e.g. nats://127.0.0.1:4222", check=check_nats_url
    )
    grpc_host: str = setting("127.0.0.1", help="address the gRPC server binds to")
    grpc_port: int = setting(0, help="gRPC port (0: a free port, written to --ready-file)", check=check_port)
    metrics_host: str = setting("127.0.0.1", help="address of the Prometheus /metrics endpoint")
    metrics_port: int = setting(0, help="Prometheus /metrics port (0: a free port)", check=check_port)
    ready_file: str = setting("", help="when set, the bound ports are written here as JSON once serving")
    log_level: str = setting("info", help="log level", choices=("debug", "info", "warning", "error"))
    log_format: str = setting("json", help="log format", choices=("json", "text"))
    shutdown_grace_s: float = setting(
        5.0, help="seconds in-flight work may take after SIGTERM", check=check_positive
    )
    nats_stream_replicas: int = setting(
        1, help="JetStream replicas per stream (3 in a cluster)", check=check_positive
    )
    nats_connect_timeout_s: float = setting(
        3.0, help="seconds to wait for NATS at start", check=check_positive
    )
    clock: str = setting("real", help="where time comes from", choices=("real", "sim"))
    sim_start_s: float = setting(0.0, help="simulated clock: Unix time at --sim-anchor-wall-s")
    sim_speedup: float = setting(
        1.0, help="simulated clock: how many times faster than real time", check=check_positive
    )
    sim_anchor_wall_s: float = setting(
        0.0, help="simulated clock: wall time at which it reads --sim-start-s (0: start)"
    )
    service_name: str = setting(
        "", help="name used in logs, metrics and NATS durable names (default: the service)"
    )

    def make_clock(self) -> Clock:
        if self.clock == "sim":
            return SimulatedClock(self.sim_start_s, self.sim_speedup, self.sim_anchor_wall_s)
        return RealClock()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(prefix: str, name: str) -> str:
    return f"{prefix}{name.upper()}"


def _convert(kind: type, raw: str) -> Any:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{raw!r} is not a boolean (true/false)")
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not an integer") from None
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not a number") from None
    if kind is Path:
        return Path(raw)
    return raw


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_SETTINGS)


def build_parser(
    cls: type[ServiceSettings], prog: str, env_prefix: str, description: str
) -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=prog,
        description=description,
        epilog=f"Every flag can also be set as an environment variable: {env_prefix}<FLAG_NAME>, "
        f"e.g. {_env(env_prefix, 'nats_url')}.",
    )
    hints = get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        meta = field.metadata
        default = "required" if field.default is dataclasses.MISSING else repr(field.default)
        parser.add_argument(
            _flag(field.name),
            dest=field.name,
            default=None,
            metavar=kind.__name__.upper() if isinstance(kind, type) else "VALUE",
            help=f"{meta.get('help', '')} [env {_env(env_prefix, field.name)}; default {default}]"
            + (f" choices: {', '.join(meta['choices'])}" if meta.get("choices") else ""),
        )
    return parser


S = TypeVar("S", bound=ServiceSettings)


def load_settings(
    cls: type[S],
    *,
    prog: str,
    env_prefix: str,
    description: str,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> S:
    """Parse flags and environment into a checked settings object, or raise SettingsError."""
    environ = os.environ if environ is None else environ
    parser = build_parser(cls, prog, env_prefix, description)
    namespace = parser.parse_args(argv)
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        raw = getattr(namespace, field.name)
        source = _flag(field.name)
        if raw is None:
            raw = environ.get(_env(env_prefix, field.name))
            source = _env(env_prefix, field.name)
        if raw is None:
            if field.default is dataclasses.MISSING:
                raise SettingsError(
                    _flag(field.name),
                    f"is required (set {_flag(field.name)} or {_env(env_prefix, field.name)})",
                )
            values[field.name] = field.default
            continue
        kind = cast(type, hints[field.name])
        try:
            value = _convert(kind, raw)
            choices = field.metadata.get("choices")
            if choices and value not in choices:
                raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
            check = field.metadata.get("check")
            if check is not None:
                check(value)
        except ValueError as exc:
            raise SettingsError(_flag(field.name), f"{exc} (from {source})") from None
        values[field.name] = value
    return cls(**values)


@contextmanager
def exit_on_settings_error(prog: str) -> Iterator[None]:
    """Turn a SettingsError into one line on stderr and exit code 2."""
    try:
        yield
    except SettingsError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        raise SystemExit(EXIT_SETTINGS) from None
