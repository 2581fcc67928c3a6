"""worker.result_backend: the worker's result writes, against a real redis-server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from devtools.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent

# Runs in a process of its own: worker.celery_app reads its settings when imported.
STORE = """
import json
from worker.celery_app import app
b = app.backend
key = b.get_key_for_task
listener = b.client.pubsub()
listener.subscribe(key("done"))
listener.get_message(timeout=5)
b.store_result("done", {"text": "hi"}, "SUCCESS")
heard = listener.get_message(timeout=5)
b.store_result("done", None, "REVOKED")      # a late write for a job that succeeded
b.mark_as_failure("done", ValueError("late"))
b.store_result("cancelled", None, "REVOKED")
b.mark_as_failure("failed", ValueError("boom"))
b.store_result("failed", {"text": "retry won"}, "SUCCESS")
print(json.dumps({
    "heard": json.loads(heard["data"])["status"] if heard else None,
    "done": b.get_task_meta("done")["status"], "done_result": b.get_task_meta("done")["result"],
    "cancelled": b.get_task_meta("cancelled")["status"], "failed": b.get_task_meta("failed")["status"],
    "ttls": [b.client.ttl(key(j)) for j in ("done", "cancelled", "failed")],
}))
"""


def test_a_result_is_stored_published_and_a_success_is_never_overwritten(tmp_path: Path) -> None:
    # Bugs it catches: the one-script store (worker.result_backend._STORE) overwriting a stored
    # SUCCESS with a later REVOKED or FAILURE (a job delivered again, a late cancel), not
    # publishing (producers wait on the result's channel), or storing without a TTL.
    with RedisServer(tmp_path) as server:
        env = {**os.environ, "VQUEUE_REDIS__URL": server.url, "VQUEUE_REDIS__RESULT_TTL_S": "3600"}
        out = subprocess.run([sys.executable, "-c", STORE], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.splitlines()[-1])
    assert seen["heard"] == "SUCCESS"
    assert seen["done"] == "SUCCESS" and seen["done_result"] == {"text": "hi"}
    assert seen["cancelled"] == "REVOKED"
    assert seen["failed"] == "SUCCESS"  # a failure may be replaced by a later success
    assert all(0 < ttl <= 3600 for ttl in seen["ttls"]), seen["ttls"]
