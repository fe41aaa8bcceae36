"""Alembic migrations of the ledger's tables (version table alembic_version_ledger)."""
