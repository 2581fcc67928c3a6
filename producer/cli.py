"""``vqueue``: enqueue jobs and read results from the shell.

    vqueue complete "你好，你是谁" --max-tokens 500 --temperature 0
    vqueue chat --system "You are terse." "What is a queue?"
    vqueue result JOB_ID
    vqueue cancel JOB_ID...          vqueue show JOB_ID
    vqueue queue [--json]            vqueue queue purge MODEL
    vqueue dead                      vqueue dead retry JOB_ID / vqueue dead purge
    vqueue gateway [--port 8000]     the OpenAI-compatible HTTP API
    vqueue batch run in.jsonl -o out.jsonl     vqueue batch status / cancel BATCH_ID
    vqueue health [--worker]         exit 0 if Redis answers [and this host's worker beats]
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

from producer import keys
from producer.batch_cli import batch_app
from producer.client import Client
from producer.errors import (
    BrokerUnavailable,
    InvalidJob,
    JobFailed,
    JobNotFound,
    JobTimeout,
    ModelNotServed,
    QueueFull,
    RedisFull,
    redact_url,
)
from producer.metrics import EXPORTER_PORT
from producer.protocol import ChatJob, ChatMessage, CompletionJob, JobRecord, JobResult, Sampling
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
StreamOpt = Annotated[bool, typer.Option("--stream", help="Print the text as it is produced (the job streams its "
                                         "tokens through Redis), then the usage.")]
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
Priority = Annotated[int | None, typer.Option(min=0, max=9, help="0-9, higher runs first "
                                              "(settings: queue.default_priority, 5).")]
JobTimeoutS = Annotated[float | None, typer.Option("--job-timeout", help="Seconds from now until the job expires: "
                                                   "queued, it never runs; running, it stops with its partial output "
                                                   "(settings: queue.default_timeout_s).")]
Image = Annotated[list[Path] | None, typer.Option("--image", help="An image file to send with the message "
                                                 "(repeatable; sent as a data: URI).")]


def _sampling(max_tokens: int | None, temperature: float | None, top_p: float | None, seed: int | None,
              stop: list[str] | None) -> Sampling:
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop or [])


def _print(result: JobResult, as_json: bool, text: bool = True) -> None:
    if as_json:
        out.print_json(result.model_dump_json())
        return
    if text:  # False after --stream printed it
        out.print(result.text, markup=False, highlight=False)
    u = result.usage
    err.print(f"[dim]{result.id} {result.finish_reason.value} · prompt {u.prompt_tokens} + completion "
              f"{u.completion_tokens} = {u.total_tokens} tokens · {result.worker}[/dim]")


def _submit_and_show(
    make_job: Callable[[], CompletionJob | ChatJob], wait: bool, timeout: float, as_json: bool, if_unserved: IfUnserved,
    stream: bool = False,
) -> None:
    try:
        job = make_job()
        if stream:
            job = job.model_copy(update={"stream": True})
    except (ValidationError, InvalidJob) as exc:
        err.print(f"[red]invalid job:[/red] {exc}")
        raise typer.Exit(2) from None
    with Client() as client:
        try:
            job_id = client.submit(job, if_unserved=if_unserved.value)
        except (InvalidJob, ModelNotServed) as exc:
            err.print(f"[red]refused:[/red] {exc}")
            raise typer.Exit(2) from None
        except QueueFull as exc:
            err.print(f"[yellow]queue full:[/yellow] {exc}")
            raise typer.Exit(5) from None
        if not wait:
            out.print(job_id)
            return
        if stream:
            _stream(client, job_id, timeout)
        _wait(client, job_id, timeout, as_json and not stream, text=not stream)


def _stream(client: Client, job_id: str, timeout: float) -> None:
    """Print the job's text as it is produced (first choice), then its usage line (from ``_wait``)."""
    attempt = None
    try:
        for chunk in client.stream(job_id, timeout=timeout):
            if attempt is not None and chunk.attempt != attempt:
                err.print(f"\n[yellow]the job started over on another worker (attempt {chunk.attempt}):[/yellow]")
            attempt = chunk.attempt
            for choice in chunk.choices:
                if choice.index == 0:
                    out.out(choice.text, end="", highlight=False)
        out.out("")
    except JobFailed:
        out.out("")  # _wait reports it, with its partial output


