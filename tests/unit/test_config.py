"""Settings: environment beats the TOML file beats defaults; secrets never show; docs complete."""

from __future__ import annotations

from pathlib import Path

import pytest

from multimail.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_toml_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TOML file sets values; the fixed MULTIMAIL_* environment names override it."""
    for name in Settings.model_fields:
        monkeypatch.delenv(f"MULTIMAIL_{name.upper()}", raising=False)
    config = tmp_path / "multimail.toml"
    config.write_text('[multimail]\nhttp_port = 9001\ndomain = "mail.acme.example"\n')
    monkeypatch.setenv("MULTIMAIL_CONFIG", str(config))
    monkeypatch.setenv("MULTIMAIL_HTTP_PORT", "9002")
    settings = load_settings()
    assert settings.http_port == 9002
    assert settings.domain == "mail.acme.example"
    assert settings.base_url == "http://127.0.0.1:9002"


def test_postgres_urls_are_normalised_to_psycopg3() -> None:
    """postgresql:// and postgres:// both select the psycopg 3 driver."""
    assert Settings(database_url="postgresql://u@h/db").database_url == (
        "postgresql+psycopg://u@h/db"
    )
    assert Settings(database_url="postgres://u@h/db").database_url == "postgresql+psycopg://u@h/db"


def test_relay_password_never_in_repr() -> None:
    """Secrets are SecretStr: a log line with the settings shows no password."""
    settings = Settings(smtp_url="smtp://user:hunter2@relay.example:587?starttls=true")
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings)


def test_readme_documents_every_setting() -> None:
    """Each setting's environment variable appears in the README's configuration table."""
    readme = (ROOT / "README.md").read_text()
    missing = [n for n in Settings.model_fields if f"`MULTIMAIL_{n.upper()}`" not in readme]
    assert not missing, f"README lacks: {missing}"


def test_the_server_domain_is_kept_in_its_ascii_form() -> None:
    """A U-label MULTIMAIL_DOMAIN (bücher.test) was compared as written with the A-labels
    addresses are normalised to, so no mailbox could be made on the server's own domain."""
    assert Settings(domain="Bücher.Test.").domain == "xn--bcher-kva.test"
    assert Settings(domain="MM.test").domain == "mm.test"
    with pytest.raises(ValueError, match="MULTIMAIL_DOMAIN"):
        Settings(domain="bad domain")
