"""Configuration: one pydantic-settings class, read from ``BSSAGENT_*`` variables and ``.env``.

Every field can also be passed as a keyword argument to the managers, which wins over the
environment. Where the data lives is decided by the database URL:

=================================  =========================================================
``BSSAGENT_DATABASE_URL``          backend
=================================  =========================================================
unset (and no ``DATABASE_URL``)    SQLite file at ``BSSAGENT_SQLITE_PATH`` (zero set-up)
``postgresql://...``               PostgreSQL (needs the ``postgres`` extra)
``sqlite:///path/to/file.db``      SQLite file at that path
``memory://``                      process memory only (tests, throwaway runs)
=================================  =========================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigurationError
from .sessions import validation

__all__ = ["Backend", "Settings", "StorageTarget", "redact_url", "resolve_target"]

Backend = Literal["postgres", "sqlite", "memory"]
FallbackMode = Literal["memory", "read_only", "raise"]


class Settings(BaseSettings):
    """bssagent settings. Environment variables carry the ``BSSAGENT_`` prefix."""

    model_config = SettingsConfigDict(
        env_prefix="BSSAGENT_", env_file=".env", extra="ignore", validate_default=True
    )

    database_url: SecretStr | None = Field(
        default=None,
        # BSSAGENT_ first: names are case-insensitive, so "database_url" would match DATABASE_URL.
        validation_alias=AliasChoices("BSSAGENT_DATABASE_URL", "database_url", "DATABASE_URL"),
        description="postgresql://, sqlite:/// or memory:// URL; unset means the SQLite file.",
    )
    sqlite_path: Path = Field(
        default=Path(".bssagent/bssagent.db"),
        description="The embedded database file used when no URL is set.",
    )
    table_name: str = Field(default="user_sessions", description="The session table's name.")
    namespace: str = Field(default="default", description="Scope of a manager's sessions.")
    cache_size: int = Field(default=10_000, ge=0, description="LRU cache entries (0 disables).")
    cache_ttl: float = Field(default=60.0, gt=0, description="Seconds a cached session is trusted.")
    fallback: FallbackMode = Field(
        default="memory",
        description="On an unreachable database: 'memory' keeps serving, 'read_only' serves "
        "known users and refuses writes, 'raise' fails closed.",
    )
    deadline: float = Field(
        default=0.5,
        gt=0,
        le=600,
        description="Seconds a session-registry database operation may take (PostgreSQL).",
    )
    notifications: bool = Field(
        default=True,
        description="Follow other processes' session changes (PostgreSQL LISTEN/NOTIFY).",
    )
    breaker_threshold: int = Field(
        default=3,
        ge=1,
        description="Connection failures or deadline expiries in a row that open the breaker.",
    )
    journal_limit: int = Field(
        default=10_000,
        ge=1,
        description="While the database is down (fallback 'memory'): most new sessions, "
        "conversation threads and store writes kept for replay; beyond it they are refused.",
    )
    checkpoint_cache_size: int = Field(
        default=1000,
        ge=0,
        description="Threads whose latest checkpoint is kept in memory to carry their "
        "conversation through an outage (0: outage runs start without history).",
    )
    connect_timeout: float = Field(default=2.0, gt=0, description="Seconds to open a connection.")
    pool_min_size: int = Field(default=1, ge=0)
    pool_max_size: int = Field(default=10, ge=1)
    pool_timeout: float = Field(default=2.0, gt=0, description="Seconds to wait for a connection.")
    prepare_threshold: int | None = Field(
        default=5, description="psycopg prepare_threshold; set empty (None) behind a pgbouncer."
    )
    reconnect_interval: float = Field(
        default=5.0, gt=0, description="Seconds the open breaker waits before a probe."
    )
    migration_lock_timeout: float = Field(
        default=60.0, gt=0, description="Seconds to wait for the schema migration lock."
    )
    session_timeout: float | None = Field(
        default=None, gt=0, description="Idle seconds after which a session expires (off)."
    )
    max_sessions_per_user: int | None = Field(
        default=None, ge=1, description="Sessions a user may keep stored (no limit)."
    )
    session_limit_policy: Literal["purge", "raise"] = Field(
        default="purge",
        description="At max_sessions_per_user: purge the oldest ended sessions, or raise.",
    )
    max_active_sessions: int | None = Field(
        default=None, ge=1, description="Open sessions in a namespace (no limit)."
    )
    cleanup_interval: float | None = Field(
        default=None, gt=0, description="Seconds between background cleanups (off)."
    )
    cleanup_batch_size: int = Field(default=5000, ge=1, le=100_000)
    retention_period: float | None = Field(
        default=None, ge=0, description="Seconds after a session ends before retention runs."
    )
    retention_mode: Literal["keep_latest", "delete"] = Field(
        default="keep_latest",
        description="Ended sessions' checkpoints: keep only the latest, or delete them all.",
    )

    @field_validator("table_name")
    @classmethod
    def _check_table_name(cls, value: str) -> str:
        try:
            return validation.table_name(value)
        except ConfigurationError as exc:  # pydantic reports ValueErrors as ValidationError
            raise ValueError(str(exc)) from None

    @field_validator("namespace")
    @classmethod
    def _check_namespace(cls, value: str) -> str:
        return validation.namespace(value)

    @field_validator(
        "prepare_threshold",
        "session_timeout",
        "max_sessions_per_user",
        "max_active_sessions",
        "cleanup_interval",
        "retention_period",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value


@dataclass(frozen=True)
class StorageTarget:
    """Where sessions live, resolved from :class:`Settings`."""

    backend: Backend
    url: str | None = None
    """The PostgreSQL conninfo (secret: never log it, use :func:`redact_url`)."""
    path: Path | None = None
    """The SQLite file."""


def resolve_target(settings: Settings) -> StorageTarget:
    """Decide the backend from the settings' database URL (pure; no I/O)."""
    if settings.database_url is None or not settings.database_url.get_secret_value().strip():
        return StorageTarget("sqlite", path=settings.sqlite_path)
    url = settings.database_url.get_secret_value().strip()
    if "://" not in url and "=" in url:
        # A libpq key/value conninfo ("host=... dbname=..."): PostgreSQL.
        return StorageTarget("postgres", url=url)
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("postgresql", "postgres") or scheme.startswith("postgresql+"):
        # Accept SQLAlchemy-style "postgresql+psycopg://" URLs too.
        return StorageTarget("postgres", url=re.sub(r"^[^:]+:", "postgresql:", url, count=1))
    if scheme == "sqlite":
        path = unquote(urlsplit(url).path)
        if url.lower().startswith("sqlite:////"):
            path = "/" + path.lstrip("/")
        elif url.lower().startswith("sqlite:///"):
            path = path[1:]
        if not path:
            raise ConfigurationError("a sqlite:/// URL needs a file path")
        return StorageTarget("sqlite", path=Path(path))
    if scheme == "memory":
        return StorageTarget("memory")
    # Never echo the URL itself: it may hold a password.
    shown = scheme if re.fullmatch(r"[a-z][a-z0-9+.-]{0,30}", scheme) else "<not a URL>"
    raise ConfigurationError(
        f"unsupported database URL scheme {shown!r}: use postgresql://, sqlite:/// or memory://"
    )


def redact_url(url: str | None) -> str:
    """Return ``url`` with any password replaced by ``***``, safe for logs."""
    if not url:
        return "<none>"
    parts = urlsplit(url)
    if parts.password is not None:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        url = parts._replace(netloc=netloc).geturl()
    # Key/value conninfo ("host=... password=...") and ?password= query parameters too.
    return re.sub(r"(password\s*=\s*)('[^']*'|[^\s&]+)", r"\1***", url)