def _wait(client: Client, job_id: str, timeout: float, as_json: bool, text: bool = True) -> None:
    try:
        _print(client.result(job_id, timeout=timeout), as_json, text)
    except JobFailed as exc:
        partial = getattr(exc, "partial", None)
        if partial is not None:
            _print(partial, as_json, text)
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
    priority: Priority = None,
    job_timeout: JobTimeoutS = None,
    stream: StreamOpt = False,
) -> None:
    """Enqueue a completion job (as /v1/completions) and print its text."""
    _submit_and_show(
        lambda: CompletionJob(model=model, prompt=prompt, priority=priority, timeout_s=job_timeout,
                              sampling=_sampling(max_tokens, temperature, top_p, seed, stop)),
        wait, timeout, as_json, if_unserved, stream,
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
    priority: Priority = None,
    job_timeout: JobTimeoutS = None,
    stream: StreamOpt = False,
) -> None:
    """Enqueue a chat job (as /v1/chat/completions) and print the assistant's reply."""

    def make() -> ChatJob:
        messages = [ChatMessage(role="system", content=system)] if system else []
        if image:
            parts: list = [{"type": "image_url", "image_url": {"url": _data_uri(path)}} for path in image]
            messages.append(ChatMessage(role="user", content=[*parts, {"type": "text", "text": message}]))
        else:
            messages.append(ChatMessage(role="user", content=message))
        return ChatJob(model=model, messages=messages, priority=priority, timeout_s=job_timeout,
                       sampling=_sampling(max_tokens, temperature, top_p, seed, stop))

    _submit_and_show(make, wait, timeout, as_json, if_unserved, stream)


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
def health(
    worker: Annotated[bool, typer.Option("--worker", help="Also check that this host's worker renews its "
                                         "heartbeat in Redis (its `vqueue models` announcement).")] = False,
    hostname: Annotated[str | None, typer.Option(help="The worker's Celery node name (default: celery@ this "
                                                 "host's name, as `celery -A worker worker` names itself).")] = None,
) -> None:
    """Exit 0 when Redis answers (and, with --worker, this host's worker heartbeat is fresh);
    1 when the worker's heartbeat is missing; 4 when Redis is unreachable. For health checks
    (compose, Kubernetes probes): it reads Redis, never logs."""
    with Client() as client:
        if not worker:
            client.queue_length(_settings.model.served_name)  # one round trip; BrokerUnavailable -> 4
            out.print("redis ok")
            return
        from celery.utils.nodenames import default_nodename

        name = hostname or default_nodename(None)
        found = client.heartbeat(name)
    if found is None:
        err.print(f"no heartbeat from {name} in Redis: the worker is not running, still loading its engine, or "
                  f"stopped renewing (it expires after {keys.HEARTBEAT_TTL_BEATS} x worker.heartbeat_s = "
                  f"{keys.HEARTBEAT_TTL_BEATS * _settings.worker.heartbeat_s:g} s)", markup=False)
        raise typer.Exit(1)
    info, age_s = found
    out.print(f"{name} serves {info.served_name}: last heartbeat {age_s:.1f} s ago, {info.in_flight} job(s) in flight",
              markup=False, highlight=False)


@app.command()
def settings() -> None:
    """Print the settings in effect (settings.toml, then VQUEUE_* environment variables)."""
    out.print_json(json.dumps(_settings.model_dump(mode="json")))


dead_app = typer.Typer(help="Messages no worker could read, and quarantined jobs (the dead-letter list).")
app.add_typer(dead_app, name="dead")


@dead_app.callback(invoke_without_command=True)
def dead(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="Show at most this many, newest first.")] = 20,
    as_json: AsJson = False,
) -> None:
    """List messages no worker could run and quarantined jobs, newest first."""
    if ctx.invoked_subcommand is not None:
        return
    with Client() as client:
        entries = client.dead_letters(limit)
    if as_json:
        out.print_json(json.dumps([e.model_dump(mode="json") for e in entries]))
        return
    if not entries:
        err.print("no dead letters")
        return
    table = Table("when", "kind", "queue", "job", "error", "field", "reason", "bytes")
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.at))
        table.add_row(when, e.kind, e.queue, e.job_id or "-", e.error_type, e.field or "-", e.reason[:160],
                      str(e.raw_size))
    out.print(table)


