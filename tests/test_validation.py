"""Bad input fails fast, typed, names the argument, writes nothing and never degrades.

Every case runs on both managers and on all three backends. Before each bad call the
storage holds a few valid sessions (so a write that should not happen is visible); the
storage is read directly (psycopg for PostgreSQL, sqlite3 for SQLite) before and after, and
must be unchanged. A caller's mistake must never look like an outage either: ``is_degraded``
stays false.
"""

from __future__ import annotations

import inspect
import itertools
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from bssagent import (
    AgentSessionManager,
    AsyncAgentSessionManager,
    BssAgentError,
    ConfigurationError,
    InvalidInputError,
    SessionNotFoundError,
    UnknownFieldError,
)

AnyManager = AgentSessionManager | AsyncAgentSessionManager
KINDS = {"sync": AgentSessionManager, "async": AsyncAgentSessionManager}
SEED_USER = "seed"
UPPER_UUID = "6F9619FF-8B86-D011-B42D-00C04FC964FF"


async def _call(manager: AnyManager, method: str, *args: Any, **kwargs: Any) -> Any:
    result = getattr(manager, method)(*args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


@dataclass
class Env:
    manager: AnyManager
    snapshot: Callable[[], Any]
    current: str  # the seed user's current thread
    old: str  # the seed user's previous, inactive thread


@pytest.fixture(scope="module")
def pg_conn(pg_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        yield conn


def _reader(request: pytest.FixtureRequest, url: str, table: str, manager: AnyManager) -> Any:
    """A function returning every stored row, read around the manager."""
    if url.startswith("postgresql"):
        conn: psycopg.Connection[Any] = request.getfixturevalue("pg_conn")
        query = sql.SQL("SELECT * FROM {} ORDER BY id").format(sql.Identifier(table))
        count = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))

        async def pg_rows() -> Any:
            rows = conn.execute(query).fetchall()
            assert conn.execute(count).fetchone() == (len(rows),)
            return rows

        return pg_rows
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")

        async def sqlite_rows() -> Any:
            with sqlite3.connect(path) as conn:
                return conn.execute(f'SELECT * FROM "{table}" ORDER BY id').fetchall()

        return sqlite_rows

    async def memory_rows() -> Any:  # only the manager can see memory: list everything
        active = await _call(manager, "list_active_sessions", limit=1000)
        mine = await _call(manager, "list_user_sessions", SEED_USER, limit=1000)
        return [s.model_dump() for s in active], [s.model_dump() for s in mine]

    return memory_rows


async def _seeded(request: pytest.FixtureRequest, url: str, table: str) -> Env:
    manager = KINDS[request.param](database_url=url, table_name=table)
    old = await _call(manager, "create_user_session", SEED_USER, "old", {"v": 1})
    current = await _call(manager, "create_user_session", SEED_USER, "current", {"v": 2})
    await _call(manager, "get_or_create_user_session", "other")
    return Env(manager, _reader(request, url, table, manager), current.thread_id, old.thread_id)


@pytest.fixture(params=list(KINDS))
async def env(request: pytest.FixtureRequest, backend_url: str, table_name: str) -> Any:
    """A seeded manager of each kind on each backend."""
    seeded = await _seeded(request, backend_url, table_name)
    yield seeded
    await _call(seeded.manager, "close")


@pytest.fixture(params=list(KINDS))
async def memory_env(request: pytest.FixtureRequest) -> Any:
    """A seeded manager of each kind, in memory (for checks that never reach storage)."""
    seeded = await _seeded(request, "memory://", "user_sessions")
    yield seeded
    await _call(seeded.manager, "close")


# Each case: (id, method, args, kwargs, expected error, expected .field). "{current}" and
# "{old}" in args are replaced by the seed user's thread ids, so only the bad part is bad.
Case = tuple[str, str, tuple[Any, ...], dict[str, Any], type[BssAgentError], str]

