"""Persistence: SQLAlchemy models, engine, migrations and queue operations."""
