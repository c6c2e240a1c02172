"""Alembic migrations, shipped inside the package so `nme-service migrate` works anywhere."""
