"""Image limits for chat jobs, checked at submit (here) and again in the worker.

Every refusal is an ``InvalidJob`` naming the limit (``images.max_image_bytes``, ...).
Only image headers are read here (Pillow reads the size without decoding pixels); the
worker decodes each image fully before the engine sees it.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from urllib.parse import urlsplit

from PIL import Image, UnidentifiedImageError

from producer import keys
from producer.errors import InvalidJob
from producer.protocol import ChatJob
from producer.settings import ImageSettings

#: Formats a data URI may carry (the OpenAI API's set, less gif).
IMAGE_MIME_TYPES = frozenset({"image/png", "image/jpeg", "image/jpg", "image/webp"})
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})  # as Pillow names them
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)(?:;[^,;]*)*?;base64,(?P<data>.*)$", re.DOTALL)


def decode_data_uri(url: str, limits: ImageSettings, field: str) -> bytes:
    """The image bytes of a base64 ``data:`` URI, within ``images.max_image_bytes``."""
    match = _DATA_URI.match(url)
    if not match:
        raise InvalidJob(field, "a data URI must look like data:image/png;base64,<base64 data>")
    mime = match["mime"].lower()
    if mime not in IMAGE_MIME_TYPES:
        raise InvalidJob(field, f"{mime} is not supported; send one of {', '.join(sorted(IMAGE_MIME_TYPES))}")
    encoded = match["data"]
    # 4 base64 characters carry 3 bytes: refuse before decoding anything huge.
    if len(encoded) * 3 // 4 > limits.max_image_bytes + 3:
        raise InvalidJob(field, f"the image is about {len(encoded) * 3 // 4} bytes; "
                         f"images.max_image_bytes is {limits.max_image_bytes}")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidJob(field, "the data URI's base64 does not decode") from None
    if len(data) > limits.max_image_bytes:
        raise InvalidJob(field, f"the image is {len(data)} bytes; images.max_image_bytes is {limits.max_image_bytes}")
    return data


def check_pixels(data: bytes, limits: ImageSettings, field: str) -> tuple[int, int]:
    """The image's (width, height) from its header, within ``images.max_image_pixels``."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            kind = img.format
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise InvalidJob(field, "the data is not a readable png, jpeg or webp image") from None
    if kind not in IMAGE_FORMATS:
        raise InvalidJob(field, f"{kind} images are not supported; send png, jpeg or webp")
    if width * height > limits.max_image_pixels:
        raise InvalidJob(field, f"the image is {width}x{height} = {width * height} pixels; "
                         f"images.max_image_pixels is {limits.max_image_pixels}")
    return width, height


def check_url(url: str, limits: ImageSettings, field: str) -> None:
    """An http(s) image URL must name a host in ``images.allowed_url_hosts``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidJob(field, "an image URL must be a data: URI or an http(s) URL")
    if parts.hostname.lower() not in {h.lower() for h in limits.allowed_url_hosts}:
        allowed = ", ".join(limits.allowed_url_hosts) or "none"
        raise InvalidJob(field, f"host {parts.hostname!r} is not in images.allowed_url_hosts (allowed: {allowed}); "
                         "send the image as a data: URI instead")


def image_field(message: int, part: int) -> str:
    """The field path errors name for an image, e.g. ``messages.1.content.0.image_url.url``."""
    return f"messages.{message}.content.{part}.image_url.url"


def image_fields(job: ChatJob) -> list[tuple[int, int, str]]:
    """(message index, part index, url) of every image in the job."""
    return [(i, j, part.image_url.url) for i, message in enumerate(job.messages) if not isinstance(message.content, str)
            for j, part in enumerate(message.content) if part.type == "image_url"]  # fmt: skip


def check_images(job: ChatJob, limits: ImageSettings, max_images: int | None = None) -> None:
    """The limits on a job's images as a whole: how many, and the size of its messages.
    Each image is checked where it is decoded (once): ``move_images_to_blobs`` at submit,
    ``worker.media`` in the worker."""
    images = image_fields(job)
    most = limits.max_images_per_job if max_images is None else min(max_images, limits.max_images_per_job)
    if len(images) > most:
        raise InvalidJob("messages", f"the job has {len(images)} images; at most {most} are allowed "
                         "(images.max_images_per_job, engine.limit_mm_per_prompt)")
    size = len(job.model_dump_json(include={"messages"}))
    if size > limits.max_message_bytes:
        raise InvalidJob("messages", f"the messages are {size} bytes of JSON; "
                         f"images.max_message_bytes is {limits.max_message_bytes}")


def move_images_to_blobs(job: ChatJob, payload: dict, limits: ImageSettings) -> list[tuple[str, bytes]]:
    """Check every image (decoding each data: URI once), replace each data: URI in ``payload``
    (the job's JSON form) by a ``vqueue-blob:`` reference and return the (key, bytes) to store:
    megabytes of base64 stay out of the Celery message."""
    check_images(job, limits)
    blobs = []
    for n, (i, j, url) in enumerate(image_fields(job)):
        field = image_field(i, j)
        if not url.startswith("data:"):
            check_url(url, limits, field)
            continue
        key = keys.blob_key(job.id, n)
        data = decode_data_uri(url, limits, field)
        check_pixels(data, limits, field)
        blobs.append((key, data))
        payload["messages"][i]["content"][j]["image_url"]["url"] = keys.blob_url(key)
    return blobs