@dead_app.command("retry")
def dead_retry(job_id: Annotated[str, typer.Argument(help="A quarantined job's id (`vqueue dead`).")]) -> None:
    """Submit a quarantined job again, as a new job; prints the new id."""
    with Client() as client:
        try:
            out.print(client.retry_dead(job_id))
        except (KeyError, ValueError) as exc:
            err.print(f"[red]{exc.args[0]}[/red]")
            raise typer.Exit(2) from None


@dead_app.command("purge")
def dead_purge(yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False) -> None:
    """Empty the dead-letter list."""
    if not yes:
        typer.confirm("Remove every dead letter?", abort=True)
    with Client() as client:
        err.print(f"removed {client.purge_dead()} dead letters")


@app.command()
def cancel(job_ids: Annotated[list[str], typer.Argument(help="The ids of the jobs to cancel.")]) -> None:
    """Cancel jobs, queued or running; says what happened to each."""
    with Client() as client:
        said = client.cancel_many(job_ids)
    for job_id, what in said.items():
        out.print(f"{job_id}: {what}", markup=False, highlight=False)
    if any(what == "unknown job" for what in said.values()):
        raise typer.Exit(2)


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(epoch)) + f".{int(epoch % 1 * 1000):03d}"


def _show_record(r: JobRecord) -> None:
    out.print(f"job {r.id}: [bold]{r.state}[/bold]  model {r.model or '?'}  priority {r.priority}  "
              f"kind {r.kind or '?'}" + (f"  deadline {_when(r.deadline)}" if r.deadline else ""))
    if r.error:
        out.print(f"  {r.error}", markup=False, highlight=False)
    for a in r.attempts:
        out.print(f"  attempt {a.number}: {a.worker} at {_when(a.picked_up_at)}", markup=False, highlight=False)
    if r.engine_deaths:
        out.print(f"  engine deaths: {r.engine_deaths} (last: {r.last_death})", markup=False, highlight=False)
    steps = [("entered Redis", r.enqueued_at), ("picked up", r.picked_up_at), ("handed to the engine", r.handed_at),
             ("first scheduled", r.scheduled_at), ("first token", r.first_token_at), ("finished", r.finished_at)]
    table = Table("step", "when", "+ s")
    for name, at in steps:
        since = f"{at - r.enqueued_at:.3f}" if at is not None and r.enqueued_at is not None else "-"
        table.add_row(name, _when(at), since)
    out.print(table)
    derived = {k: v for k, v in r.derived().items() if v is not None}
    if derived:
        out.print("  " + "  ".join(f"{k} {v:.3f}" for k, v in derived.items()))
    if r.usage is not None:
        out.print(f"  tokens: prompt {r.usage.prompt_tokens} + completion {r.usage.completion_tokens} = "
                  f"{r.usage.total_tokens}; finish_reason {r.finish_reason.value if r.finish_reason else '-'}")


@app.command()
def show(job_id: Annotated[str, typer.Argument(help="The job's id.")], as_json: AsJson = False) -> None:
    """Everything known about one job: state, attempts and workers, timeline, tokens."""
    with Client() as client:
        try:
            record = client.job(job_id)
        except JobNotFound as exc:
            err.print(str(exc), markup=False)
            raise typer.Exit(2) from None
    if as_json:
        out.print_json(json.dumps({**record.model_dump(mode="json"), "derived": record.derived()}))
        return
    _show_record(record)


app.add_typer(batch_app, name="batch")

queue_app = typer.Typer(help="The models' queues: what waits, what runs, how fast; purge.")
app.add_typer(queue_app, name="queue")


