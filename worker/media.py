"""Images of a chat job, decoded and checked in the worker before the engine sees them.

Runs in the Celery pool thread that holds the job, so decoding and fetching never block the
engine's loop. Each image becomes a PIL image in a ``{"type": "image_pil"}`` content part,
which vLLM's own chat renderer places and expands into image tokens.
"""

from __future__ import annotations

import io
import ipaddress
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

from producer import keys
from producer.errors import InvalidJob
from producer.images import check_images, check_pixels, check_url, decode_data_uri, image_field
from producer.protocol import ChatJob
from producer.settings import ImageSettings


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect could point at an address the DNS check never saw.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, f"redirects are not followed (to {newurl})", headers, fp)


_OPENER = urllib.request.build_opener(_NoRedirect)


def _check_addresses(host: str, port: int, field: str) -> None:
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise InvalidJob(field, f"host {host!r} does not resolve: {exc}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            kind = ("loopback" if address.is_loopback else "private" if address.is_private
                    else "link-local" if address.is_link_local else "non-public")  # fmt: skip
            raise InvalidJob(field, f"host {host!r} resolves to {kind} address {address}; image URLs must "
                             "reach public addresses only")


def fetch(url: str, limits: ImageSettings, field: str) -> bytes:
    """Bytes of an allowed http(s) image URL: public addresses only, no redirects, bounded size."""
    check_url(url, limits, field)
    parts = urlsplit(url)
    _check_addresses(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80), field)
    try:
        with _OPENER.open(url, timeout=limits.fetch_timeout_s) as response:
            data = response.read(limits.max_image_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise InvalidJob(field, f"could not fetch the image ({exc}); images.fetch_timeout_s is "
                         f"{limits.fetch_timeout_s}") from None
    if len(data) > limits.max_image_bytes:
        raise InvalidJob(field, f"the image is over images.max_image_bytes ({limits.max_image_bytes})")
    return data


def load_image(data: bytes, limits: ImageSettings, field: str) -> Image.Image:
    check_pixels(data, limits, field)
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")  # decodes every pixel: a truncated file fails here
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidJob(field, f"the image is corrupt ({exc})") from None


BlobReader = Callable[[str], bytes | None]


def read_blob(key: str, limits: ImageSettings, field: str, reader: BlobReader) -> bytes:
    """The bytes of an image the producer stored under ``key``."""
    data = reader(key)
    if data is None:
        raise InvalidJob(field, "the image's blob has expired or was never written (redis.result_ttl_s); "
                         "submit the job again")
    if len(data) > limits.max_image_bytes:
        raise InvalidJob(field, f"the image is {len(data)} bytes; images.max_image_bytes is {limits.max_image_bytes}")
    return data


def image_bytes(url: str, limits: ImageSettings, field: str, reader: BlobReader) -> bytes:
    if (key := keys.blob_key_of(url)) is not None:
        return read_blob(key, limits, field, reader)
    if url.startswith("data:"):
        return decode_data_uri(url, limits, field)
    return fetch(url, limits, field)


def prepare_messages(job: ChatJob, limits: ImageSettings, max_images: int, reader: BlobReader) -> list[dict[str, Any]]:
    """The job's messages for vLLM's renderer, every image decoded, checked and in PIL form."""
    check_images(job, limits, max_images=max_images)
    messages = []
    for i, message in enumerate(job.messages):
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(message.content):
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
                continue
            field = image_field(i, j)
            data = image_bytes(part.image_url.url, limits, field, reader)
            parts.append({"type": "image_pil", "image_pil": load_image(data, limits, field)})
        messages.append({"role": message.role, "content": parts})
    return messages
