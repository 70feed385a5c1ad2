-- bssagent 0001: the session registry (SQLite).
--
-- Apply by hand with: sqlite3 .bssagent/bssagent.db < sql/sqlite/0001_user_sessions.sql
-- "user_sessions" is the default table name; when BSSAGENT_TABLE_NAME is set, the library
-- substitutes it here (and in the index names) before running the file.
-- Timestamps are ISO 8601 UTC strings written by the library.

CREATE TABLE IF NOT EXISTS user_sessions (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace   TEXT    NOT NULL DEFAULT 'default',
    user_id     TEXT    NOT NULL,
    thread_id   TEXT    NOT NULL UNIQUE,
    title       TEXT    NOT NULL,
    metadata    TEXT    NOT NULL DEFAULT '{}',
    created_at  TEXT    NOT NULL,
    updated_at  TEXT    NOT NULL,
    is_active   INTEGER NOT NULL DEFAULT 1
);

CREATE UNIQUE INDEX IF NOT EXISTS user_sessions_one_active_idx
    ON user_sessions (namespace, user_id) WHERE is_active;

CREATE INDEX IF NOT EXISTS user_sessions_user_idx
    ON user_sessions (namespace, user_id, id DESC);

CREATE INDEX IF NOT EXISTS user_sessions_active_idx
    ON user_sessions (namespace, id DESC) WHERE is_active;
