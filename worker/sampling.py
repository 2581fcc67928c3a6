"""Turning a job's ``Sampling`` into vLLM ``SamplingParams``, with the server's defaults."""

from __future__ import annotations

from typing import Any

from producer.errors import InvalidJob
from producer.protocol import Sampling

# Fields passed through when the job sets them; None leaves the model's / vLLM's default.
_OPTIONAL = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
             "frequency_penalty", "repetition_penalty")  # fmt: skip


def to_sampling_params(
    sampling: Sampling, prompt_tokens: int, max_model_len: int, model_defaults: dict[str, Any]
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
        max_tokens=max_tokens,
        stop=sampling.stop or None,
        stop_token_ids=sampling.stop_token_ids or None,
        ignore_eos=sampling.ignore_eos,
        # Jobs are not streamed: one output per request, not one per token, spares the
        # worker's Python thread the per-token work.
        output_kind=RequestOutputKind.FINAL_ONLY,
        **kwargs,
    )
