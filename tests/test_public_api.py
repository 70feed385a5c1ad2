"""Pins the public surface, in the manner of httpx's ``test_exported_members``.

Adding or removing a public name is an API change: it must show up here, on purpose.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re

import pytest

import bssagent
import bssagent.core
import bssagent.errors
from bssagent import AgentSessionManager, AsyncAgentSessionManager

EXPECTED_ALL = [
    "AgentSessionManager",
    "AsyncAgentSessionManager",
    "BaseAgent",
    "BssAgentError",
    "ConfigurationError",
    "Health",
    "InvalidInputError",
    "InvalidTransitionError",
    "JournalFullError",
    "MigrationError",
    "SessionEvent",
    "SessionLimitError",
    "SessionNotFoundError",
    "SessionStats",
    "Settings",
    "StorageError",
    "StorageUnavailableError",
    "ThreadBusyError",
    "UnknownFieldError",
    "UserSession",
    "__version__",
]
EXPECTED_CORE_ALL = [
    "AgentSessionManager",
    "AsyncAgentSessionManager",
    "BaseAgent",
    "Health",
    "SessionEvent",
    "SessionNotFoundError",
    "SessionStats",
    "UserSession",
]
EXPECTED_ERRORS = [
    "BssAgentError",
    "ConfigurationError",
    "InvalidInputError",
    "InvalidTransitionError",
    "JournalFullError",
    "MigrationError",
    "SessionLimitError",
    "SessionNotFoundError",
    "StorageError",
    "StorageUnavailableError",
    "ThreadBusyError",
    "UnknownFieldError",
]
# The seed's API, which every release keeps (same names on both managers).
SEED_METHODS = {
    "create_user_session",
    "get_or_create_user_session",
    "get_current_user_session",
    "update_session",
    "deactivate_session",
    "list_active_sessions",
    "clear_memory_cache",
    "has_session",
    "get_session_count",
}
MULTI_CHAT_METHODS = {"list_user_sessions", "get_session", "switch_session", "delete_session"}
NOT_AWAITED = {"clear_memory_cache", "get_session_count", "health"}


@pytest.mark.parametrize(
    ("module", "expected"),
    [(bssagent, EXPECTED_ALL), (bssagent.core, EXPECTED_CORE_ALL)],
    ids=["bssagent", "bssagent.core"],
)
def test_exported_members(module: object, expected: list[str]) -> None:
    exported = module.__all__  # type: ignore[attr-defined]
    assert exported == sorted(exported), "__all__ must stay sorted"
    assert len(set(exported)) == len(exported)
    assert exported == expected
    namespace: dict[str, object] = {}
    exec(f"from {module.__name__} import *", namespace)  # type: ignore[attr-defined]
    for name in exported:
        assert getattr(module, name) is namespace[name]
    public = {n for n in dir(module) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(exported), "public classes that are not exported"


def test_core_reexports_the_same_objects() -> None:
    for name in bssagent.core.__all__:
        assert getattr(bssagent.core, name) is getattr(bssagent, name)


def test_public_classes_present_a_public_module_path() -> None:
    for name in EXPECTED_ERRORS:
        assert getattr(bssagent, name).__module__ == "bssagent"


def test_version() -> None:
    assert isinstance(bssagent.__version__, str)
    assert re.fullmatch(r"\d+\.\d+\.\d+([abrc.]\w*)?", bssagent.__version__)
    assert bssagent.__version__ == importlib.metadata.version("bssagent")


# -- the error tree -------------------------------------------------------------------------


def _docstring_tree() -> dict[str, str | None]:
    """Parse the ``::`` tree in bssagent.errors' docstring into {class: parent}."""
    doc = bssagent.errors.__doc__
    assert doc is not None
    block = doc.split("::", 1)[1]
    parents: dict[str, str | None] = {}
    stack: list[str] = []
    for line in block.splitlines():
        match = re.match(r"^    ([│├└─ ]*?)(\w+Error)\b", line)
        if not match:
            continue
        depth = len(match[1]) // 4
        del stack[depth:]
        parents[match[2]] = stack[-1] if stack else None
        stack.append(match[2])
    return parents


def test_errors_all_is_sorted_and_complete() -> None:
    exported = bssagent.errors.__all__
    assert exported == sorted(exported)
    assert exported == EXPECTED_ERRORS
    defined = {
        name
        for name, obj in vars(bssagent.errors).items()
        if inspect.isclass(obj) and issubclass(obj, BaseException)
    }
    assert defined == set(EXPECTED_ERRORS)
    for name in EXPECTED_ERRORS:
        assert getattr(bssagent, name) is getattr(bssagent.errors, name)


def test_every_error_appears_in_the_docstring_tree_with_its_real_parent() -> None:
    tree = _docstring_tree()
    assert set(tree) == set(EXPECTED_ERRORS)
    for name, parent in tree.items():
        cls = getattr(bssagent.errors, name)
        if parent is None:
            assert cls.__bases__ == (Exception,)
        else:
            assert cls.__bases__[0] is getattr(bssagent.errors, parent), name


@pytest.mark.parametrize("name", ["SessionNotFoundError", "InvalidInputError", "UnknownFieldError"])
def test_value_errors(name: str) -> None:
    cls = getattr(bssagent, name)
    assert issubclass(cls, bssagent.BssAgentError)
    assert issubclass(cls, ValueError)


@pytest.mark.parametrize(
    "name",
    [
        "ConfigurationError",
        "ThreadBusyError",
        "StorageError",
        "StorageUnavailableError",
        "MigrationError",
    ],
)
def test_other_errors_are_not_value_errors(name: str) -> None:
    cls = getattr(bssagent, name)
    assert issubclass(cls, bssagent.BssAgentError)
    assert not issubclass(cls, ValueError)


def test_invalid_input_error_names_the_field() -> None:
    error = bssagent.InvalidInputError("user_id", "must not be empty")
    assert error.field == "user_id"
    assert str(error) == "user_id: must not be empty"
    unknown = bssagent.UnknownFieldError("updates", "unknown field(s) ['x']")
    assert isinstance(unknown, bssagent.InvalidInputError)
    assert unknown.field == "updates"


# -- the two managers -------------------------------------------------------------------------


def _public(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")}


def test_sync_and_async_managers_have_the_same_public_members() -> None:
    assert _public(AgentSessionManager) == _public(AsyncAgentSessionManager)
    assert SEED_METHODS | MULTI_CHAT_METHODS | {"close", "health"} <= _public(AgentSessionManager)
    assert {"settings", "namespace", "backend", "is_degraded"} <= _public(AgentSessionManager)
    assert hasattr(AgentSessionManager, "__enter__")
    assert hasattr(AsyncAgentSessionManager, "__aenter__")


def test_async_manager_methods_are_coroutines_and_sync_ones_are_not() -> None:
    for name in sorted(SEED_METHODS | MULTI_CHAT_METHODS | {"close", "health"}):
        sync_fn = getattr(AgentSessionManager, name)
        async_fn = getattr(AsyncAgentSessionManager, name)
        assert not inspect.iscoroutinefunction(sync_fn), name
        assert inspect.iscoroutinefunction(async_fn) is (name not in NOT_AWAITED), name
        sync_params = list(inspect.signature(sync_fn).parameters.values())
        async_params = list(inspect.signature(async_fn).parameters.values())
        assert [(p.name, p.kind, p.default) for p in sync_params] == [
            (p.name, p.kind, p.default) for p in async_params
        ], name
