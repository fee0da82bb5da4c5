"""Alembic migrations of the session store (``sessions db upgrade`` applies them)."""
