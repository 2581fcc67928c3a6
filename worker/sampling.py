"""Turning a job's ``Sampling`` into vLLM ``SamplingParams``, with the server's defaults."""

from __future__ import annotations

from typing import Any

from producer.errors import InvalidJob
from producer.protocol import ResponseFormat, Sampling

# Fields passed through when the job sets them; None leaves the model's / vLLM's default.
_OPTIONAL = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
             "frequency_penalty", "repetition_penalty")  # fmt: skip


def structured_outputs(response_format: ResponseFormat | None) -> Any:
    """vLLM's structured-output constraint for an OpenAI ``response_format`` (None for text)."""
    if response_format is None or response_format.type == "text":
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if response_format.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(json=response_format.json_schema.schema_)


def top_logprobs(sampling: Sampling) -> int | None:
    """How many alternatives per token vLLM should return (None: no logprobs)."""
    if sampling.logprobs is True:  # the chat form
        return sampling.top_logprobs or 0
    if sampling.logprobs is False or sampling.logprobs is None:
        return None
    return int(sampling.logprobs)


def to_sampling_params(
    sampling: Sampling, prompt_tokens: int, max_model_len: int, model_defaults: dict[str, Any],
    stream: bool = False,
) -> Any:
    """SamplingParams for one job.

    ``model_defaults`` is the model's ``generation_config.json`` as vLLM reads it
    (``ModelConfig.get_diff_sampling_param``): like ``vllm serve``, fields the job leaves
    unset take those values. ``max_tokens`` unset means what is left of the context.
    """
    from vllm import SamplingParams  # late: importing the worker app must stay cheap
    from vllm.sampling_params import RequestOutputKind

    room = max_model_len - prompt_tokens
    if room < 1:
        raise InvalidJob(
            "prompt", f"the prompt is {prompt_tokens} tokens; engine.max_model_len is {max_model_len} "
            "and leaves no room for output. Shorten the prompt."
        )
    max_tokens = sampling.max_tokens if sampling.max_tokens is not None else model_defaults.get("max_tokens", room)
    if prompt_tokens + max_tokens > max_model_len:
        raise InvalidJob(
            "sampling.max_tokens", f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
            f"{prompt_tokens + max_tokens} exceeds engine.max_model_len ({max_model_len}); "
            f"ask for at most {room} tokens."
        )
    kwargs: dict[str, Any] = {k: v for k, v in model_defaults.items() if k in _OPTIONAL}
    kwargs.update({k: getattr(sampling, k) for k in _OPTIONAL if getattr(sampling, k) is not None})
    return SamplingParams(
        n=sampling.n,
        max_tokens=max_tokens,
        min_tokens=sampling.min_tokens,
        stop=sampling.stop or None,
        stop_token_ids=sampling.stop_token_ids or None,
        include_stop_str_in_output=sampling.include_stop_str_in_output,
        ignore_eos=sampling.ignore_eos,
        logprobs=top_logprobs(sampling),
        logit_bias=sampling.logit_bias or None,
        skip_special_tokens=sampling.skip_special_tokens,
        structured_outputs=structured_outputs(sampling.response_format),
        # A job that is not streamed gets one output, not one per step: that spares the engine
        # process's loop the per-token work. A streamed one gets each step's new tokens only
        # (DELTA), which is what its stream entries carry; the engine process joins them.
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        **kwargs,
    )
