"""Turning a job into the engine's input, through vLLM's own renderer.

Chat jobs go through the model's chat template (``engine.renderer.render_chat_async``, the
path vLLM's OpenAI server takes), never string concatenation. The rendered prompt carries
its token ids, so the worker knows the prompt length before the engine sees the job.
"""

from __future__ import annotations

from typing import Any

from producer.errors import InvalidJob
from producer.protocol import ChatJob, CompletionJob
from worker import failures

_CHAT_KWARGS = {"add_generation_prompt": True}  # else the prompt ends without the assistant header


async def render(renderer: Any, job: CompletionJob | ChatJob, messages: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The engine prompt (a dict with ``prompt_token_ids``) for ``job``.

    ``messages`` are a chat job's messages prepared by ``worker.media`` (images decoded).
    """
    from vllm.renderers import ChatParams

    try:
        if isinstance(job, CompletionJob):
            source = {"prompt": job.prompt} if isinstance(job.prompt, str) else {"prompt_token_ids": job.prompt}
            (prompt,) = await renderer.render_cmpl_async([source])
        else:
            _, (prompt,) = await renderer.render_chat_async(
                [messages], ChatParams(chat_template_kwargs=dict(_CHAT_KWARGS))
            )
    except Exception as exc:
        raise failures.classify(exc, "prompt" if isinstance(job, CompletionJob) else "messages") from None
    keep = job.sampling.truncate_prompt_tokens
    if keep is not None and len(prompt["prompt_token_ids"]) > keep:
        prompt = truncate(prompt, keep)
    return prompt


def truncate(prompt: dict[str, Any], keep: int) -> dict[str, Any]:
    """Keep the last ``keep`` prompt tokens, as vLLM's server does for ``truncate_prompt_tokens``."""
    if set(prompt) - {"type", "prompt", "prompt_token_ids", "arrival_time"}:
        # Cutting through image placeholders would break the prompt.
        raise InvalidJob("sampling.truncate_prompt_tokens", "only prompts without images can be truncated")
    kept = {k: v for k, v in prompt.items() if k != "prompt"}
    kept["prompt_token_ids"] = prompt["prompt_token_ids"][-keep:]
    return kept


def prompt_length(prompt: dict[str, Any]) -> int:
    return len(prompt["prompt_token_ids"])
