"""``vqueue batch``: run a batch file (OpenAI's / ``vllm run-batch``'s JSONL) through the queue.

    vqueue batch run in.jsonl -o out.jsonl [--errors err.jsonl] [--model M] [--window 24h]
    vqueue batch status BATCH_ID
    vqueue batch cancel BATCH_ID

Interrupt ``run`` (Ctrl-C, a kill, a reboot) and run the same command again: it goes on where
it stopped; the jobs already queued kept running meanwhile (``producer.batch``).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from producer import batch as batches
from producer.client import Client

batch_app = typer.Typer(help="Batch files (OpenAI Batch API / vllm run-batch JSONL): run, status, cancel.",
                        no_args_is_help=True)
err = Console(stderr=True)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(text: str) -> float:
    """``24h``, ``90m``, ``3600s``, ``2d`` (OpenAI's completion_window is ``24h``) as seconds."""
    number, unit = text[:-1], text[-1:]
    if unit not in _UNITS or not number.replace(".", "", 1).isdigit() or float(number) <= 0:
        raise typer.BadParameter(f"{text!r}: a positive number followed by s, m, h or d (e.g. 24h)")
    return float(number) * _UNITS[unit]


@batch_app.command("run")
def run(
    input_file: Annotated[Path, typer.Argument(help="The JSONL input: one request per line.", exists=True,
                                               dir_okay=False, readable=True)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where the answered lines go (appended to "
                                         "when the batch is run again).")],
    errors: Annotated[Path | None, typer.Option(help="Where failed and bad lines go (default: the output's "
                                                "name + .errors.jsonl).")] = None,
    model: Annotated[str | None, typer.Option(help="Model for lines whose body names none.")] = None,
    priority: Annotated[int | None, typer.Option(min=0, max=9, help="Priority of the lines whose body sets none "
                                                 "(settings: queue.batch_priority).")] = None,
    window: Annotated[str | None, typer.Option(help="Completion window from the batch's first run (e.g. 24h): "
                                               "lines not done by then end expired.")] = None,
    batch_id: Annotated[str | None, typer.Option(help="The batch's id (default: from the file's content, so "
                                                 "the same file run again is the same batch).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Run every line of a batch file as a job; write OpenAI's batch output format."""
    errors = errors or output.with_name(output.name.removesuffix(".jsonl") + ".errors.jsonl")
    if errors.resolve() == output.resolve():
        raise typer.BadParameter("--errors must differ from --output")
    digest, lines = batches.fingerprint(input_file)
    try:
        the_id = batches.check_batch_id(batch_id or batches.batch_id_for(digest))
    except batches.BatchError as exc:
        raise typer.BadParameter(str(exc)) from None
    with Client() as client:
        known = batches.BatchState(client.redis, the_id, client.settings.redis.result_ttl_s).read()
        deadline = float(known["deadline"]) if known.get("deadline") else None
        if deadline is None and window is not None:
            deadline = time.time() + parse_window(window)
        batch = batches.Batch(the_id, input_file, output, errors, lines, deadline=deadline, default_model=model)
        err.print(f"batch {the_id}: {lines} lines from {input_file} -> {output} (errors: {errors})")
        with _Bar(lines, quiet) as bar:
            runner = batches.BatchRunner(client, batch, priority=priority, on_progress=bar.update)
            previous = signal.signal(signal.SIGINT, lambda *_: _detach(runner))
            try:
                progress = runner.run()
            except batches.BatchBusy as exc:
                err.print(str(exc), style="red", markup=False)
                raise typer.Exit(3) from None
            except batches.BatchError as exc:
                err.print(f"batch {the_id}: {exc}", style="red", markup=False)
                raise typer.Exit(2) from None
            finally:
                signal.signal(signal.SIGINT, previous)
    if progress.done < progress.total:
        err.print(f"stopped with {progress.done}/{progress.total} lines written; {progress.in_flight} jobs keep "
                  "running. Run the same command again to go on.")
        raise typer.Exit(130)
    err.print(f"batch {the_id}: {progress.completed} completed, {progress.failed} failed "
              f"(of {progress.total}); output {output}, errors {errors}")


def _detach(runner: batches.BatchRunner) -> None:
    err.print("stopping: the jobs queued keep running; run the same command again to go on")
    runner.stop()


class _Bar:
    """Rich's progress bar: lines written of the total, failed, tokens/s, time left."""

    def __init__(self, total: int, quiet: bool) -> None:
        self._progress = Progress(
            TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=err, disable=quiet, transient=False,
        )
        self._task = self._progress.add_task("batch", total=total, detail="")
        self._started = time.monotonic()

    def __enter__(self) -> _Bar:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, p: batches.Progress) -> None:
        rate = p.completion_tokens / max(1e-9, time.monotonic() - self._started)
        held = f", {p.held_back} held back (backlog full)" if p.held_back else ""
        detail = f"{p.failed} failed, {p.in_flight} in flight{held}, {rate:,.0f} tok/s"
        self._progress.update(self._task, completed=p.done, detail=detail)


@batch_app.command("status")
def status(batch_id: Annotated[str, typer.Argument(help="The batch's id (printed by `vqueue batch run`).")]) -> None:
    """The batch's record: status, lines, completed, failed, times (JSON)."""
    with Client() as client:
        record: dict[str, Any] = batches.BatchState(client.redis, batch_id, client.settings.redis.result_ttl_s).read()
    if not record:
        err.print(f"batch {batch_id}: unknown (never run here, or ended more than redis.result_ttl_s ago)")
        raise typer.Exit(1)
    print(json.dumps({"id": batch_id, **record}, indent=2))


@batch_app.command("cancel")
def cancel(batch_id: Annotated[str, typer.Argument(help="The batch's id.")]) -> None:
    """Cancel a batch: queued lines never run, running ones stop; its runner writes what finished."""
    with Client() as client:
        err.print(batches.cancel_batch(client, batch_id))
