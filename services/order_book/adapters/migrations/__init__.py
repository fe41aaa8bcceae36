"""Alembic migrations of the order book's tables (version table alembic_version_order_book)."""
