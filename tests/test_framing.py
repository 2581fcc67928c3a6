"""The worker <-> engine process channel: frames of any size, in order, and EOF when a side goes."""

from __future__ import annotations

import asyncio
import socket

import pytest

from producer import CompletionJob
from worker.framing import AsyncChannel, SyncChannel


def test_frames_round_trip_in_order_and_eof_is_reported() -> None:
    ours, theirs = socket.socketpair()
    sync = SyncChannel(ours)
    job = CompletionJob(model="m", prompt="x")
    big = b"\x00" * (3 << 20)  # bigger than any socket buffer: sent and read in pieces

    async def engine_side() -> list:
        channel = await AsyncChannel.from_socket(theirs)
        got = [await channel.recv() for _ in range(3)]
        channel.send(("done", 7, got[1]))
        channel.close()
        return got

    async def both() -> list:
        sender = asyncio.get_running_loop().run_in_executor(None, lambda: [sync.send(m) for m in
                                                                            ("start", job, big)])
        got = await engine_side()
        await sender
        return got

    assert asyncio.run(both()) == ["start", job, big]
    assert sync.recv() == ("done", 7, job)
    with pytest.raises(EOFError):
        sync.recv()
    sync.close()
