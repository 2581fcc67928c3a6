"""The benchmark's mode settings and the engine's throughput defaults (no engine started)."""

from __future__ import annotations

import argparse

from bench.run import mode_env, ratios, serve_command, settings_for
from producer.settings import Settings
from worker.engine_process import cudagraph_capture_size, engine_kwargs


def gpu_args(share: float | None = None) -> argparse.Namespace:
    return argparse.Namespace(model="/m", preset="gpu", load_format="dummy", engine_share=share)


def test_a_variants_settings_win_over_the_preset_and_the_memory_share() -> None:
    # Given the GPU preset (max_in_flight 1024) and an engine memory share
    env = mode_env(gpu_args(0.29), variant="x2")
    # Then the variant's max_in_flight wins, and every engine gets the share, not the preset's 0.85
    assert env["VQUEUE_WORKER__MAX_IN_FLIGHT"] == "512"
    assert env["VQUEUE_ENGINE__GPU_MEMORY_UTILIZATION"] == "0.29"
    # And "defaults" leaves the preset out altogether
    assert "VQUEUE_ENGINE__MAX_NUM_SEQS" not in mode_env(gpu_args(), variant="defaults")


def test_cuda_graphs_are_captured_up_to_the_batch_unless_the_operator_chose() -> None:
    assert [cudagraph_capture_size(n) for n in (1, 64, 256, 257, 1000, 1024)] == [8, 64, 256, 272, 1008, 1024]
    s = Settings(engine={"max_num_seqs": 1024})
    assert engine_kwargs(s, "/m")["compilation_config"] == {"max_cudagraph_capture_size": 1024}
    chosen = Settings(engine={"extra_args": {"compilation_config": {"mode": 0}}})
    assert engine_kwargs(chosen, "/m")["compilation_config"] == {"mode": 0}
    assert "compilation_config" not in engine_kwargs(Settings(engine={"enforce_eager": True}), "/m")


def test_serve_gets_the_workers_engine_arguments_as_flags() -> None:
    cmd = serve_command(settings_for(mode_env(gpu_args())), 8000)
    assert cmd[cmd.index("--compilation-config") + 1] == '{"max_cudagraph_capture_size": 1024}'
    assert cmd[cmd.index("--max-num-seqs") + 1] == "1024"
    assert "--enforce-eager" not in cmd and "--no-enforce-eager" not in cmd


def test_ratios_are_of_medians_and_defaults_compare_with_defaults_only() -> None:
    def mode(jobs_per_s: float, tok: float) -> dict:
        return {"jobs_per_s": {"median": jobs_per_s}, "output_tokens_per_s": {"median": tok}}

    summary = {"bare": mode(10, 100), "queue": mode(9, 90), "serve-defaults": mode(5, 50),
               "queue-defaults": mode(8, 80)}  # fmt: skip
    assert ratios(summary, "A") == {"queue/bare": 0.9, "queue-defaults/serve-defaults": 1.6}


def test_a_variant_is_compared_with_its_own_mode() -> None:
    def mode(jobs_per_s: float) -> dict:
        return {"jobs_per_s": {"median": jobs_per_s}, "output_tokens_per_s": {"median": jobs_per_s * 10}}

    summary = {"queue": mode(10), "queue-deadline": mode(9.5)}
    assert ratios(summary, "A") == {"queue-deadline/queue": 0.95}
