"""``vqueue``: enqueue jobs and read results from the shell.

    vqueue complete "你好，你是谁" --max-tokens 500 --temperature 0
    vqueue chat --system "You are terse." "What is a queue?"
    vqueue result JOB_ID
"""

from __future__ import annotations

import base64
import json
import mimetypes
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from producer.client import Client
from producer.errors import BrokerUnavailable, InvalidJob, JobFailed, JobTimeout, ModelNotServed
from producer.protocol import ChatJob, ChatMessage, CompletionJob, JobResult, Sampling
from producer.settings import get_settings

app = typer.Typer(help="Enqueue LLM jobs into vqueue and read their results.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
out = Console()
err = Console(stderr=True)

_settings = get_settings()

Model = Annotated[str, typer.Option(help="Served model name (settings: model.served_name).")]
MaxTokens = Annotated[int | None, typer.Option(help="Most tokens to generate (default: what is left of the context).")]
Temperature = Annotated[float | None, typer.Option(help="0 is greedy (default: the model's).")]
TopP = Annotated[float | None, typer.Option(help="Nucleus sampling mass (default: the model's).")]
Seed = Annotated[int | None, typer.Option(help="Sampling seed.")]
Stop = Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")]
Wait = Annotated[bool, typer.Option(help="Wait for the result; --no-wait prints the job id only.")]
Timeout = Annotated[float, typer.Option(help="Seconds to wait for the result (settings: producer.default_timeout_s).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the whole result as JSON.")]
class IfUnserved(StrEnum):
    wait = "wait"
    fail = "fail"


IfUnservedOpt = Annotated[
    IfUnserved,
    typer.Option(
        help="If no live worker serves the model: 'wait' queues the job anyway (a worker may start later; the "
        "default), 'fail' refuses it at once."
    ),
]
Image = Annotated[list[Path] | None, typer.Option("--image", help="An image file to send with the message "
                                                 "(repeatable; sent as a data: URI).")]


def _sampling(max_tokens: int | None, temperature: float | None, top_p: float | None, seed: int | None,
              stop: list[str] | None) -> Sampling:
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop or [])


def _print(result: JobResult, as_json: bool) -> None:
    if as_json:
        out.print_json(result.model_dump_json())
        return
    out.print(result.text, markup=False, highlight=False)
    u = result.usage
    err.print(f"[dim]{result.id} {result.finish_reason.value} · prompt {u.prompt_tokens} + completion "
              f"{u.completion_tokens} = {u.total_tokens} tokens · {result.worker}[/dim]")


def _submit_and_show(
    make_job: Callable[[], CompletionJob | ChatJob], wait: bool, timeout: float, as_json: bool, if_unserved: IfUnserved
) -> None:
    try:
        job = make_job()
    except (ValidationError, InvalidJob) as exc:
        err.print(f"[red]invalid job:[/red] {exc}")
        raise typer.Exit(2) from None
    with Client() as client:
        try:
            job_id = client.submit(job, if_unserved=if_unserved.value)
        except (InvalidJob, ModelNotServed) as exc:
            err.print(f"[red]refused:[/red] {exc}")
            raise typer.Exit(2) from None
        if not wait:
            out.print(job_id)
            return
        _wait(client, job_id, timeout, as_json)


def _wait(client: Client, job_id: str, timeout: float, as_json: bool) -> None:
    try:
        _print(client.result(job_id, timeout=timeout), as_json)
    except JobFailed as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    except JobTimeout as exc:
        err.print(f"[yellow]{exc}[/yellow]")
        raise typer.Exit(3) from None


@app.command()
def complete(
    prompt: Annotated[str, typer.Argument(help="The text to continue.")],
    model: Model = _settings.model.served_name,
    max_tokens: MaxTokens = None,
    temperature: Temperature = None,
    top_p: TopP = None,
    seed: Seed = None,
    stop: Stop = None,
    wait: Wait = True,
    timeout: Timeout = _settings.producer.default_timeout_s,
    as_json: AsJson = False,
    if_unserved: IfUnservedOpt = IfUnserved.wait,
) -> None:
    """Enqueue a completion job (as /v1/completions) and print its text."""
    _submit_and_show(
        lambda: CompletionJob(model=model, prompt=prompt,
                              sampling=_sampling(max_tokens, temperature, top_p, seed, stop)),
        wait, timeout, as_json, if_unserved,
    )


