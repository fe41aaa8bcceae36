"""Entry point: `python -m services.order_book`."""

from services.order_book.app import build
from services.order_book.settings import DESCRIPTION, Settings
from services.platform.service import main_exit, run_service

if __name__ == "__main__":
    main_exit(run_service("order_book", Settings, build, description=DESCRIPTION))
