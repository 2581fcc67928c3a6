"""vqueue's OpenAI-compatible HTTP front: vLLM's ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions`` (streaming too) in front of the Redis queues. Imports ``producer``
only (no vLLM, no torch): ``pip install "vqueue[gateway]"``, then ``vqueue gateway``."""

from gateway.app import create_app

__all__ = ["create_app"]
