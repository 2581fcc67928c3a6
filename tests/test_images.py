"""Chat jobs with images through the real worker and the tiny Qwen2-VL model.

Each outcome is exact: image token counts equal what the model's own HF processor makes, and
each bad image ends with an error naming the field and the limit, with a good job right after.
"""

from __future__ import annotations

import base64
import http.server
import io
import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from producer import ChatJob, ChatMessage, Client, InvalidJob, JobFailed, Sampling, Settings, TextPart
from producer.protocol import ImagePart, ImageURL
from tests.conftest import MODEL
from tests.test_service import assert_good_job_runs, send_raw

GREEDY = Sampling(max_tokens=8, temperature=0)


def png(width: int, height: int, seed: int = 0, solid: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.zeros((height, width, 3), np.uint8) if solid else rng.integers(0, 256, (height, width, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(data)}}


@pytest.fixture(scope="module")
def processor(tiny_model):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model)


def expected_prompt_tokens(processor, messages: list[dict], images: list[bytes]) -> int:
    """What the model's own HF processor makes of the conversation: text plus image tokens."""
    hf_messages = [
        {"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
         [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]}
        for m in messages
    ]  # fmt: skip
    text = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    return len(processor(text=[text], images=pil or None)["input_ids"][0])


@pytest.mark.parametrize(
    "shape",
    ["one image", "two images", "interleaved"],
)
def test_images_reach_the_engine_with_the_right_token_counts(worker, client, processor, shape: str) -> None:
    a, b = png(64, 48, seed=1), png(100, 80, seed=2)
    content = {
        "one image": [image_part(a), {"type": "text", "text": "What is in this picture?"}],
        "two images": [image_part(a), image_part(b), {"type": "text", "text": "Compare them."}],
        "interleaved": [{"type": "text", "text": "First:"}, image_part(a), {"type": "text", "text": "then:"},
                        image_part(b), {"type": "text", "text": "which is brighter?"}],
    }[shape]
    images = [a] if shape == "one image" else [a, b]
    messages = [{"role": "system", "content": "Describe images."}, {"role": "user", "content": content}]
    result = client.result(client.submit(ChatJob(model=MODEL, messages=messages, sampling=GREEDY)), timeout=120)
    text_only = expected_prompt_tokens(processor, [*messages[:1], {"role": "user", "content": "x"}], [])
    expected = expected_prompt_tokens(processor, messages, images)
    assert result.usage.prompt_tokens == expected
    assert expected > text_only + len(images)  # the image tokens are in the count
    assert result.usage.completion_tokens == 8


def _one_image_job(url: str) -> ChatJob:
    """A job built without validation, as a careless producer would; Client.submit checks it again."""
    image = ImagePart.model_construct(type="image_url", image_url=ImageURL.model_construct(url=url, detail=None))
    message = ChatMessage.model_construct(role="user", content=[image, TextPart(text="?")])
    return ChatJob.model_construct(id=uuid.uuid4().hex, model=MODEL, kind="chat", messages=[message],
                                   sampling=GREEDY, created_at=time.time())


