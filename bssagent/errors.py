"""Every error bssagent raises, in one tree.

Catch :class:`BssAgentError` to handle anything the library raises on purpose. Driver
errors (psycopg, sqlite3) never escape raw: they are wrapped in a :class:`StorageError`
subclass with the original chained as ``__cause__``.

::

    BssAgentError
    ├── ConfigurationError            settings that cannot work (bad URL, bad table name)
    ├── InvalidInputError             (also ValueError) bad argument, before any I/O; ``.field``
    │   └── UnknownFieldError         ``update_session`` got a field it does not accept
    ├── SessionNotFoundError          (also ValueError) no such session for this user, or not theirs
    ├── InvalidTransitionError        (also ValueError) e.g. resuming a completed session
    ├── SessionLimitError             max_sessions_per_user / max_active_sessions reached
    ├── ThreadBusyError               a run already holds the thread (``reject`` strategy)
    └── StorageError                  the storage backend failed; ``__cause__`` is the driver error
        ├── StorageUnavailableError   connection-class failure: server down, unreachable, timed out
        │   └── JournalFullError      the outage journal is full (``journal_limit``): write refused
        └── MigrationError            the schema could not be brought up to date

Only :class:`StorageUnavailableError` moves a manager into its memory-only fallback. Bad
input, constraint violations and programming errors never do.
"""

from __future__ import annotations

__all__ = [
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


class BssAgentError(Exception):
    """Root of every error raised by bssagent."""


class ConfigurationError(BssAgentError):
    """The configuration cannot work: an unknown URL scheme, an invalid table name, ..."""


class InvalidInputError(BssAgentError, ValueError):
    """An argument failed validation. Nothing was read or written.

    Attributes:
        field: The name of the offending argument (``"user_id"``, ``"title"``, ...).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class UnknownFieldError(InvalidInputError):
    """``update_session`` was given a field it does not accept. Nothing was written."""


class SessionNotFoundError(BssAgentError, ValueError):
    """The user has no such session.

    Raised both when a session does not exist and when it belongs to someone else: the
    two cases are deliberately indistinguishable, so thread ids cannot be probed.
    """


class InvalidTransitionError(BssAgentError, ValueError):
    """The session's state does not allow the change (see :mod:`bssagent.sessions.lifecycle`).
    Nothing was written."""


class SessionLimitError(BssAgentError):
    """A session limit is reached: ``max_sessions_per_user`` (with the ``raise`` policy, or
    nothing ended left to purge) or ``max_active_sessions`` (after trying a cleanup)."""


class ThreadBusyError(BssAgentError):
    """Another run holds the thread's run lock and the strategy is ``reject``."""


class StorageError(BssAgentError):
    """The storage backend failed. The driver's exception is chained as ``__cause__``."""


class StorageUnavailableError(StorageError):
    """The backend cannot be reached: refused, reset, timed out, shutting down."""


class JournalFullError(StorageUnavailableError):
    """The database is down and what was written meanwhile, kept for replay, reached
    ``journal_limit``: this write (a new session, a new conversation, a store write) is
    refused rather than accepted and lost. Writes already accepted are replayed when the
    database returns."""


class MigrationError(StorageError):
    """The schema migrations could not be applied (or the migration lock not taken)."""


# Public module path in tracebacks, as httpx and psycopg_pool do.
for _name in __all__:
    globals()[_name].__module__ = "bssagent"
del _name
