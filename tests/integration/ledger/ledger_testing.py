"""Shared values for the ledger's integration tests: the ledger key and a clock past every test interval."""

from __future__ import annotations

from nacl.signing import SigningKey

from services.domain.intervals import SimulatedClock

# 2031-01-01: every interval the tests settle lies before it, so the metering deadline has passed.
LATE_CLOCK = SimulatedClock(start_s=1_924_992_000.0)
LEDGER_KEY = SigningKey(bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"))
