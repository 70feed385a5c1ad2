"""Input validation, pure and I/O-free.

Every public entry point validates its arguments here before touching storage, so bad
input fails fast with an :class:`~bssagent.errors.InvalidInputError` naming the field,
nothing is written, and the storage fallback is never triggered by a caller's mistake.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigurationError, InvalidInputError, UnknownFieldError

MAX_ID_LENGTH = 255
MAX_TITLE_LENGTH = 255
MAX_NAMESPACE_LENGTH = 64
MAX_METADATA_BYTES = 16 * 1024
MAX_PAGE_SIZE = 1000
UPDATABLE_FIELDS = frozenset({"title", "metadata"})
MAX_PREFERENCES = 100
SCOPES = ("user", "session", "app")

# C0/C1 control characters (NUL included) and lone surrogates: PostgreSQL rejects NUL,
# UTF-8 cannot encode surrogates, and control characters have no business in ids.
_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Leave room for the longest index-name suffix within PostgreSQL's 63-byte limit.
MAX_TABLE_NAME_LENGTH = 40


def _text(field: str, value: object, max_length: int) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(field, f"must be a string, not {type(value).__name__}")
    if not value or value.isspace():
        raise InvalidInputError(field, "must not be empty")
    if len(value) > max_length:
        raise InvalidInputError(field, f"must be at most {max_length} characters")
    if _FORBIDDEN.search(value):
        raise InvalidInputError(field, "must not contain control characters or lone surrogates")
    return value


def user_id(value: object) -> str:
    """Return ``value`` if it is a valid user id: 1-255 printable characters."""
    return _text("user_id", value, MAX_ID_LENGTH)


def title(value: object) -> str:
    """Return ``value`` if it is a valid session title: 1-255 printable characters."""
    return _text("title", value, MAX_TITLE_LENGTH)


def namespace(value: object) -> str:
    """Return ``value`` if it is a valid namespace: 1-64 printable characters."""
    return _text("namespace", value, MAX_NAMESPACE_LENGTH)


def thread_id(value: object) -> str:
    """Return ``value`` if it is a canonical (lower-case, hyphenated) UUID string."""
    if not isinstance(value, str):
        raise InvalidInputError("thread_id", f"must be a string, not {type(value).__name__}")
    try:
        parsed = uuid.UUID(value) if len(value) == 36 else None
    except ValueError:
        parsed = None
    if parsed is None or str(parsed) != value:
        raise InvalidInputError("thread_id", "must be a canonical UUID string")
    return value


def metadata(value: object, field: str = "metadata") -> dict[str, Any]:
    """Return a copy of ``value`` if it is a JSON object of at most 16 KiB.

    Values must be JSON-encodable without NaN or infinity (keys become strings, as JSON
    makes them); no string may contain NUL or a lone surrogate (PostgreSQL ``jsonb``
    rejects both). The copy is what gets stored, so later changes to ``value`` do not leak.
    """
    if not isinstance(value, Mapping):
        raise InvalidInputError(field, f"must be a JSON object, not {type(value).__name__}")
    try:
        encoded = json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(field, f"must be JSON-encodable: {exc}") from None
    try:
        size = len(encoded.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInputError(field, "must not contain lone surrogates") from None
    if size > MAX_METADATA_BYTES:
        raise InvalidInputError(field, f"must encode to at most {MAX_METADATA_BYTES} bytes")
    result: dict[str, Any] = json.loads(encoded)
    if _has_nul(result):
        raise InvalidInputError(field, "must not contain NUL characters")
    return result


def _has_nul(value: object) -> bool:
    """Whether a decoded JSON value holds a NUL in any key or string."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def updates(value: object) -> dict[str, Any]:
    """Validate an ``update_session`` payload: only ``title`` and ``metadata``, at least one."""
    if not isinstance(value, Mapping):
        raise InvalidInputError("updates", f"must be a mapping, not {type(value).__name__}")
    unknown = sorted(str(k) for k in value if k not in UPDATABLE_FIELDS)
    if unknown:
        raise UnknownFieldError(
            "updates", f"unknown field(s) {unknown}; allowed: {sorted(UPDATABLE_FIELDS)}"
        )
    if not value:
        raise InvalidInputError("updates", "must contain at least one of title, metadata")
    checked: dict[str, Any] = {}
    if "title" in value:
        checked["title"] = title(value["title"])
    if "metadata" in value:
        checked["metadata"] = metadata(value["metadata"])
    return checked


def preferences(value: object) -> dict[str, Any]:
    """Return a copy of ``value`` if it is a preferences update: at most 100 names (1-255
    printable characters) to JSON values (``None`` removes the name), 16 KiB in all."""
    checked = metadata(value, field="preferences")
    if len(checked) > MAX_PREFERENCES:
        raise InvalidInputError("preferences", f"must hold at most {MAX_PREFERENCES} names")
    for name in checked:
        _text("preferences", name, MAX_ID_LENGTH)
    return checked


def scope(value: object) -> str:
    """Return ``value`` if it is a preferences scope: ``user``, ``session`` or ``app``."""
    if value not in SCOPES:
        raise InvalidInputError("scope", f"must be one of {', '.join(SCOPES)}")
    return str(value)


def limit(value: object) -> int:
    """Return ``value`` if it is a page size between 1 and 1000."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PAGE_SIZE:
        raise InvalidInputError("limit", f"must be an integer between 1 and {MAX_PAGE_SIZE}")
    return value


def cursor(value: object, field: str = "before_id") -> int | None:
    """Return ``value`` if it is ``None`` or a positive integer (a keyset cursor)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(field, "must be None or a positive integer")
    return value


def duration(value: object, field: str = "processing_time") -> float:
    """Return ``value`` as seconds if it is a finite, non-negative number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e12:
        raise InvalidInputError(field, "must be a finite, non-negative number of seconds")
    return float(value)


def flag(field: str, value: object) -> bool:
    """Return ``value`` if it is a bool."""
    if not isinstance(value, bool):
        raise InvalidInputError(field, "must be True or False")
    return value


def table_name(value: object) -> str:
    """Return ``value`` if it is a plain SQL identifier of at most 40 characters."""
    if (
        not isinstance(value, str)
        or len(value) > MAX_TABLE_NAME_LENGTH
        or not _IDENTIFIER.fullmatch(value)
    ):
        raise ConfigurationError(
            f"table_name must match [A-Za-z_][A-Za-z0-9_]* and be at most "
            f"{MAX_TABLE_NAME_LENGTH} characters, got {value!r}"
        )
    return value
