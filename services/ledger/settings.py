"""Settings of the ledger (env prefix P2PGRID_LEDGER_)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from services.domain.credentials import LEDGER_AUDIENCE, b64url, is_valid_public_key
from services.ledger.adapters.sql import DEFAULT_ORIGIN
from services.ledger.domain.checkpoint import ORIGIN_PATTERN
from services.ledger.domain.ledger import ACCOUNT_NAME_PATTERN
from services.ledger.domain.settlement import RulesError, SettlementRules
from services.platform.auth import parse_operator_keys
from services.platform.db import parse_database_url
from services.platform.settings import (
    ServiceSettings,
    SettingsError,
    check_database_url,
    check_positive,
    setting,
)

DESCRIPTION = "ledger: settles each interval exactly once into a tamper-evident double-entry ledger."

UTILITY_PARTICIPANT_ID = "utility"
"""The participant id of the utility's standing orders in clearing results; their trades book to the utility."""

SIGNING_KEY_SUFFIX = ".signing-key"
PUBLIC_KEY_SUFFIX = ".pub"


def _check_non_negative(value: float) -> None:
    if value < 0:
        raise ValueError(f"{value} must be >= 0")


def _check_delay(value: int) -> None:
    if value < -1:
        raise ValueError(f"{value} must be -1 (take it from the rules) or a number of seconds >= 0")


def _check_operator_keys(value: str) -> None:
    for key in parse_operator_keys(value):
        if not is_valid_public_key(key):
            raise ValueError(f"{b64url(key)} is not a valid Ed25519 public key")


def _check_rules_path(value: str) -> None:
    if value:
        load_rules_file(value)


def _check_name(value: str) -> None:
    if not re.fullmatch(ACCOUNT_NAME_PATTERN, value):
        raise ValueError(f"{value!r} must match {ACCOUNT_NAME_PATTERN}")


def _check_origin(value: str) -> None:
    if not re.fullmatch(ORIGIN_PATTERN, value):
        raise ValueError(f"{value!r} must match {ORIGIN_PATTERN}")


def load_rules_file(path: str) -> dict[str, Any]:
    """The rules mapping of a YAML file (checked by building the rules); ValueError naming the file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read settlement rules {path}: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"settlement rules {path} must be a mapping of rule fields to values")
    try:
        SettlementRules.from_mapping(data)
    except (RulesError, TypeError) as exc:
        raise ValueError(f"settlement rules {path}: {exc}") from None
    return data


@dataclass(frozen=True, kw_only=True)
class Settings(ServiceSettings):
    database_url: str = setting(help="SQLAlchemy URL of the ledger's database", check=check_database_url)
    signing_key_file: str = setting(
        "",
        help="file holding the ledger's Ed25519 signing key (32-byte seed as hex), created with mode 0600 "
        "if missing, its public key written next to it as <file>.pub (hex); default: next to a SQLite "
        f"database, <database file>{SIGNING_KEY_SUFFIX}; required with PostgreSQL",
    )
    rules_path: str = setting(
        "",
        help="YAML file of settlement rules (tariffs, grid fees, feeders, metering_delay_s...); fields it "
        f"leaves out keep their defaults; default: the built-in rules, with utility_participant_id "
        f"{UTILITY_PARTICIPANT_ID!r}",
        check=_check_rules_path,
    )
    market_id: str = setting(
        "default", help="the market whose clearing results this ledger settles", check=_check_name
    )
    origin: str = setting(
        DEFAULT_ORIGIN,
        help="the ledger's name in its signed checkpoints (never change it)",
        check=_check_origin,
    )
    metering_delay_s: int = setting(
        -1,
        help="the metering deadline: seconds after an interval ends before it is settled (meter data "
        "arriving later books correcting transfers); -1: the rules' metering_delay_s (900 built in)",
        check=_check_delay,
    )
    settle_period_s: float = setting(
        5.0, help="how often due intervals are looked for and settled", check=check_positive
    )
    operator_public_keys: str = setting(
        "",
        help="comma-separated base64url Ed25519 public keys of operators (may read any account and call Verify)",
        check=_check_operator_keys,
    )
    auth_audience: str = setting(LEDGER_AUDIENCE, help="audience every call token must be signed for")
    token_max_lifetime_s: int = setting(3600, help="longest accepted token lifetime", check=check_positive)
    token_clock_skew_s: float = setting(
        30.0, help="tolerated wall-clock difference for tokens", check=_check_non_negative
    )
    consumer_batch: int = setting(
        64, help="most events applied in one database transaction", check=check_positive
    )
    ack_wait_s: float = setting(
        30.0,
        help="seconds JetStream waits for an ack before redelivering an event",
        check=check_positive,
    )
    fault_pause_after_commit_s: float = setting(
        0.0,
        help="for fault-injection tests only: after each consumer transaction commits, log "
        "'fault injection: committed, not acked' and wait this long before acking, so that a test can "
        "kill the process between commit and ack; 0 (the default) disables it",
        check=_check_non_negative,
    )

    def __post_init__(self) -> None:
        try:
            self.rules()
        except (RulesError, ValueError) as exc:
            raise SettingsError("--rules-path", str(exc)) from None
        if not self.signing_key_file and parse_database_url(self.database_url).get_backend_name() != "sqlite":
            raise SettingsError(
                "--signing-key-file",
                "is required with a PostgreSQL database (set --signing-key-file or "
                "P2PGRID_LEDGER_SIGNING_KEY_FILE)",
            )
        if not self.signing_key_file:
            database = parse_database_url(self.database_url).database or ""
            if not database or database == ":memory:":
                raise SettingsError("--signing-key-file", "is required with an in-memory SQLite database")

    def signing_key_path(self) -> Path:
        if self.signing_key_file:
            return Path(self.signing_key_file)
        database = parse_database_url(self.database_url).database or ""
        return Path(database + SIGNING_KEY_SUFFIX)

    def operator_keys(self) -> frozenset[bytes]:
        return parse_operator_keys(self.operator_public_keys)

    def rules(self) -> SettlementRules:
        """The market's settlement rules: built in, or the YAML file's, with the metering delay override."""
        data: dict[str, Any] = {"utility_participant_id": UTILITY_PARTICIPANT_ID}
        if self.rules_path:
            data.update(load_rules_file(self.rules_path))
        if self.metering_delay_s >= 0:
            data["metering_delay_s"] = self.metering_delay_s
        return SettlementRules.from_mapping(data)
