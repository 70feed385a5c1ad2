"""Fuzzing every public entry point of the managers with Hypothesis.

Arguments of every shape (wrong types, empty and huge strings, control characters, NaN,
nested containers, random UUIDs) go to every public method of the sync manager on memory,
SQLite and real PostgreSQL. Whatever comes in, a call either succeeds or raises a
``BssAgentError`` (a typed error); and none of it counts as a storage failure: the breaker
stays closed and nothing falls back to memory.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bssagent import AgentSessionManager, BssAgentError

pytestmark = pytest.mark.timeout(300)

# Methods that start background work or close the manager are exercised elsewhere.
SKIPPED = {"close", "start_cleaner", "run_maintenance", "user_memory", "migrate"}
METHODS = sorted(
    name
    for name, member in inspect.getmembers(AgentSessionManager, inspect.isfunction)
    if not name.startswith("_") and name not in SKIPPED
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=250, max_size=300),
    st.sampled_from(["", " ", "\x00", "a\x00b", "\ud800", "user", "completed", "user", "app"]),
    st.uuids().map(str),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=8,
)


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def manager(
    request: pytest.FixtureRequest, tmp_path: Any, table_name: str
) -> Iterator[AgentSessionManager]:
    if request.param == "memory":
        url = "memory://"
    elif request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'fuzz.db'}"
    else:
        url = str(request.getfixturevalue("pg_url"))
    with AgentSessionManager(database_url=url, table_name=table_name) as m:
        m.get_or_create_user_session("user")  # something for the calls to find
        yield m


def arguments(method: str) -> st.SearchStrategy[tuple[list[Any], dict[str, Any]]]:
    """Random values for ``method``'s parameters: every required one, some optional ones."""
    signature = inspect.signature(getattr(AgentSessionManager, method))
    params = [p for p in signature.parameters.values() if p.name != "self"]
    required = [p for p in params if p.default is inspect.Parameter.empty and p.kind
                in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]  # fmt: skip
    optional = [p.name for p in params if p.default is not inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]  # fmt: skip
    return st.tuples(
        st.lists(values, min_size=len(required), max_size=len(required)),
        st.dictionaries(st.sampled_from(optional), values) if optional else st.just({}),
    )


@pytest.mark.parametrize("method", METHODS)
def test_any_argument_gets_a_typed_error_and_never_trips_the_breaker(
    manager: AgentSessionManager, method: str
) -> None:
    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(call=arguments(method))
    def check(call: tuple[list[Any], dict[str, Any]]) -> None:
        args, kwargs = call
        with contextlib.suppress(BssAgentError):  # typed: what a caller can handle
            getattr(manager, method)(*args, **kwargs)
        health = manager.health()
        assert (health.status, health.failures) == ("ok", 0), (method, args, kwargs)

    check()


def test_the_fuzzed_surface_is_the_public_one() -> None:
    public = {name for name in dir(AgentSessionManager) if not name.startswith("_")}
    callables = {n for n in public if inspect.isfunction(getattr(AgentSessionManager, n))}
    assert set(METHODS) == callables - SKIPPED
    assert {"get_or_create_user_session", "set_user_preferences", "delete_user_data"} <= set(
        METHODS
    )
