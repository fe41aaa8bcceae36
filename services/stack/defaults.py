"""The local market's defaults, kept apart so that command-line help can name them without heavy imports."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The sample network of `p2pgrid up` and the load tests.
DEFAULT_GRID = REPO / "deploy" / "grids" / "lv_feeder.yaml"
# The register map of the simulated household meters (an id in hw/meters).
DEFAULT_METER_MAP = "eastron_sdm630_v2"
