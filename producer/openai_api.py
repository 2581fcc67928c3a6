"""OpenAI request bodies as vLLM's server reads them, mapped onto vqueue jobs; vLLM's response
shapes; and OpenAI's error shape. One home for the gateway (``gateway/``) and batch files
(``producer.batch``): no web framework here, so an application that only enqueues can use it.

The request models name every parameter vLLM's ``CompletionRequest`` / ``ChatCompletionRequest``
accept (vllm/entrypoints/openai/{completion,chat_completion}/protocol.py). Those vqueue carries
map onto ``producer.protocol.Sampling``; those it does not carry are accepted at their default
value only (``AT_DEFAULT_ONLY``: a request that sets one gets a 400 naming it, never a silent
no-op); parameters vLLM does not know either are a 400 too (vLLM ignores them). vqueue's own
``priority`` (0-9, higher first: not vLLM's lower-first integer) and ``timeout_s`` ride in the body.

Responses are plain dicts in vLLM's key order, every key vLLM writes present (null where vqueue
has no value): the parity test (tests/test_parity.py) holds them to ``vllm serve``'s.
"""

from __future__ import annotations

import json
import time
from importlib import metadata
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from producer.errors import JobCancelled, JobExpired, JobFailed
from producer.protocol import ChatJob, CompletionJob, JobResult, ModelInfo, Sampling, TokenLogprob


class ApiError(Exception):
    """An answer other than 200 in OpenAI's error shape (``{"error": {"message", "type", "param",
    "code"}}``, as vLLM's ``ErrorResponse`` writes it: ``type`` an exception-like name, ``code``
    the HTTP status). The gateway answers with it; a batch file's error lines carry it."""

    def __init__(self, status: int, kind: str, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.param = param
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def bad_request(param: str | None, message: str) -> ApiError:
    return ApiError(400, "BadRequestError", message, param)


def failure(exc: JobFailed) -> ApiError:
    """A job's failure as the status an OpenAI client branches on."""
    if isinstance(exc, JobExpired):
        return ApiError(504, "GatewayTimeoutError", f"job {exc.job_id}: its deadline (timeout_s) passed before it "
                        f"finished: {exc.error}")
    if isinstance(exc, JobCancelled):
        return ApiError(410, "CancelledError", f"job {exc.job_id} was cancelled: {exc.error}. Send the request again "
                        "with another X-Request-Id to run it again.")
    if exc.error_type == "InvalidJob":
        param = param_of(tuple((exc.field or "").split(".")), ("sampling",)) or None
        return bad_request(param, exc.error)
    return ApiError(500, "InternalServerError", str(exc))


#: vLLM's default ``max_tokens`` for /v1/completions (chat's is what is left of the context).
COMPLETION_DEFAULT_MAX_TOKENS = 16
#: vLLM treats a temperature below this as greedy.
GREEDY_BELOW = 1e-5

#: Parameters vLLM accepts that vqueue does not carry: accepted when absent, null or one of these
#: values (vLLM's defaults, or what is the same without that feature), else a 400 naming them.
AT_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "echo": (False,), "suffix": (), "use_beam_search": (False,), "length_penalty": (1.0,),
    "watermarking": (False,), "spaces_between_special_tokens": (True,), "truncation_side": (),
    "allowed_token_ids": (), "prompt_logprobs": (), "logprob_token_ids": (), "bad_words": ([],),
    "prompt_embeds": (), "structured_outputs": (), "return_tokens_as_token_ids": (False,),
    "return_token_ids": (False,), "return_token_offsets": (False,), "return_prompt_text": (False,),
    "cache_salt": (), "kv_transfer_params": (), "ec_transfer_params": (), "vllm_xargs": (),
    "repetition_detection": (), "thinking_token_budget": (-1,), "mm_payload": ("tensors",),
    "return_mm_kwargs": (), "routed_experts_prompt_start": (0,),
    # chat only (add_special_tokens: vLLM's default is True for completions, False for chat)
    "tools": ([],), "tool_choice": ("none", "auto"), "reasoning_effort": (), "include_reasoning": (True,),
    "add_generation_prompt": (True,), "continue_final_message": (False,), "documents": (), "chat_template": (),
    "chat_template_kwargs": ({},), "media_io_kwargs": ({},), "mm_processor_kwargs": ({},),
}  # fmt: skip
#: Accepted and without effect on a queued job (as for vLLM: labels and streaming pace).
IGNORED = ("user", "session_id", "stream_interval", "parallel_tool_calls")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _Request(BaseModel):
    """What both endpoints take. Unknown parameters are refused by name (``extra="forbid"``)."""

    model_config = ConfigDict(extra="forbid")
    #: vLLM's default for the endpoint; the only value vqueue takes.
    ADD_SPECIAL_TOKENS: ClassVar[bool] = True

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    n: int | None = 1
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, float] | None = None
    truncate_prompt_tokens: int | None = None
    skip_special_tokens: bool = True
    response_format: dict[str, Any] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    #: vLLM's own request id in the body; the X-Request-Id header wins. Becomes the job id.
    request_id: str | None = None
    # vqueue's own controls
    priority: int | None = Field(None, description="vqueue priority 0-9, higher runs first")
    timeout_s: float | None = Field(None, gt=0, description="seconds until the job expires (and the request gives up)")

    @model_validator(mode="before")
    @classmethod
    def _vllm_only(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name in IGNORED:
            data.pop(name, None)
        at_default = {**AT_DEFAULT_ONLY, "add_special_tokens": (cls.ADD_SPECIAL_TOKENS,)}
        for name, accepted in at_default.items():
            if name not in data:
                continue
            value = data.pop(name)
            if value is not None and value not in accepted:
                also = f" or {' or '.join(json.dumps(a) for a in accepted)}" if accepted else ""
                raise bad_request(name, f"`{name}` is accepted by vLLM's server but not by vqueue's queued jobs; "
                                        f"leave it unset{also}.")
        if data.get("stream_options") and not data.get("stream"):
            raise bad_request("stream_options", "Stream options can only be defined when `stream=True`.")
        return data

    def sampling(self) -> dict[str, Any]:
        """The ``Sampling`` fields this request sets (the rest stay the model's defaults)."""
        if self.n is not None and self.n > 1 and self.temperature is not None and self.temperature < GREEDY_BELOW:
            raise bad_request("n", f"n must be 1 when using greedy sampling, got {self.n}.")
        if self.stream_options and self.stream_options.continuous_usage_stats:
            raise bad_request("stream_options.continuous_usage_stats", "vqueue streams usage in the last chunk only "
                              "(stream_options.include_usage); continuous_usage_stats is not supported.")
        fields: dict[str, Any] = {
            "max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k, "min_p": self.min_p, "seed": self.seed, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "repetition_penalty": self.repetition_penalty,
            "stop": self.stop or [], "stop_token_ids": self.stop_token_ids or [], "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens, "n": 1 if self.n is None else self.n,
            "include_stop_str_in_output": self.include_stop_str_in_output, "logit_bias": self.logit_bias,
            "truncate_prompt_tokens": self.truncate_prompt_tokens, "skip_special_tokens": self.skip_special_tokens,
            "response_format": self.response_format,
        }  # fmt: skip
        if self.top_k in (0, -1):  # vLLM's "no top-k" spellings
            fields["top_k"] = None
        return {k: v for k, v in fields.items() if v is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]] | None = None
    logprobs: int | None = None

    def job(self, job_id: str, model: str) -> CompletionJob:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise bad_request("prompt", f"vqueue runs one prompt per request; this one has {len(prompt)}: "
                                            "send one request per prompt (they run together in the engine).")
            prompt = prompt[0]
        if prompt is None or prompt == "" or prompt == []:
            raise bad_request("prompt", "Either prompt or prompt_embeds must be provided and non-empty.")
        fields = self.sampling()
        fields.setdefault("max_tokens", COMPLETION_DEFAULT_MAX_TOKENS)
        if self.logprobs is not None:
            fields["logprobs"] = self.logprobs
        return _build(lambda: CompletionJob(id=job_id, model=model, prompt=prompt, sampling=Sampling(**fields),
                                            priority=self.priority, timeout_s=self.timeout_s))


