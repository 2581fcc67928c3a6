"""Takes the engine's processes down when the worker is killed outright.

vLLM's engine processes outlive a SIGKILLed parent (they keep the GPU memory and wait
forever). The worker starts this watcher as a small subprocess; it notes the worker's
descendants every second and, once the worker is gone, kills the ones it saw. A normal
shutdown stops the watcher first.

    python -m worker.reaper WORKER_PID
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import psutil

POLL_S = 1.0


def watch(worker_pid: int) -> None:
    me = os.getpid()
    try:
        worker = psutil.Process(worker_pid)
    except psutil.NoSuchProcess:
        return
    seen: dict[int, psutil.Process] = {}
    while worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE:
        try:
            for child in worker.children(recursive=True):
                if child.pid != me:
                    seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            break
        time.sleep(POLL_S)
    # psutil's is_running() checks the creation time too, so a reused pid is never killed.
    alive = [p for p in seen.values() if p.is_running()]
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    if alive:
        print(f"vqueue reaper: worker {worker_pid} is gone; killed {len(alive)} engine processes", file=sys.stderr)


def start_reaper() -> subprocess.Popen:
    """Start watching this process; terminate the returned process on a clean shutdown."""
    return subprocess.Popen([sys.executable, "-m", "worker.reaper", str(os.getpid())], start_new_session=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
