"""The Celery configuration producers and workers share: broker, results, JSON only, events."""

from __future__ import annotations

from celery import Celery

from producer.settings import Settings


def make_celery(settings: Settings, name: str = "vqueue") -> Celery:
    """A Celery app speaking vqueue's wire format to ``settings.redis.url``.

    Workers add their own options on top (see ``worker.celery_app``).
    """
    app = Celery(name, broker=settings.redis.url, backend=settings.redis.url, set_as_current=False)
    app.conf.update(
        # JSON only, both ways: a pickled message is refused (pickle runs code on load).
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # A job reserved or running longer than this is delivered again; keep it above the
        # longest wait-plus-run a job can have.
        broker_transport_options={"visibility_timeout": settings.redis.visibility_timeout_s},
        result_expires=settings.redis.result_ttl_s,
        # Flower shows jobs from the moment they are sent.
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        enable_utc=True,
    )
    return app
