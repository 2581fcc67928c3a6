"""The benchmark workloads, generated the same way for every mode from seeds.

A: text jobs, random token-id prompts, fixed output length (ignore_eos), all at once.
B: chat jobs with one random-pixel image each, fixed output length, all at once.
C: text jobs one at a time (per-job latency at idle).
I: intake, a burst of text jobs of one output token each: how fast jobs get from Redis into the
   engine (``intake_jobs_per_s``, from the jobs' start times), with as little engine work as can be.
Every timed run and warm-up draws fresh prompts and images (prefix caching would otherwise
measure the cache).
"""

from __future__ import annotations

import base64
import io
import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from producer import ChatJob, CompletionJob, Sampling

TEXT_VOCAB = 151643  # BPE ids; the special ids above stay out of random prompts


@dataclass(frozen=True)
class Workload:
    name: str
    jobs: int
    prompt_tokens: int = 0  # A and C
    image_size: int = 0  # B
    output_tokens: int = 128
    concurrent: bool = True
    temperature: float = 0.8

    def describe(self) -> dict:
        return asdict(self)


PRESETS = {
    # The sizes, for a GPU.
    "gpu": {"A": Workload("A", 1000, prompt_tokens=256, output_tokens=256),
            "B": Workload("B", 200, image_size=448, output_tokens=128),
            "C": Workload("C", 100, prompt_tokens=256, output_tokens=32, concurrent=False),
            "I": Workload("I", 1000, prompt_tokens=16, output_tokens=1)},
    # The tiny model on a 2-core CPU: same shapes, scaled to finish in minutes; greedy, since
    # random sampling over a 151,936-token vocabulary is the CPU's bottleneck, not the queue.
    "cpu": {"A": Workload("A", 256, prompt_tokens=256, output_tokens=64, temperature=0.0),
            "B": Workload("B", 64, image_size=448, output_tokens=32, temperature=0.0),
            "C": Workload("C", 100, prompt_tokens=64, output_tokens=16, concurrent=False, temperature=0.0),
            "I": Workload("I", 256, prompt_tokens=16, output_tokens=1, temperature=0.0)},
}  # fmt: skip


def sampling(w: Workload) -> Sampling:
    """Every field explicit, so that bare, queue and serve sample identically whatever the
    model's generation_config.json says (vllm serve would apply it to unset fields)."""
    return Sampling(max_tokens=w.output_tokens, temperature=w.temperature, top_p=1.0, top_k=0, min_p=0.0,
                    repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, ignore_eos=True)


def token_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(TEXT_VOCAB) for _ in range(length)] for _ in range(n)]


def png_data_uri(size: int, rng: np.random.Generator) -> str:
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def build_jobs(w: Workload, model: str, seed: int, n: int | None = None) -> list[CompletionJob | ChatJob]:
    n = w.jobs if n is None else n
    s = sampling(w)
    if w.image_size:
        rng = np.random.default_rng(seed)
        return [ChatJob(model=model, sampling=s, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_data_uri(w.image_size, rng)}},
            {"type": "text", "text": f"Request {seed}-{i}: describe this picture in detail."}]}])
            for i in range(n)]  # fmt: skip
    return [CompletionJob(model=model, prompt=p, sampling=s) for p in token_prompts(n, w.prompt_tokens, seed)]
