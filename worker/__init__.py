"""The vqueue GPU worker. Start it with ``celery -A worker worker``."""

from worker.celery_app import app

__all__ = ["app"]
