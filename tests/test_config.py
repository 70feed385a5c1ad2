"""Settings, backend resolution, URL redaction and ``setup_environment_variables``.

Every test runs in an empty temporary working directory (``Settings`` reads ``.env`` from
the cwd) with every ``BSSAGENT_*`` setting and ``DATABASE_URL`` removed from the
environment; anything a test or ``load_dotenv`` adds to ``os.environ`` is undone afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pydantic
import pytest

from bssagent import (
    AgentSessionManager,
    AsyncAgentSessionManager,
    ConfigurationError,
    Settings,
)
from bssagent.config import StorageTarget, redact_url, resolve_target
from bssagent.environment import setup_environment_variables

SETTING_VARS = [f"BSSAGENT_{name.upper()}" for name in Settings.model_fields]
PG = "postgresql://app:s3cret@db.example.com:5432/sessions"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    monkeypatch.chdir(tmp_path)
    for name in [*SETTING_VARS, "DATABASE_URL", "OPENAI_API_KEY", "BSSAGENT_TEST_ONLY"]:
        monkeypatch.delenv(name, raising=False)
    saved = dict(os.environ)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def _target(url: str | None = None) -> StorageTarget:
    return resolve_target(Settings(database_url=url))


def _url(settings: Settings) -> str | None:
    return None if settings.database_url is None else settings.database_url.get_secret_value()


# -- resolve_target ---------------------------------------------------------------------------


@pytest.mark.parametrize("url", [None, "", "   \n"])
def test_no_url_means_the_default_sqlite_file(url: str | None) -> None:
    target = _target(url)
    assert target == StorageTarget("sqlite", url=None, path=Path(".bssagent/bssagent.db"))
    assert not target.path.is_absolute()  # type: ignore[union-attr]


def test_no_url_uses_bssagent_sqlite_path(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("BSSAGENT_SQLITE_PATH", "/var/lib/app/sessions.db")
    assert resolve_target(Settings()) == StorageTarget(
        "sqlite", path=Path("/var/lib/app/sessions.db")
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (PG, PG),
        ("postgres://app@db/sessions", "postgresql://app@db/sessions"),
        ("postgresql+psycopg://app@db/sessions", "postgresql://app@db/sessions"),
        ("postgresql+psycopg2://app@db/sessions", "postgresql://app@db/sessions"),
        ("PostgreSQL://app@db/sessions", "postgresql://app@db/sessions"),
        ("  postgresql://app@db/sessions\n", "postgresql://app@db/sessions"),
        (
            "postgresql:///sessions?host=/run/postgresql",
            "postgresql:///sessions?host=/run/postgresql",
        ),
    ],
    ids=[
        "postgresql",
        "postgres",
        "plus-psycopg",
        "plus-psycopg2",
        "mixed-case",
        "padded",
        "socket",
    ],
)
def test_postgres_urls(url: str, expected: str) -> None:
    assert _target(url) == StorageTarget("postgres", url=expected, path=None)


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///relative.db", Path("relative.db")),
        ("sqlite:///data/dir/sessions.db", Path("data/dir/sessions.db")),
        ("sqlite:////absolute/sessions.db", Path("/absolute/sessions.db")),
        ("sqlite://///absolute/sessions.db", Path("/absolute/sessions.db")),
        ("sqlite:///with%20space.db", Path("with space.db")),
        ("sqlite:///sessions.db?mode=rwc", Path("sessions.db")),
    ],
    ids=["relative", "relative-dirs", "absolute", "absolute-extra-slash", "quoted", "query"],
)
def test_sqlite_urls(url: str, path: Path) -> None:
    target = _target(url)
    assert target == StorageTarget("sqlite", url=None, path=path)
    assert target.path is not None
    assert target.path.is_absolute() is path.is_absolute()


def test_sqlite_scheme_is_case_insensitive() -> None:
    """``SQLITE:///rel.db`` is the relative ``rel.db``, as ``sqlite:///rel.db`` is."""
    assert _target("SQLITE:///rel.db").path == Path("rel.db")


@pytest.mark.parametrize("url", ["memory://", "memory:", "MEMORY://"])
def test_memory_url(url: str) -> None:
    assert _target(url) == StorageTarget("memory", url=None, path=None)


@pytest.mark.parametrize(
    "url",
    [
        "mysql://app:s3cret@db/sessions",
        "redis://db:6379/0",
        "http://example.com",
        "file:///tmp/x.db",
        "sqlite3:///x.db",
        "postgresqlx://db/x",
        "just-a-path.db",
        "sqlite:///",
        "sqlite://",
    ],
)
def test_unusable_urls_raise_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        _target(url)
    assert "s3cret" not in str(info.value)  # never echo a password