_USER_METHODS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("create_user_session", (), {}),
    ("get_or_create_user_session", (), {}),
    ("get_current_user_session", (), {}),
    ("update_session", ({"title": "x"},), {}),
    ("deactivate_session", (), {}),
    ("has_session", (), {}),
    ("list_user_sessions", (), {}),
    ("get_session", ("{current}",), {}),
    ("switch_session", ("{old}",), {}),
    ("delete_session", ("{old}",), {}),
]
_BAD_USER_IDS: list[tuple[str, Any]] = [
    ("empty", ""),
    ("whitespace", " \t "),
    ("256_chars", "u" * 256),
    ("nul", "a\x00b"),
    ("c0_control_1f", "a\x1fb"),
    ("c1_control_85", "a\x85b"),
    ("lone_surrogate", "a\ud800b"),
    ("int", 42),
    ("none", None),
    ("bytes", b"alice"),
]

CASES: list[Case] = []
_USER_ERR = (InvalidInputError, "user_id")
_META_ERR = (InvalidInputError, "metadata")
# Every bad user id against get_or_create, and each one against another method too, so
# every method taking a user id is checked.
for (name, bad), (method, rest, kwargs) in zip(_BAD_USER_IDS, _USER_METHODS):
    CASES.append(
        (f"user_id-{name}-get_or_create", "get_or_create_user_session", (bad,), {}, *_USER_ERR)
    )
    if method != "get_or_create_user_session":
        CASES.append((f"user_id-{name}-{method}", method, (bad, *rest), kwargs, *_USER_ERR))

