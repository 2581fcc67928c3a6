"""Settings: settings.toml, overridden by VQUEUE_* environment variables, another file by VQUEUE_SETTINGS."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from producer.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "other.toml"
    path.write_text('[model]\nsource = "/models/a"\nserved_name = "a"\n[engine]\nmax_model_len = 2048\n')
    monkeypatch.setenv("VQUEUE_SETTINGS", str(path))
    return path


def test_settings_file_named_by_env_is_read(toml: Path) -> None:
    s = Settings()
    assert (s.model.source, s.model.served_name, s.engine.max_model_len) == ("/models/a", "a", 2048)


def test_env_overrides_settings_toml_field_by_field(toml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VQUEUE_MODEL__SOURCE", "/models/b")
    monkeypatch.setenv("VQUEUE_WORKER__MAX_IN_FLIGHT", "7")
    s = Settings()
    assert s.model.source == "/models/b"
    assert s.model.served_name == "a"  # the rest of the section still comes from the file
    assert s.worker.max_in_flight == 7


def test_repository_settings_toml_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    s = Settings()
    assert s.model.served_name == "Qwen2-VL-2B-Instruct"
    assert s.redis.url.startswith("redis://")


def test_missing_settings_file_says_how_to_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VQUEUE_SETTINGS", str(tmp_path / "nope.toml"))
    with pytest.raises(FileNotFoundError, match="VQUEUE_SETTINGS"):
        Settings()


def test_unknown_setting_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "typo.toml"
    path.write_text("[worker]\nmax_inflight = 3\n")
    monkeypatch.setenv("VQUEUE_SETTINGS", str(path))
    with pytest.raises(ValidationError, match="max_inflight"):
        Settings()
