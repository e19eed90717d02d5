from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.core.settings import SettingsError, load_settings
from app.core.settings_doc import ROOT, env_example, readme_with_table


def test_readme_table_and_env_example_match_the_settings() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme_with_table(readme) == readme, "run `python -m app.core.settings_doc --write`"
    assert (ROOT / ".env.example").read_text() == env_example()


def test_invalid_setting_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPACEBELL_SMTP_TLS", "sometimes")
    monkeypatch.setenv("SPACEBELL_WEBHOOK_ALLOWED_NETWORKS", "10.0.0.0/8,not-a-cidr")
    with pytest.raises(SettingsError) as err:
        load_settings(_env_file=None)
    assert "SPACEBELL_SMTP_TLS" in str(err.value)
    assert "SPACEBELL_WEBHOOK_ALLOWED_NETWORKS" in str(err.value)


def test_allowed_networks_parse_from_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPACEBELL_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8, ::1/128")
    settings = load_settings(_env_file=None)
    assert [str(n) for n in settings.allowed_networks] == ["127.0.0.0/8", "::1/128"]


def test_cli_refuses_to_start_with_a_bad_setting(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "db", "upgrade"],
        env={"SPACEBELL_DATABASE_URL": "mysql://nope", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "SPACEBELL_DATABASE_URL" in result.stderr
