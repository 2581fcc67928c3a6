"""The job and result protocol, defined once: producers build these, workers parse them.

On the wire a job is ``CompletionJob | ChatJob`` dumped to JSON (``kind`` tells them apart)
and a result is ``JobResult`` dumped to JSON. Nothing here imports Celery or vLLM.
"""

from __future__ import annotations

import time
import uuid
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator


class _Strict(BaseModel):
    # Unknown fields are refused: a misspelt "max_token" must not silently do nothing.
    model_config = ConfigDict(extra="forbid")


class Sampling(_Strict):
    """Sampling parameters, named and bounded as in vLLM's OpenAI server.

    A field left ``None`` takes the model's ``generation_config.json`` default, then vLLM's,
    as ``vllm serve`` does. ``max_tokens=None`` means what is left of the context.
    """

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    stop: list[str] = Field(default_factory=list, max_length=16)
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64)
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    ignore_eos: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must be non-empty")
        return value


class TextPart(_Strict):
    type: Literal["text"] = "text"
    text: str


class ImageURL(_Strict):
    #: A ``data:image/png;base64,...`` URI (png, jpeg, webp), or an http(s) URL on a host
    #: that the workers' ``images.allowed_url_hosts`` allows.
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"] = "image_url"
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Strict):
    """One OpenAI-style message; ``content`` is a string or a list of content parts."""

    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]

    @field_validator("content")
    @classmethod
    def _not_empty(cls, value: str | list[ContentPart]) -> str | list[ContentPart]:
        if isinstance(value, list) and not value:
            raise ValueError("content must hold at least one part")
        return value


def _new_id() -> str:
    return uuid.uuid4().hex


class _Job(_Strict):
    id: str = Field(default_factory=_new_id, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    #: The served model name (``model.served_name`` of the workers that should run it).
    model: str = Field(min_length=1, max_length=256)
    sampling: Sampling = Field(default_factory=Sampling)
    #: Epoch seconds when the producer built the job.
    created_at: float = Field(default_factory=time.time)


class CompletionJob(_Job):
    """Continue ``prompt`` (as ``/v1/completions``)."""

    kind: Literal["completion"] = "completion"
    #: Text, or token ids (as ``/v1/completions`` accepts).
    prompt: str | list[Annotated[int, Field(ge=0)]] = Field(min_length=1)


class ChatJob(_Job):
    """Answer a conversation (as ``/v1/chat/completions``), rendered with the model's chat template."""

    kind: Literal["chat"] = "chat"
    messages: list[ChatMessage] = Field(min_length=1)

    def image_urls(self) -> list[str]:
        return [p.image_url.url for m in self.messages if not isinstance(m.content, str)
                for p in m.content if isinstance(p, ImagePart)]


Job = Annotated[CompletionJob | ChatJob, Field(discriminator="kind")]
JOB_ADAPTER: TypeAdapter[CompletionJob | ChatJob] = TypeAdapter(Job)


def parse_job(data: object) -> CompletionJob | ChatJob:
    """A job from its JSON-decoded form; raises ``pydantic.ValidationError`` naming the field."""
    return JOB_ADAPTER.validate_python(data)


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


class Usage(_Strict):
    """Token counts from the engine, named as vLLM's ``UsageInfo``."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(_Strict):
    """Epoch seconds of each step of the job's life."""

    enqueued_at: float
    started_at: float
    first_token_at: float | None = None
    finished_at: float


class AssistantMessage(_Strict):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(_Strict):
    index: int = 0
    text: str | None = None  # completion jobs
    message: AssistantMessage | None = None  # chat jobs
    finish_reason: FinishReason


class JobResult(_Strict):
    """What a worker writes back for a job that ran."""

    id: str
    model: str
    kind: Literal["completion", "chat"]
    choices: list[Choice]
    usage: Usage
    timings: Timings
    worker: str
    attempt: int = 1

    @property
    def text(self) -> str:
        """The first choice's text: the completion, or the assistant message's content."""
        choice = self.choices[0]
        return choice.text if choice.message is None else choice.message.content

    @property
    def message(self) -> AssistantMessage | None:
        return self.choices[0].message

    @property
    def finish_reason(self) -> FinishReason:
        return self.choices[0].finish_reason