class ChatCompletionRequest(_Request):
    ADD_SPECIAL_TOKENS: ClassVar[bool] = False

    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = 0

    def job(self, job_id: str, model: str) -> ChatJob:
        if not self.messages:
            raise bad_request("messages", "Cannot apply chat template to an empty conversation. "
                                          "Provide at least one message.")
        fields = self.sampling()
        if self.max_completion_tokens is not None:  # OpenAI's newer name wins, as in vLLM
            fields["max_tokens"] = self.max_completion_tokens
        if self.logprobs:
            fields["logprobs"] = True
            if self.top_logprobs:
                fields["top_logprobs"] = self.top_logprobs
        elif self.top_logprobs:
            raise bad_request("top_logprobs", "when using `top_logprobs`, `logprobs` must be set to true.")
        return _build(lambda: ChatJob(id=job_id, model=model, messages=self.messages, sampling=Sampling(**fields),
                                      priority=self.priority, timeout_s=self.timeout_s))


def _build(make: Any) -> Any:
    try:
        return make()
    except ValidationError as exc:
        raise validation_error(exc, strip=("sampling",)) from None


def param_of(loc: tuple[Any, ...], strip: tuple[str, ...] = ()) -> str:
    """A pydantic error location as the parameter a client sent: ``sampling.temperature`` ->
    ``temperature``; union tags (``str``, ``list[...]``, ``function-after[...]``) left out."""
    parts: list[str] = []
    for item in loc:
        text = str(item)
        if "[" in text or text in ("str", "int", "float", "bool", "dict", "list", "none", "body"):
            continue
        if not parts and text in strip:
            continue
        if parts and parts[-1] == text:
            continue
        parts.append(text)
    return ".".join(parts)


