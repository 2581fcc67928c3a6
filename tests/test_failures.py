"""The one failure path (``worker.failures``) in the Celery worker's own process."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_classifying_vqueues_own_errors_never_imports_vllm_into_the_worker() -> None:
    """The Celery worker's process holds no vLLM (the engine has a process of its own). Its tasks
    classify what the engine process sent back, already typed: importing vLLM there for that took
    seconds of one CPU on the first failed job (14 s seen in CI, right after an engine died)."""
    code = (
        "import sys\n"
        "from producer.errors import EngineDead, InvalidJob\n"
        "from worker import failures\n"
        "dead, bad = EngineDead('gone'), InvalidJob('prompt', 'empty')\n"
        "assert failures.classify(dead) is dead and failures.classify(bad) is bad\n"
        "print(sorted(m for m in ('vllm', 'torch') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
