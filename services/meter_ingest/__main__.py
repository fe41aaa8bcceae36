"""Entry point: `python -m services.meter_ingest`."""

from services.meter_ingest.app import build
from services.meter_ingest.settings import DESCRIPTION, Settings
from services.platform.service import main_exit, run_service

if __name__ == "__main__":
    main_exit(run_service("meter_ingest", Settings, build, description=DESCRIPTION))