FIELD = "messages.0.content.0.image_url.url"
BAD = {
    "bad base64": (data_uri(b"x")[:-4] + "!!!!", "base64 does not decode"),
    "not an image": (data_uri(b"hello, I am text"), "not a readable png, jpeg or webp"),
    "oversize": (data_uri(png(4000, 3300, solid=True)), "images.max_image_pixels is 12845056"),
    "disallowed url": ("http://example.com/cat.png", "not in images.allowed_url_hosts"),
    "unsupported type": (data_uri(b"GIF89a", "image/gif"), "image/gif is not supported"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_image_is_refused_at_submit_and_in_the_worker(worker, client: Client, case: str) -> None:
    url, message = BAD[case]
    job = _one_image_job(url)
    with pytest.raises(InvalidJob) as at_submit:
        client.submit(job)
    assert at_submit.value.field == FIELD and message in str(at_submit.value)
    # A producer that skips the check meets the same refusal in the worker.
    send_raw(client, job.model_dump(mode="json"), job.id)
    with pytest.raises(JobFailed) as in_worker:
        client.result(job.id, timeout=60)
    assert in_worker.value.error_type == "InvalidJob"
    assert in_worker.value.field == FIELD and message in in_worker.value.error
    assert_good_job_runs(client)


def test_truncated_image_fails_alone_in_the_worker(worker, client: Client) -> None:
    data = png(64, 48, seed=3)
    job = _one_image_job(data_uri(data[: len(data) // 2]))  # a valid header, half the pixels
    with pytest.raises(JobFailed) as info:
        client.result(client.submit(job), timeout=60)
    assert info.value.error_type == "InvalidJob" and info.value.field == FIELD and "corrupt" in info.value.error
    assert_good_job_runs(client)


@pytest.fixture
def image_server() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1 that serves a PNG and records every request."""
    hits: list[str] = []
    body = png(32, 32)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://localhost:{server.server_address[1]}/cat.png", hits
    finally:
        server.shutdown()


def test_url_resolving_to_loopback_is_refused_and_never_fetched(worker, settings: Settings, image_server) -> None:
    url, hits = image_server
    # The host is allowed (as the session worker's settings allow it), but it resolves to 127.0.0.1.
    allowing = settings.model_copy(update={"images": settings.images.model_copy(
        update={"allowed_url_hosts": ["localhost"]})})  # fmt: skip
    with Client(allowing) as client:
        with pytest.raises(JobFailed) as info:
            client.result(client.submit(_one_image_job(url)), timeout=60)
        assert info.value.field == FIELD and "resolves to loopback address 127.0.0.1" in info.value.error
        assert hits == []
        assert_good_job_runs(client)


def test_flower_and_logs_never_see_image_bytes(worker, client: Client, flower) -> None:
    data = png(200, 200, seed=5)
    encoded = base64.b64encode(data).decode()
    content = [image_part(data), {"type": "text", "text": "hi"}]
    job = ChatJob(model=MODEL, messages=[{"role": "user", "content": content}], sampling=GREEDY)
    client.result(client.submit(job), timeout=60)
    deadline = time.monotonic() + 30
    while (task := flower.get("/api/tasks").get(job.id)) is None or task.get("state") != "SUCCESS":
        assert time.monotonic() < deadline, f"Flower never showed {job.id} succeeded: {task}"
        time.sleep(0.5)
    info = flower.get(f"/api/task/info/{job.id}")
    for shown in (task["args"], task["kwargs"], info["args"], info["kwargs"]):
        assert encoded[1000:1100] not in shown and "base64" not in shown
    assert "<image>" in task["args"] and "hi" in task["args"] and len(task["args"]) < 300
    assert encoded[1000:1100] not in worker.log_text() and "data:image/png" not in worker.log_text()


def test_images_travel_as_blobs_not_inside_the_queued_message(client: Client, redis_server) -> None:
    import redis as redis_py

    from producer import keys

    data = png(300, 300, seed=9)
    job = ChatJob(model="nobody-serves-blobs", messages=[{"role": "user", "content": [image_part(data)]}])
    client.submit(job)
    r = redis_py.Redis.from_url(redis_server.url)
    queued = keys.priority_list(keys.queue_for("nobody-serves-blobs"), client.settings.queue.default_priority)
    [message] = r.lrange(queued, 0, -1)
    assert len(message) < 4000 < len(data)  # the 200 kB image is not in the Celery message
    blob = keys.blob_key(job.id, 0)
    assert r.get(blob) == data and 0 < r.ttl(blob) <= client.settings.redis.result_ttl_s
    r.delete(queued, blob)


def test_blob_is_deleted_when_its_job_ends(worker, client: Client, redis_server) -> None:
    import redis as redis_py

    from producer import keys

    job = ChatJob(model=MODEL, messages=[{"role": "user", "content": [image_part(png(64, 48))]}], sampling=GREEDY)
    client.result(client.submit(job), timeout=60)
    assert redis_py.Redis.from_url(redis_server.url).exists(keys.blob_key(job.id, 0)) == 0