@queue_app.callback(invoke_without_command=True)
def queue(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option(help="Only this model's queue.")] = None,
    as_json: AsJson = False,
) -> None:
    """Per model: jobs waiting by priority, the oldest one's wait, jobs in flight per worker,
    live workers, completions per second."""
    if ctx.invoked_subcommand is not None:
        return
    with Client() as client:
        stats = client.queue_stats(model)
    if as_json:
        out.print_json(json.dumps([s.model_dump(mode="json") for s in stats]))
        return
    if not stats:
        err.print("no queue holds jobs and no worker is live")
        return
    for s in stats:
        by_priority = ", ".join(f"p{p}: {n}" for p, n in s.waiting_by_priority.items()) or "none"
        oldest = f"{s.oldest_waiting_s:.1f} s" if s.oldest_waiting_s is not None else "-"
        bound = f" of {s.max_backlog}" if s.max_backlog else ""
        out.print(f"[bold]{s.model}[/bold]: {s.waiting}{bound} waiting ({by_priority}), oldest {oldest}; "
                  f"{s.in_flight} in flight on {len(s.workers)} live workers; {s.completions_per_s:.2f} jobs/s")
        for w in s.workers:
            out.print(f"  {w.hostname}: {w.in_flight}/{w.max_in_flight} in flight, {w.completions_per_s:.2f} jobs/s",
                      markup=False, highlight=False)


@queue_app.command("purge")
def queue_purge(
    model: Annotated[str, typer.Argument(help="The served model name whose queue to empty.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
) -> None:
    """Empty a model's queue: every waiting job ends cancelled, and its producer hears so."""
    with Client() as client:
        if not yes:
            typer.confirm(f"Cancel all {client.queue_length(model)} jobs waiting for {model!r}?", abort=True)
        purged = client.purge(model)
    err.print(f"purged {len(purged)} jobs from {model!r}")


@app.command()
def gateway(
    host: Annotated[str | None, typer.Option(help="Interface to listen on (settings: gateway.host).")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (settings: gateway.port).")] = None,
    workers: Annotated[int | None, typer.Option(help="uvicorn worker processes (settings: gateway.workers).")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level.")] = "info",
) -> None:
    """Serve the OpenAI-compatible HTTP API (vLLM's /v1/models, /v1/completions, /v1/chat/completions)."""
    import os

    try:
        import uvicorn
    except ImportError:
        err.print('the gateway needs FastAPI and uvicorn: pip install "vqueue[gateway]"')
        raise typer.Exit(2) from None
    # Flags travel as settings in the environment, so uvicorn's worker processes read them too.
    for name, value in (("HOST", host), ("PORT", port), ("WORKERS", workers)):
        if value is not None:
            os.environ[f"VQUEUE_GATEWAY__{name}"] = str(value)
    get_settings.cache_clear()
    g = get_settings().gateway
    err.print(f"vqueue gateway on http://{g.host}:{g.port}/v1 ({g.workers} worker(s); "
              f"{'API keys required' if g.api_keys else 'no API key required'})")
    uvicorn.run("gateway.app:create_app", factory=True, host=g.host, port=g.port, workers=g.workers,
                log_level=log_level)


@app.command()
def exporter(
    port: Annotated[int, typer.Option(help="TCP port of /metrics.")] = EXPORTER_PORT,
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
) -> None:
    """Serve the backlog (jobs waiting per model and priority, the oldest one's age) as Prometheus
    metrics on http://HOST:PORT/metrics, read from Redis at each scrape: for deployments without
    a gateway, whose /metrics serves the same."""
    from producer.exporter import serve

    err.print(f"vqueue exporter: the backlog of {redact_url(_settings.redis.url)} on http://{host}:{port}/metrics",
              markup=False, highlight=False)
    try:
        serve(_settings, host, port)
    except OSError as exc:
        err.print(f"[red]cannot listen on {host}:{port} ({exc}); choose another --port[/red]")
        raise typer.Exit(2) from None


def main() -> None:
    """The ``vqueue`` command: Redis unreachable is one clear line, never a traceback."""
    try:
        app()
    except (BrokerUnavailable, RedisFull) as exc:
        err.print(str(exc), style="red", markup=False, highlight=False)
        raise SystemExit(4) from None


if __name__ == "__main__":
    main()
