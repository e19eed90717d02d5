"""Every setting of the service, read from SPACEBELL_* variables and an optional .env file."""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class SmtpTls(StrEnum):
    none = "none"
    starttls = "starttls"
    implicit = "implicit"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SPACEBELL_", env_file=".env", env_ignore_empty=True, extra="ignore"
    )

    database_url: str = Field(
        "sqlite+aiosqlite:///./spacebell.db",
        description="SQLAlchemy async URL: sqlite+aiosqlite:///path or postgresql+asyncpg://user@host/db.",
    )
    database_pool_size: int = Field(
        10, ge=1, le=200,
        description="Connections kept open per process, and as many more at peak (on SQLite, each is a thread).",
    )
    migrate_on_start: bool = Field(True, description="Apply Alembic migrations when the server starts.")
    secret_key: str | None = Field(
        None,
        min_length=32,
        description="Signs unsubscribe and confirmation links. Generated once and kept in the database when unset.",
    )

    api_host: str = Field("127.0.0.1", description="Address the HTTP API binds to.")
    api_port: int = Field(8000, ge=1, le=65535, description="Port the HTTP API binds to.")
    public_base_url: str = Field(
        "http://127.0.0.1:8000", description="Public URL of this service, used for links in mail."
    )
    max_body_bytes: int = Field(65536, ge=1024, description="Largest request body the API accepts.")
    max_subscriptions_per_account: int = Field(10000, ge=1, description="Subscriptions one account may hold.")
    max_webhook_endpoints_per_account: int = Field(100, ge=1, description="Webhook endpoints one account may hold.")
    api_rate_limit_per_minute: int = Field(600, ge=1, description="Requests per API key per minute before 429.")
    api_key_cache_seconds: float = Field(
        10.0, ge=0, le=3600,
        description="How long a process trusts an API key it has checked; a key revoked elsewhere stops working "
        "after at most this long (0 = check the database on every request).",
    )

    x_api_base_url: str = Field("https://api.x.com", description="Base URL of X's API (or of the simulator).")
    x_bearer_token: str | None = Field(None, description="App-only bearer token for X's API.")
    x_requests_per_window: int = Field(300, ge=1, description="Requests per endpoint per rate-limit window.")
    x_window_seconds: int = Field(900, ge=1, description="Length of X's rate-limit window.")
    x_by_creator_min_interval_seconds: float = Field(
        1.0, ge=0, description="Minimum spacing of /2/spaces/by/creator_ids calls (X: 1 per second per app)."
    )
    x_daily_spend_cap_usd: float = Field(
        20.0, ge=0, description="Estimated pay-per-use spend per UTC day at which polling stops (0 = no cap)."
    )
    x_space_read_cost_usd: float = Field(0.005, ge=0, description="Price of one Space read.")
    x_user_read_cost_usd: float = Field(0.010, ge=0, description="Price of one user read.")
    x_gone_means_canceled: bool = Field(
        True,
        description="Treat a known scheduled Space that disappears or answers not-found as canceled.",
    )

    keyword_match: Literal["phrase", "substring"] = Field(
        "phrase",
        description="phrase: a keyword matches whole words of a title; substring: anywhere (X's search, assumed).",
    )
    discovery_interval_seconds: float = Field(30.0, gt=0, description="Seconds between discovery cycles.")
    leader_lease_seconds: float = Field(60.0, gt=0, description="How long a discovery leader lease lasts.")

    dispatcher_batch_size: int = Field(200, ge=1, le=10000, description="Outbox rows claimed per batch.")
    dispatcher_concurrency: int = Field(64, ge=1, le=4096, description="Webhook requests in flight per worker.")
    dispatcher_email_concurrency: int = Field(4, ge=1, le=256, description="SMTP connections per worker.")
    dispatcher_lease_seconds: float = Field(60.0, gt=0, description="Lease on a claimed outbox row.")
    dispatcher_lookahead_seconds: float = Field(
        2.0, ge=0, description="Claim rows this early and fire them on in-process timers."
    )
    dispatcher_idle_seconds: float = Field(5.0, gt=0, description="Longest sleep when nothing is due.")
    dispatcher_listen: bool = Field(
        True,
        description="PostgreSQL: whoever makes outbox rows due sends a NOTIFY and workers LISTEN, so a worker in "
        "another process starts at once (false: at its next poll, within dispatcher_idle_seconds).",
    )
    webhook_timeout_seconds: float = Field(15.0, gt=0, description="Timeout of one webhook request.")
    webhook_disable_after_hours: float = Field(
        120.0, gt=0, description="Disable an endpoint that has failed without success for this long."
    )
    webhook_allow_http: bool = Field(False, description="Allow plain http:// webhook URLs.")
    webhook_allowed_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated CIDRs exempt from the webhook egress policy."
    )
    webhook_max_response_bytes: int = Field(4096, ge=0, description="Bytes of a response body read and logged.")
    max_attempts: int = Field(12, ge=1, le=100, description="Delivery attempts before a notification fails.")

    smtp_host: str = Field("127.0.0.1", description="SMTP server host.")
    smtp_port: int = Field(25, ge=1, le=65535, description="SMTP server port.")
    smtp_username: str | None = Field(None, description="SMTP user name (no auth when unset).")
    smtp_password: str | None = Field(None, description="SMTP password.")
    smtp_tls: SmtpTls = Field(SmtpTls.none, description="none, starttls or implicit.")
    smtp_from: str = Field("Spacebell <reminders@spacebell.local>", description="From address of mail.")
    smtp_timeout_seconds: float = Field(30.0, gt=0, description="Timeout of one SMTP operation.")
    email_confirmation_deadline_hours: float = Field(
        72.0, gt=0, description="How long notifications wait for an address to be confirmed."
    )
    email_confirmations_per_address_per_day: int = Field(3, ge=1, description="Confirmation mails per address a day.")
    email_confirmations_per_account_per_hour: int = Field(100, ge=1, description="Confirmation mails per account an hour.")

    log_json: bool = Field(False, description="Write logs as JSON lines.")
    log_level: str = Field("INFO", description="Log level.")

    @field_validator("webhook_allowed_networks", mode="before")
    @classmethod
    def _split_networks(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value

    @field_validator("public_base_url", "x_api_base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/")

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def allowed_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(c, strict=False) for c in self.webhook_allowed_networks]


class SettingsError(SystemExit):
    """Start-up stops with a message that names each bad setting."""


def load_settings(**overrides: object) -> Settings:
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = "SPACEBELL_" + "_".join(str(p) for p in err["loc"]).upper()
            lines.append(f"  {name}: {err['msg']}")
        raise SettingsError("invalid settings:\n" + "\n".join(lines)) from None


@lru_cache
def get_settings() -> Settings:
    return load_settings()