def test_unknown_scheme_rejected_at_manager_construction() -> None:
    for cls in (AgentSessionManager, AsyncAgentSessionManager):
        with pytest.raises(ConfigurationError, match="unsupported database URL scheme 'mysql'"):
            cls(database_url="mysql://app:s3cret@db/sessions")


def test_database_url_is_a_secret() -> None:
    settings = Settings(database_url=PG)
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in str(settings.model_dump())
    assert _url(settings) == PG


# -- environment and .env ---------------------------------------------------------------------


def test_database_url_fallback_variable(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DATABASE_URL", PG)
    assert _url(Settings()) == PG
    assert resolve_target(Settings()).backend == "postgres"
    assert AgentSessionManager().backend == "postgres"  # lazy: nothing is opened


def test_bssagent_database_url_alone(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("BSSAGENT_DATABASE_URL", "memory://")
    assert _url(Settings()) == "memory://"


def test_bssagent_database_url_wins_over_database_url(clean_env: pytest.MonkeyPatch) -> None:
    """The specific variable wins over the generic one (env names are case-insensitive, so
    the alias order in config.py matters)."""
    clean_env.setenv("BSSAGENT_DATABASE_URL", "memory://")
    clean_env.setenv("DATABASE_URL", PG)
    assert _url(Settings()) == "memory://"
    assert AgentSessionManager().backend == "memory"


def test_settings_read_dotenv_in_the_working_directory(clean_env: pytest.MonkeyPatch) -> None:
    Path(".env").write_text(
        "BSSAGENT_DATABASE_URL=memory://\nBSSAGENT_NAMESPACE=from-dotenv\nBSSAGENT_CACHE_SIZE=7\n",
        encoding="utf-8",
    )
    settings = Settings()
    assert (_url(settings), settings.namespace, settings.cache_size) == (
        "memory://",
        "from-dotenv",
        7,
    )
    clean_env.setenv("BSSAGENT_NAMESPACE", "from-env")  # the environment beats .env
    assert Settings().namespace == "from-env"
    # .env is read, not loaded: os.environ is untouched.
    assert "BSSAGENT_CACHE_SIZE" not in os.environ


def test_database_url_from_dotenv(clean_env: pytest.MonkeyPatch) -> None:
    Path(".env").write_text(f"DATABASE_URL={PG}\n", encoding="utf-8")
    assert resolve_target(Settings()).backend == "postgres"


def test_keyword_arguments_override_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("BSSAGENT_DATABASE_URL", PG)
    clean_env.setenv("BSSAGENT_NAMESPACE", "env-ns")
    clean_env.setenv("BSSAGENT_CACHE_SIZE", "5")
    assert _url(Settings(database_url="memory://")) == "memory://"
    for cls in (AgentSessionManager, AsyncAgentSessionManager):
        from_env = cls()
        assert (from_env.backend, from_env.namespace, from_env.settings.cache_size) == (
            "postgres",
            "env-ns",
            5,
        )
        explicit = cls(database_url="memory://", namespace="kw-ns", cache_size=0)
        assert (explicit.backend, explicit.namespace, explicit.settings.cache_size) == (
            "memory",
            "kw-ns",
            0,
        )
        # Other Settings fields pass through **options.
        assert cls(database_url="memory://", connect_timeout=9.5).settings.connect_timeout == 9.5


def test_settings_object_with_keyword_overrides() -> None:
    base = Settings(database_url="memory://", namespace="from-settings", cache_size=3)
    manager = AgentSessionManager(settings=base)
    assert (manager.namespace, manager.backend, manager.settings.cache_size) == (
        "from-settings",
        "memory",
        3,
    )
    manager = AgentSessionManager(settings=base, namespace="kw")
    assert (manager.namespace, manager.settings.cache_size) == ("kw", 3)
    assert base.namespace == "from-settings"  # the given Settings is not modified


def test_invalid_environment_value_is_a_configuration_error(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("BSSAGENT_CACHE_SIZE", "lots")
    with pytest.raises(pydantic.ValidationError):
        Settings()
    with pytest.raises(ConfigurationError, match="cache_size"):
        AgentSessionManager(database_url="memory://")


def test_no_url_manager_uses_the_default_file_lazily(tmp_path: Path) -> None:
    manager = AgentSessionManager()
    assert manager.backend == "sqlite"
    assert not (tmp_path / ".bssagent").exists()  # nothing opened at construction
    try:
        session = manager.get_or_create_user_session("alice")
    finally:
        manager.close()
    assert (tmp_path / ".bssagent" / "bssagent.db").is_file()
    with AgentSessionManager() as again:
        assert again.get_current_user_session("alice").thread_id == session.thread_id


# -- redact_url -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (PG, "postgresql://app:***@db.example.com:5432/sessions"),
        ("postgres://app:s3cret@db/x?sslmode=require", "postgres://app:***@db/x?sslmode=require"),
        ("postgresql://app:s3%40cr%3Aet@db/x", "postgresql://app:***@db/x"),
        ("postgresql://app:s3cr@et@db/x", "postgresql://app:***@db/x"),
        ("postgresql://app:s3cret@h1:5432,h2:5433/x", "postgresql://app:***@h1:5432,h2:5433/x"),
        ("postgresql://app:@db/x", "postgresql://app:***@db/x"),
        ("postgresql://app@db/x", "postgresql://app@db/x"),
        ("postgresql://db/x", "postgresql://db/x"),
        ("sqlite:///sessions.db", "sqlite:///sessions.db"),
        ("memory://", "memory://"),
        ("host=db user=app password=s3cret dbname=x", "host=db user=app password=*** dbname=x"),
        ("host=db password = 's3 cret' port=5432", "host=db password = *** port=5432"),
        ("password=s3cret", "password=***"),
        ("postgresql://app@db/x?password=s3cret", "postgresql://app@db/x?password=***"),
        (None, "<none>"),
        ("", "<none>"),
    ],
)
def test_redact_url(url: str | None, expected: str) -> None:
    redacted = redact_url(url)
    assert redacted == expected
    for secret in ("s3cret", "s3 cret", "s3%40cr%3Aet", "s3cr@et"):
        assert secret not in redacted


def test_redact_url_query_password_after_other_parameters() -> None:
    redacted = redact_url("postgresql://app@db/x?sslmode=require&password=s3cret&port=5432")
    assert "s3cret" not in redacted
    assert redacted.startswith("postgresql://app@db/x?sslmode=require&password=***")


# -- setup_environment_variables --------------------------------------------------------------


def test_setup_environment_variables_loads_without_overriding(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env_file = tmp_path / "config" / "app.env"
    env_file.parent.mkdir()
    env_file.write_text(
        "OPENAI_API_KEY=sk-from-file\n"
        "BSSAGENT_TEST_ONLY=from-file\n"
        "BSSAGENT_NAMESPACE=file-ns\n"
        "BSSAGENT_CACHE_SIZE=7\n"
        "BSSAGENT_DATABASE_URL=memory://\n",
        encoding="utf-8",
    )
    clean_env.setenv("BSSAGENT_TEST_ONLY", "from-env")
    clean_env.setenv("BSSAGENT_CACHE_SIZE", "5")
    settings = setup_environment_variables(env_file)
    assert isinstance(settings, Settings)
    assert os.environ["OPENAI_API_KEY"] == "sk-from-file"  # provider keys become visible
    assert os.environ["BSSAGENT_TEST_ONLY"] == "from-env"  # existing variables win
    assert os.environ["BSSAGENT_CACHE_SIZE"] == "5"
    assert (settings.namespace, settings.cache_size, _url(settings)) == ("file-ns", 5, "memory://")
    # str paths work too, and loading twice changes nothing.
    again = setup_environment_variables(str(env_file))
    assert again == settings


def test_setup_environment_variables_defaults_to_dotenv_in_cwd() -> None:
    Path(".env").write_text("BSSAGENT_NAMESPACE=cwd-ns\nOPENAI_API_KEY=sk-cwd\n", encoding="utf-8")
    settings = setup_environment_variables()
    assert settings.namespace == "cwd-ns"
    assert os.environ["OPENAI_API_KEY"] == "sk-cwd"


def test_setup_environment_variables_without_a_file(tmp_path: Path) -> None:
    settings = setup_environment_variables(tmp_path / "missing.env")
    assert settings == Settings()
    assert settings.namespace == "default"
    assert resolve_target(settings).backend == "sqlite"
    assert "OPENAI_API_KEY" not in os.environ


def test_setup_environment_variables_rejects_invalid_settings(tmp_path: Path) -> None:
    env_file = tmp_path / "bad.env"
    env_file.write_text("BSSAGENT_CACHE_SIZE=-3\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="cache_size"):
        setup_environment_variables(env_file)
