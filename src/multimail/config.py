"""The one settings object.

Sources, later wins: defaults < TOML file (``MULTIMAIL_CONFIG`` or ``<data_dir>/multimail.toml``)
< environment variables ``MULTIMAIL_<NAME>``. The names of SPEC §11 are fixed because
operators' scripts use them. Secrets are ``SecretStr`` so they never show in ``repr`` or logs.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from multimail.cpus import usable_cpus
from multimail.domain.addresses import AddressError, normalize_address, normalize_domain

Role = Literal["all", "api", "smtp", "worker"]


def default_compose_processes() -> int:
    """``compose_processes`` unless set: one child when the process may use a second CPU.

    Composing and DKIM-signing is about 40 % of a delivery's CPU and, in the worker, holds
    the interpreter lock the worker's own work needs; a child puts it on another core. On a
    single CPU a child would only take turns with the worker, at the cost of its start.
    A cgroup CPU quota caps the count and a fractional one counts up (1.5 CPUs -> a child),
    since the child's composing can spend the half CPU the lock-bound worker cannot.
    """
    return 1 if usable_cpus() > 1 else 0


class Settings(BaseSettings):
    """Every MultiMail setting. Each field's description is the documentation (see README)."""

    model_config = SettingsConfigDict(env_prefix="MULTIMAIL_", extra="ignore")

    data_dir: Path = Field(
        Path(".multimail"), description="Where the SQLite file, keys and spool live."
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL; unset = SQLite in the data dir. PostgreSQL: "
        "postgresql+psycopg://user@host/db (postgresql:// is accepted too).",
    )
    http_host: str = Field("127.0.0.1", description="HTTP API, dashboard and /mcp bind address.")
    http_port: int = Field(8000, description="HTTP port.")
    smtp_host: str = Field("127.0.0.1", description="Inbound SMTP bind address.")
    smtp_port: int = Field(2525, description="Inbound SMTP port.")
    smtp_tls_cert: Path | None = Field(
        None, description="PEM certificate (chain) for inbound STARTTLS; unset = no STARTTLS."
    )
    smtp_tls_key: Path | None = Field(
        None, description="PEM private key for smtp_tls_cert; unset = the key is in the cert file."
    )
    smtp_url: SecretStr | None = Field(
        None,
        description="Outbound relay, e.g. smtp://user:pass@host:587?starttls=true; "
        "unset = deliver directly to recipients' MX hosts.",
    )
    domain: str = Field(
        "localhost", description="The server's own mail domain (needs no verification)."
    )
    postmaster_email: str | None = Field(
        None,
        description="Where mail to postmaster@<server domain> (and the bare <postmaster>) "
        "goes when no mailbox has that address; unset = kept and audited, not forwarded.",
    )
    dns_resolver: str | None = Field(
        None, description="DNS resolver as host:port; unset = system resolver."
    )
    mx_port: int = Field(
        25, description="Port used when delivering to MX hosts (tests point it at a local server)."
    )
    public_url: str | None = Field(
        None,
        description="Base URL of links in emails (approve, unsubscribe); "
        "unset = http://<http_host>:<http_port>.",
    )
    allow_private_webhooks: bool = Field(
        False,
        description="Allow webhook targets on loopback/private networks "
        "(local development and tests only).",
    )
    allow_http_webhooks: bool = Field(
        False, description="Allow http:// webhook URLs (local development only)."
    )
    max_request_bytes: int = Field(
        40 * 1024 * 1024, description="Largest accepted HTTP request body."
    )
    max_message_bytes: int = Field(
        25 * 1024 * 1024, description="Largest message, inbound or outbound."
    )
    max_recipients: int = Field(50, description="Recipients per message.")
    rate_limit_per_minute: int = Field(
        600, description="Requests per API key per minute (token bucket)."
    )
    rate_limit_burst: int = Field(120, description="Bucket size of the per-key request rate limit.")
    rate_limit_backend: Literal["auto", "memory", "database"] = Field(
        "auto",
        description="Where request rate-limit buckets live: database (shared by every "
        "process, survives restarts), memory (this process only), auto = database.",
    )
    role: Role = Field("all", description="What `serve` runs: all, api, smtp or worker.")
    delivery_batch_size: int = Field(
        64,
        ge=1,
        le=500,
        description="Messages a delivery worker claims, hands over and records per batch "
        "(two commits per batch); larger batches deliver faster and hold the database's "
        "write lock longer at each commit.",
    )
    compose_processes: int = Field(
        default_factory=default_compose_processes,
        ge=0,
        le=64,
        description="Child processes that compose and DKIM-sign outbound mail for each "
        "delivery worker, so signing uses cores beyond the worker's own; 0 = compose in the "
        "worker. Default: 1 when this process may run on two or more CPUs (its affinity "
        "mask capped by a cgroup CPU quota, rounded up), else 0.",
    )
    secret_key: SecretStr | None = Field(
        None,
        description=(
            "Signs one-click links and sessions; unset = generated once and kept in the "
            "database, so every node shares it."
        ),
    )
    log_level: str = Field("info", description="Log level.")
    audit_checkpoint_seconds: int = Field(
        300, description="How often the worker signs a checkpoint of the audit log's head."
    )
    approval_sweep_seconds: int = Field(
        60, description="How often pending approvals are checked for reminders and expiry."
    )
    domain_recheck_seconds: int = Field(
        21600,
        ge=60,
        description="How often verified sending domains' DNS records are checked again; a "
        "domain whose verification or DKIM record is gone goes back to pending.",
    )

    @field_validator("database_url")
    @classmethod
    def _normalise_db_url(cls, value: str | None) -> str | None:
        if value and value.startswith(("postgresql://", "postgres://")):
            return "postgresql+psycopg://" + value.split("://", 1)[1]
        return value

    @field_validator("domain")
    @classmethod
    def _normalise_domain(cls, value: str) -> str:
        # Stored and compared everywhere in its ASCII form (RFC 5890 A-labels, lower case):
        # a U-label setting (bücher.test) made every address on it "not owned".
        try:
            return normalize_domain(value)
        except AddressError as exc:
            raise ValueError(f"MULTIMAIL_DOMAIN: {exc}") from None

    @field_validator("postmaster_email")
    @classmethod
    def _check_postmaster_email(cls, value: str | None) -> str | None:
        # An empty value in an env file means "not set", as for the other optional settings.
        if value is None or not value.strip():
            return None
        try:
            return normalize_address(value)
        except AddressError as exc:
            raise ValueError(f"MULTIMAIL_POSTMASTER_EMAIL: {exc}") from None

    @model_validator(mode="after")
    def _postmaster_is_not_itself(self) -> Settings:
        # Forwarding postmaster mail to postmaster@<our domain> would hand each forward
        # straight back to us as new postmaster mail: a loop only the hourly cap would stop.
        if self.postmaster_email is not None:
            local, _, domain = self.postmaster_email.rpartition("@")
            if local == "postmaster" and domain == self.domain:
                raise ValueError(
                    "MULTIMAIL_POSTMASTER_EMAIL must be a person's address, not "
                    f"postmaster@{domain} itself: the forwarded mail would come back to it"
                )
        return self

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.http_host}:{self.http_port}").rstrip("/")

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "multimail.db"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.sqlite_path}"

    @property
    def is_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")


def _toml_values(path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        data = tomllib.load(handle)
    section = data.get("multimail", data)
    return {str(k): v for k, v in section.items()}


def load_settings(**overrides: Any) -> Settings:
    """Defaults, then the TOML file, then the environment, then explicit overrides."""
    env_data_dir = os.environ.get("MULTIMAIL_DATA_DIR")
    config_path = os.environ.get("MULTIMAIL_CONFIG")
    toml: dict[str, Any] = {}
    candidate = (
        Path(config_path)
        if config_path
        else Path(env_data_dir or overrides.get("data_dir") or ".multimail") / "multimail.toml"
    )
    if candidate.is_file():
        toml = _toml_values(candidate)
    env_names = {
        name for name in Settings.model_fields if f"MULTIMAIL_{name.upper()}" in os.environ
    }
    # The environment must beat the file: drop file values the environment also sets.
    init = {k: v for k, v in toml.items() if k not in env_names}
    init.update(overrides)
    return Settings(**init)
