"""Alembic migrations of meter_ingest's tables (version table alembic_version_meter_ingest)."""
