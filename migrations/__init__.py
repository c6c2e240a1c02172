"""Alembic migrations. Installed as the package ``service.migrations`` (see
``service/migrate.py``), so `nme-service migrate` works from a clone, a wheel and the container."""
