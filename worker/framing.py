"""Length-prefixed pickle frames between the worker and its engine process.

Both ends are this package's own code over a private ``socketpair`` that nothing else can
reach, so pickle is safe here and carries jobs, decoded PIL images and results as they are.
Celery's broker messages never use it (they are JSON only).
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
import threading
from typing import Any

_HEADER = struct.Struct("!Q")


def encode(obj: Any) -> bytes:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


class SyncChannel:
    """The worker's end: ``send`` from any thread, ``recv`` from one reader thread."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()

    def send(self, obj: Any) -> None:
        frame = encode(obj)
        with self._send_lock:
            self._sock.sendall(frame)

    def recv(self) -> Any:
        """The next object; ``EOFError`` once the other end is gone."""
        (size,) = _HEADER.unpack(self._recv_exactly(_HEADER.size))
        return pickle.loads(self._recv_exactly(size))

    def _recv_exactly(self, size: int) -> bytearray:
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size:
            n = self._sock.recv_into(view[got:])
            if n == 0:
                raise EOFError("the other end closed the channel")
            got += n
        return buf  # pickle reads it as it is: no copy

    def close(self) -> None:
        self._sock.close()


class AsyncChannel:
    """The engine process's end, on its asyncio loop (no threads, so no GIL hand-offs)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    @classmethod
    async def from_socket(cls, sock: socket.socket) -> AsyncChannel:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    async def recv(self) -> Any:
        """The next object; ``EOFError`` once the worker is gone."""
        try:
            (size,) = _HEADER.unpack(await self._reader.readexactly(_HEADER.size))
            return pickle.loads(await self._reader.readexactly(size))
        except asyncio.IncompleteReadError:
            raise EOFError("the worker closed the channel") from None

    def send(self, obj: Any) -> None:
        # Buffered by the transport; the worker reads continuously, so no drain is needed.
        self._writer.write(encode(obj))

    def close(self) -> None:
        self._writer.close()