_METADATA_TOO_BIG = {"k": "x" * (16 * 1024)}
CASES += [
    # title
    ("title-empty", "create_user_session", ("u", ""), {}, InvalidInputError, "title"),
    ("title-spaces", "get_or_create_user_session", ("u", "   "), {}, InvalidInputError, "title"),
    ("title-256", "create_user_session", ("u", "t" * 256), {}, InvalidInputError, "title"),
    ("title-nul", "get_or_create_user_session", ("u", "a\x00b"), {}, InvalidInputError, "title"),
    ("title-int", "create_user_session", ("u", 5), {}, InvalidInputError, "title"),
    ("title-none", "create_user_session", ("u", None), {}, InvalidInputError, "title"),
    # metadata
    ("meta-str", "create_user_session", ("u", "t", "a=1"), {}, InvalidInputError, "metadata"),
    ("meta-list", "create_user_session", ("u", "t", [1, 2]), {}, InvalidInputError, "metadata"),
    (
        "meta-set-value",
        "create_user_session",
        ("u", "t", {"s": {1, 2}}),
        {},
        InvalidInputError,
        "metadata",
    ),
    (
        "meta-nan",
        "create_user_session",
        ("u", "t", {"x": float("nan")}),
        {},
        InvalidInputError,
        "metadata",
    ),
    (
        "meta-inf",
        "get_or_create_user_session",
        ("u", "t", {"x": [float("inf")]}),
        {},
        InvalidInputError,
        "metadata",
    ),
    (
        "meta-nul-in-value",
        "create_user_session",
        ("u", "t", {"x": "a\x00b"}),
        {},
        InvalidInputError,
        "metadata",
    ),
    ("meta-nul-in-key", "create_user_session", ("u", "t", {"a\x00": 1}), {}, *_META_ERR),
    (
        "meta-nul-nested-update",
        "update_session",
        (SEED_USER, {"metadata": {"x": [{"y": "\x00"}]}}),
        {},
        *_META_ERR,
    ),
    (
        "meta-surrogate-key",
        "create_user_session",
        ("u", "t", {"\ud800": 1}),
        {},
        InvalidInputError,
        "metadata",
    ),
    (
        "meta-surrogate-value",
        "get_or_create_user_session",
        ("u", "t", {"k": ["\udfff"]}),
        {},
        InvalidInputError,
        "metadata",
    ),
    (
        "meta-too-big",
        "create_user_session",
        ("u", "t", {**_METADATA_TOO_BIG, "more": "y"}),
        {},
        InvalidInputError,
        "metadata",
    ),
    (
        "meta-tuple-key",
        "create_user_session",
        ("u", "t", {(1, 2): "v"}),
        {},
        InvalidInputError,
        "metadata",
    ),
    (
        "meta-object-value",
        "create_user_session",
        ("u", "t", {"o": object()}),
        {},
        InvalidInputError,
        "metadata",
    ),
    # updates (on the seed user, who has a current session a missed check would change)
    (
        "updates-unknown",
        "update_session",
        (SEED_USER, {"bogus": 1}),
        {},
        UnknownFieldError,
        "updates",
    ),
    (
        "updates-unknown-with-valid",
        "update_session",
        (SEED_USER, {"title": "ok", "is_active": False}),
        {},
        UnknownFieldError,
        "updates",
    ),
    ("updates-empty", "update_session", (SEED_USER, {}), {}, InvalidInputError, "updates"),
    ("updates-str", "update_session", (SEED_USER, "title"), {}, InvalidInputError, "updates"),
    ("updates-none", "update_session", (SEED_USER, None), {}, InvalidInputError, "updates"),
    (
        "updates-pairs",
        "update_session",
        (SEED_USER, [("title", "x")]),
        {},
        InvalidInputError,
        "updates",
    ),
    (
        "updates-bad-title",
        "update_session",
        (SEED_USER, {"title": ""}),
        {},
        InvalidInputError,
        "title",
    ),
    (
        "updates-control-title",
        "update_session",
        (SEED_USER, {"title": "a\x1fb", "metadata": {}}),
        {},
        InvalidInputError,
        "title",
    ),
    (
        "updates-bad-metadata",
        "update_session",
        (SEED_USER, {"metadata": [1]}),
        {},
        InvalidInputError,
        "metadata",
    ),
    (
        "updates-nan-metadata",
        "update_session",
        (SEED_USER, {"title": "ok", "metadata": {"x": float("-inf")}}),
        {},
        InvalidInputError,
        "metadata",
    ),
    # thread_id
    (
        "thread-not-uuid",
        "get_session",
        (SEED_USER, "not-a-uuid"),
        {},
        InvalidInputError,
        "thread_id",
    ),
    ("thread-upper", "switch_session", (SEED_USER, UPPER_UUID), {}, InvalidInputError, "thread_id"),
    (
        "thread-upper-own",
        "switch_session",
        (SEED_USER, "{old_upper}"),
        {},
        InvalidInputError,
        "thread_id",
    ),
    (
        "thread-1mb",
        "delete_session",
        (SEED_USER, "a" * 1_000_000),
        {},
        InvalidInputError,
        "thread_id",
    ),
    ("thread-int", "get_session", (SEED_USER, 123), {}, InvalidInputError, "thread_id"),
    ("thread-none", "delete_session", (SEED_USER, None), {}, InvalidInputError, "thread_id"),
    ("thread-hex", "delete_session", (SEED_USER, "{old_hex}"), {}, InvalidInputError, "thread_id"),
    (
        "thread-braces",
        "get_session",
        (SEED_USER, "{{{current}}}"),
        {},
        InvalidInputError,
        "thread_id",
    ),
    (
        "thread-urn",
        "switch_session",
        (SEED_USER, "urn:uuid:{old}"),
        {},
        InvalidInputError,
        "thread_id",
    ),
    (
        "thread-update-kw",
        "update_session",
        (SEED_USER, {"title": "x"}),
        {"thread_id": "{old_hex}"},
        InvalidInputError,
        "thread_id",
    ),
    # limit
    ("limit-0", "list_active_sessions", (), {"limit": 0}, InvalidInputError, "limit"),
    ("limit-1001", "list_active_sessions", (), {"limit": 1001}, InvalidInputError, "limit"),
    ("limit-negative", "list_active_sessions", (), {"limit": -5}, InvalidInputError, "limit"),
    ("limit-bool", "list_user_sessions", (SEED_USER,), {"limit": True}, InvalidInputError, "limit"),
    ("limit-str", "list_active_sessions", (), {"limit": "10"}, InvalidInputError, "limit"),
    ("limit-float", "list_user_sessions", (SEED_USER,), {"limit": 2.0}, InvalidInputError, "limit"),
    # before_id
    ("before-0", "list_active_sessions", (), {"before_id": 0}, InvalidInputError, "before_id"),
    ("before-neg", "list_active_sessions", (), {"before_id": -1}, InvalidInputError, "before_id"),
    (
        "before-str",
        "list_user_sessions",
        (SEED_USER,),
        {"before_id": "5"},
        InvalidInputError,
        "before_id",
    ),
    (
        "before-bool",
        "list_active_sessions",
        (),
        {"before_id": True},
        InvalidInputError,
        "before_id",
    ),
    (
        "before-float",
        "list_user_sessions",
        (SEED_USER,),
        {"before_id": 3.0},
        InvalidInputError,
        "before_id",
    ),
]


