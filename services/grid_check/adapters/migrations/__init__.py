"""Alembic migrations of grid_check's tables (version table alembic_version_grid_check)."""
