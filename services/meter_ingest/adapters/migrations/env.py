"""Alembic environment: migrations always run through services.platform.db.migrate()."""

from services.platform.db import run_migrations_online

run_migrations_online()
