"""pandapower as an independent DC power-flow oracle for grid_check's tests (test-only dependency)."""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from types import ModuleType

import pytest


@pytest.fixture(scope="session")
def pp() -> ModuleType:
    """pandapower, imported once; missing it skips locally and fails when CI is set."""
    # pandapower logs a warning on import when numba is absent; the oracle does not need numba.
    logging.getLogger("pandapower").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pandapower = importlib.import_module("pandapower")
            importlib.import_module("pandapower.networks")
        except ImportError as exc:
            message = f"pandapower is needed as the DC power-flow oracle: {exc}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    return pandapower