def _fill(value: Any, env: Env) -> Any:
    if not isinstance(value, str) or "{" not in value:
        return value
    return value.format(
        current=env.current,
        old=env.old,
        old_upper=env.old.upper(),
        old_hex=env.old.replace("-", ""),
    )


async def _check_rejected(env: Env, case: Case) -> None:
    """Run one case: the typed error naming the field, nothing written, not degraded."""
    _, method, args, kwargs, error, field = case
    args = tuple(_fill(a, env) for a in args)
    kwargs = {k: _fill(v, env) for k, v in kwargs.items()}
    before = await env.snapshot()
    with pytest.raises(BssAgentError) as info:
        await _call(env.manager, method, *args, **kwargs)
    assert type(info.value) is error, info.value
    assert isinstance(info.value, InvalidInputError)
    assert isinstance(info.value, ValueError)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert await env.snapshot() == before  # nothing written
    assert env.manager.is_degraded is False
    assert env.manager.health().status == "ok"


async def test_bad_input_is_rejected_and_nothing_is_written(
    env: Env, subtests: pytest.Subtests
) -> None:
    """Every case of ``CASES`` (one subtest each) on one manager and its seeded storage."""
    for case in CASES:
        with subtests.test(case[0]):
            await _check_rejected(env, case)
    # The manager still works after rejecting all of that, and nothing changed.
    current = await _call(env.manager, "get_current_user_session", SEED_USER)
    assert (current.thread_id, current.title, current.metadata) == (
        env.current,
        "current",
        {"v": 2},
    )
    listed = await _call(env.manager, "list_user_sessions", SEED_USER)
    assert [s.thread_id for s in listed] == [env.current, env.old]


def test_at_least_25_distinct_bad_inputs() -> None:
    names = [c[0] for c in CASES]
    assert len(set(names)) == len(names) >= 25
    assert {c[1] for c in CASES} >= {m for m, _, _ in _USER_METHODS} | {"list_active_sessions"}
    assert {c[5] for c in CASES} == {
        "user_id",
        "title",
        "metadata",
        "updates",
        "thread_id",
        "limit",
        "before_id",
    }


# Falsy non-dicts must be rejected, not mistaken for "no metadata".
FALSY_METADATA_CASES: list[Case] = [
    ("meta-empty-list", "create_user_session", ("u", "t", []), {}, *_META_ERR),
    ("meta-empty-str", "get_or_create_user_session", ("u", "t", ""), {}, *_META_ERR),
    ("meta-zero", "create_user_session", ("u", "t", 0), {}, *_META_ERR),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in FALSY_METADATA_CASES])
