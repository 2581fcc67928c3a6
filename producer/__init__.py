"""vqueue's producer side: the job/result protocol, settings and the client. No GPU stack."""

from producer.client import Client
from producer.errors import EngineDead, InvalidJob, JobError, JobFailed, JobTimeout, ModelNotServed, VQueueError
from producer.protocol import (
    AssistantMessage,
    ChatJob,
    ChatMessage,
    Choice,
    CompletionJob,
    FinishReason,
    JobResult,
    ModelInfo,
    ResponseFormat,
    Sampling,
    TextPart,
    Timings,
    Usage,
)
from producer.settings import Settings, get_settings

__all__ = [
    "AssistantMessage",
    "ChatJob",
    "ChatMessage",
    "Choice",
    "Client",
    "CompletionJob",
    "EngineDead",
    "FinishReason",
    "InvalidJob",
    "JobError",
    "JobFailed",
    "JobResult",
    "JobTimeout",
    "ModelInfo",
    "ModelNotServed",
    "ResponseFormat",
    "Sampling",
    "Settings",
    "TextPart",
    "Timings",
    "Usage",
    "VQueueError",
    "get_settings",
]
