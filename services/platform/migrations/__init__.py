"""Alembic migrations of the platform's own tables: the transactional outbox and the consumer inbox."""