async def test_falsy_non_dict_metadata_is_rejected(memory_env: Env, case: Case) -> None:
    await _check_rejected(memory_env, case)


async def test_cached_user_still_gets_title_and_metadata_validated(memory_env: Env) -> None:
    """The answer to a bad argument must not depend on what the cache holds."""
    with pytest.raises(InvalidInputError) as info:
        await _call(memory_env.manager, "get_or_create_user_session", "fresh-user", 123)
    assert info.value.field == "title"
    await _call(memory_env.manager, "get_or_create_user_session", SEED_USER)  # cached now
    with pytest.raises(InvalidInputError) as info:
        await _call(memory_env.manager, "get_or_create_user_session", SEED_USER, 123)
    assert info.value.field == "title"
    with pytest.raises(InvalidInputError) as info:
        await _call(memory_env.manager, "get_or_create_user_session", SEED_USER, "ok", [1])
    assert info.value.field == "metadata"


# -- construction -----------------------------------------------------------------------------

CONFIG_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("namespace-empty", {"namespace": ""}, "namespace"),
    ("namespace-spaces", {"namespace": "   "}, "namespace"),
    ("namespace-65", {"namespace": "n" * 65}, "namespace"),
    ("namespace-nul", {"namespace": "a\x00b"}, "namespace"),
    ("namespace-int", {"namespace": 5}, "namespace"),
    ("table-dash", {"table_name": "bad-name"}, "table_name"),
    ("table-digit", {"table_name": "1abc"}, "table_name"),
    ("table-41", {"table_name": "t" * 41}, "table_name"),
    ("table-injection", {"table_name": 'x"; DROP TABLE users; --'}, "table_name"),
    ("table-empty", {"table_name": ""}, "table_name"),
    ("table-unicode", {"table_name": "tablé"}, "table_name"),
    ("cache-size-negative", {"cache_size": -1}, "cache_size"),
    ("fallback-unknown", {"fallback": "explode"}, "fallback"),
    ("url-scheme", {"database_url": "mysql://u@h/db"}, "mysql"),
]


def test_bad_configuration_raises_and_opens_nothing(
    request: pytest.FixtureRequest,
    subtests: pytest.Subtests,
    backend_url: str,
    table_name: str,
    tmp_path: Path,
) -> None:
    for (name, options, mentions), kind in itertools.product(CONFIG_CASES, KINDS):
        with subtests.test(f"{kind}-{name}"):
            kwargs = {"database_url": backend_url, "table_name": table_name, **options}
            with pytest.raises(ConfigurationError) as info:
                KINDS[kind](**kwargs)
            assert isinstance(info.value, BssAgentError)
            assert not isinstance(info.value, InvalidInputError)
            assert mentions in str(info.value)
    # Nothing was opened: no SQLite file, no PostgreSQL table.
    assert list(tmp_path.iterdir()) == []
    if backend_url.startswith("postgresql"):
        conn: psycopg.Connection[Any] = request.getfixturevalue("pg_conn")
        assert conn.execute("SELECT to_regclass(%s)", (table_name,)).fetchone() == (None,)


def test_the_limits_themselves_are_accepted() -> None:
    """The valid inputs next to the bad ones above pass: the checks are not too strict."""
    tid = str(uuid.uuid4())
    with AgentSessionManager(database_url="memory://") as m:
        s = m.get_or_create_user_session("u" * 255, "t" * 255, {"k": "x" * (16 * 1024 - 10)})
        assert m.get_session("u" * 255, s.thread_id) == s
        assert m.update_session("u" * 255, {"title": "é 🙂 ü"}).title == "é 🙂 ü"
        with pytest.raises(SessionNotFoundError):
            m.get_session("u" * 255, tid)
        s = m.get_session("u" * 255, s.thread_id)
        assert m.list_active_sessions(limit=1000, before_id=10**12) == [s]
        assert m.list_user_sessions("u" * 255, limit=1, before_id=s.id + 1) == [s]
