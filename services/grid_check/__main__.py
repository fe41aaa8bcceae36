"""Entry point: `python -m services.grid_check`."""

from services.grid_check.app import build
from services.grid_check.settings import DESCRIPTION, Settings
from services.platform.service import main_exit, run_service

if __name__ == "__main__":
    main_exit(run_service("grid_check", Settings, build, description=DESCRIPTION))
