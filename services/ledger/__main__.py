"""Entry point: `python -m services.ledger`."""

from services.ledger.app import build
from services.ledger.settings import DESCRIPTION, Settings
from services.platform.service import main_exit, run_service

if __name__ == "__main__":
    main_exit(run_service("ledger", Settings, build, description=DESCRIPTION))
