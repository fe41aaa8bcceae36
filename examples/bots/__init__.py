"""Example trading bots: a PV prosumer, an EV owner and a home battery, each runnable on its own."""