@app.command()
def chat(
    message: Annotated[str, typer.Argument(help="The user's message.")],
    system: Annotated[str | None, typer.Option(help="A system message before it.")] = None,
    image: Image = None,
    model: Model = _settings.model.served_name,
    max_tokens: MaxTokens = None,
    temperature: Temperature = None,
    top_p: TopP = None,
    seed: Seed = None,
    stop: Stop = None,
    wait: Wait = True,
    timeout: Timeout = _settings.producer.default_timeout_s,
    as_json: AsJson = False,
    if_unserved: IfUnservedOpt = IfUnserved.wait,
) -> None:
    """Enqueue a chat job (as /v1/chat/completions) and print the assistant's reply."""

    def make() -> ChatJob:
        messages = [ChatMessage(role="system", content=system)] if system else []
        if image:
            parts: list = [{"type": "image_url", "image_url": {"url": _data_uri(path)}} for path in image]
            messages.append(ChatMessage(role="user", content=[*parts, {"type": "text", "text": message}]))
        else:
            messages.append(ChatMessage(role="user", content=message))
        return ChatJob(model=model, messages=messages, sampling=_sampling(max_tokens, temperature, top_p, seed, stop))

    _submit_and_show(make, wait, timeout, as_json, if_unserved)


def _data_uri(path: Path) -> str:
    if not path.is_file():
        raise InvalidJob("--image", f"{path} is not a file")
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


@app.command()
def models(as_json: AsJson = False) -> None:
    """List the models live workers serve now (as /v1/models), with their workers."""
    with Client() as client:
        found = client.models()
    if as_json:
        out.print_json(json.dumps({"object": "list", "data": [m.model_dump(mode="json") for m in found]}))
        return
    if not found:
        err.print("no live worker serves any model; start one with `celery -A worker worker`")
        raise typer.Exit(1)
    table = Table("model", "source", "max_model_len", "modalities", "workers", "since")
    for m in found:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.started_at))
        table.add_row(m.id, m.source, str(m.max_model_len), ", ".join(m.modalities), ", ".join(m.workers), since)
    out.print(table)


@app.command()
def result(
    job_id: Annotated[str, typer.Argument(help="The id that complete/chat --no-wait printed.")],
    timeout: Timeout = _settings.producer.default_timeout_s,
    as_json: AsJson = False,
) -> None:
    """Wait for a job's result and print it."""
    with Client() as client:
        _wait(client, job_id, timeout, as_json)


@app.command()
def settings() -> None:
    """Print the settings in effect (settings.toml, then VQUEUE_* environment variables)."""
    out.print_json(json.dumps(_settings.model_dump(mode="json")))


@app.command()
def dead(
    limit: Annotated[int, typer.Option(help="Show at most this many, newest first.")] = 20,
    as_json: AsJson = False,
) -> None:
    """List messages no worker could run (the dead-letter list), newest first."""
    with Client() as client:
        entries = client.dead_letters(limit)
    if as_json:
        out.print_json(json.dumps([e.model_dump(mode="json") for e in entries]))
        return
    if not entries:
        err.print("no dead letters")
        return
    table = Table("when", "queue", "job", "error", "field", "reason", "bytes")
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.at))
        table.add_row(when, e.queue, e.job_id or "-", e.error_type, e.field or "-", e.reason[:120], str(e.raw_size))
    out.print(table)


def main() -> None:
    """The ``vqueue`` command: Redis unreachable is one clear line, never a traceback."""
    try:
        app()
    except BrokerUnavailable as exc:
        err.print(str(exc), style="red", markup=False, highlight=False)
        raise SystemExit(4) from None


if __name__ == "__main__":
    main()