def validation_error(exc: ValidationError, strip: tuple[str, ...] = ()) -> ApiError:
    """A 400 naming the first parameter at fault (and how many more there are)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    param = param_of(tuple(first["loc"]), strip)
    if first["type"] == "extra_forbidden":
        message = (f"Unknown parameter `{param}`: neither vLLM's OpenAI server nor vqueue takes it; check its "
                   "spelling (vqueue's own are `priority` and `timeout_s`).")
    else:
        message = f"{param}: {first['msg']}"
        if "input" in first and not isinstance(first["input"], dict | list):
            message += f" (parameter={param}, value={first['input']!r})"
    if len(errors) > 1:
        message += f"; and {len(errors) - 1} more error(s) in " + ", ".join(
            param_of(tuple(e["loc"]), strip) for e in errors[1:4])
    return bad_request(param or None, message)


# -- responses ---------------------------------------------------------------------------

SYSTEM_FINGERPRINT_PREFIX = "vqueue-"


def version() -> str:
    try:
        return metadata.version("vqueue")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def system_fingerprint() -> str:
    return f"{SYSTEM_FINGERPRINT_PREFIX}{version()}"


def _usage(result: JobResult) -> dict[str, Any]:
    u = result.usage
    return {"prompt_tokens": u.prompt_tokens, "total_tokens": u.total_tokens, "completion_tokens": u.completion_tokens,
            "prompt_tokens_details": None, "completion_tokens_details": None}


def completion_logprobs(tokens: list[TokenLogprob], text_offset: int = 0) -> dict[str, Any]:
    """vLLM's ``CompletionLogProbs``: per token its text offset, logprob, text, and a dict of the
    sampled token and the alternatives (the sampled one first, as vLLM's step dict orders them)."""
    offsets, logprobs, texts, tops = [], [], [], []
    for t in tokens:
        offsets.append(text_offset)
        text_offset += len(t.token)
        logprobs.append(max(t.logprob, -9999.0))
        texts.append(t.token)
        top = {t.token: max(t.logprob, -9999.0)}
        for alt in t.top_logprobs:
            top.setdefault(alt.token, max(alt.logprob, -9999.0))
        tops.append(top)
    return {"text_offset": offsets, "token_logprobs": logprobs, "tokens": texts, "top_logprobs": tops}


def _chat_logprob(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": max(logprob, -9999.0), "bytes": list(token.encode("utf-8", errors="replace"))}


def chat_logprobs(tokens: list[TokenLogprob], top_n: int) -> dict[str, Any]:
    """vLLM's ``ChatCompletionLogProbs``: the first ``top_n`` of the sampled token and the
    alternatives by rank (vLLM's step dict, sampled token first)."""
    content = []
    for t in tokens:
        ranked = [(t.token_id, t.token, t.logprob)] + [(a.token_id, a.token, a.logprob) for a in t.top_logprobs
                                                       if a.token_id != t.token_id]
        content.append({**_chat_logprob(t.token, t.logprob),
                        "top_logprobs": [_chat_logprob(tok, lp) for _, tok, lp in ranked[:top_n]]})
    return {"content": content}


def completion_response(result: JobResult, response_id: str, created: int, fingerprint: str) -> dict[str, Any]:
    choices = [{"index": c.index, "text": c.text or "",
                "logprobs": completion_logprobs(c.logprobs) if c.logprobs is not None else None,
                "finish_reason": c.finish_reason.value, "stop_reason": c.stop_reason, "token_ids": None,
                "prompt_logprobs": None, "prompt_token_ids": None, "routed_experts": None}
               for c in result.choices]  # fmt: skip
    return {"id": response_id, "object": "text_completion", "created": created, "model": result.model,
            "choices": choices, "service_tier": None, "system_fingerprint": fingerprint, "usage": _usage(result),
            "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}


def chat_response(result: JobResult, response_id: str, created: int, fingerprint: str,
                  top_n: int) -> dict[str, Any]:
    choices = [{"index": c.index,
                "message": {"role": "assistant", "content": c.message.content if c.message else "", "refusal": None,
                            "annotations": None, "audio": None, "function_call": None,
                            "reasoning": None},
                "logprobs": chat_logprobs(c.logprobs, top_n) if c.logprobs is not None else None,
                "finish_reason": c.finish_reason.value, "stop_reason": c.stop_reason, "token_ids": None,
                "routed_experts": None}
               for c in result.choices]  # fmt: skip
    return {"id": response_id, "object": "chat.completion", "created": created, "model": result.model,
            "choices": choices, "service_tier": None, "system_fingerprint": fingerprint, "usage": _usage(result),
            "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None, "kv_transfer_params": None,
            "ec_transfer_params": None, "metrics": None}


def model_card(model: ModelInfo) -> dict[str, Any]:
    """One ``/v1/models`` entry in vLLM's ``ModelCard`` shape (``created``: its first worker's start)."""
    created = int(model.started_at)
    return {"id": model.id, "object": "model", "created": created, "owned_by": "vqueue", "root": model.source,
            "parent": None, "max_model_len": model.max_model_len,
            "permission": [{"id": f"modelperm-{model.id}", "object": "model_permission", "created": created,
                            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                            "organization": "*", "group": None, "is_blocking": False}]}


def now() -> int:
    return int(time.time())
