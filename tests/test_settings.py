"""Settings: settings.toml, overridden by VQUEUE_* environment variables, another file by VQUEUE_SETTINGS."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from pydantic import AliasChoices, BaseModel, ValidationError

from producer.settings import Settings, settings_file

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


def test_settings_toml_in_the_working_directory_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Values that differ from every class default: they can only have come from the file.
    (tmp_path / "settings.toml").write_text(
        '[redis]\nurl = "redis://:pw@redis.example:6380/2"\n[model]\nserved_name = "from-cwd"\n'
        "[engine]\nmax_model_len = 1234\n[images]\nallowed_url_hosts = [\"images.example\"]\n"
    )
    monkeypatch.chdir(tmp_path)
    s = Settings()
    assert s.redis.url == "redis://:pw@redis.example:6380/2" and s.model.served_name == "from-cwd"
    assert s.engine.max_model_len == 1234 and s.images.allowed_url_hosts == ["images.example"]
    assert s.model.source == Settings.model_fields["model"].default.source  # the rest keeps its defaults


def _field_named(section: type[BaseModel], key: str) -> str:
    """The field of ``section`` that a settings.toml key sets (its name or one of its aliases)."""
    for name, field in section.model_fields.items():
        alias = field.validation_alias
        aliases = set(alias.choices) if isinstance(alias, AliasChoices) else {alias} - {None}
        if key == name or key in aliases:
            return name
    raise AssertionError(f"settings.toml [{section.__name__}] {key} is no setting")


def test_repository_settings_toml_loads_and_every_key_in_it_takes_effect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert settings_file() == Path("settings.toml")
    s = Settings()  # refuses an unknown or invalid key (extra="forbid")
    written = tomllib.loads((ROOT / "settings.toml").read_text())
    assert set(written) <= set(Settings.model_fields), f"unknown sections: {set(written) - set(Settings.model_fields)}"
    for section, values in written.items():
        loaded = getattr(s, section)
        for key, value in values.items():
            assert getattr(loaded, _field_named(type(loaded), key)) == value, f"[{section}] {key}"


def test_missing_settings_file_says_how_to_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VQUEUE_SETTINGS", str(tmp_path / "nope.toml"))
    with pytest.raises(FileNotFoundError, match="VQUEUE_SETTINGS"):
        Settings()


def test_unknown_setting_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "typo.toml"
    path.write_text("[worker]\nmax_inflight = 3\n")
    monkeypatch.setenv("VQUEUE_SETTINGS", str(path))
    with pytest.raises(ValidationError) as info:
        Settings()
    [error] = info.value.errors()
    assert error["loc"] == ("worker", "max_inflight") and error["type"] == "extra_forbidden"
