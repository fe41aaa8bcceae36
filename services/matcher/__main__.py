"""Entry point: `python -m services.matcher`."""

from services.matcher.app import build
from services.matcher.settings import DESCRIPTION, Settings
from services.platform.service import main_exit, run_service

if __name__ == "__main__":
    main_exit(run_service("matcher", Settings, build, description=DESCRIPTION))
