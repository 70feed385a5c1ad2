-- bssagent 0001: the session registry (PostgreSQL).
--
-- Apply by hand with: psql "$DATABASE_URL" -f sql/postgresql/0001_user_sessions.sql
-- "user_sessions" is the default table name; when BSSAGENT_TABLE_NAME is set, the library
-- substitutes it here (and in the index names) before running the file.

CREATE TABLE IF NOT EXISTS user_sessions (
    id          BIGSERIAL    PRIMARY KEY,
    namespace   VARCHAR(64)  NOT NULL DEFAULT 'default',
    user_id     VARCHAR(255) NOT NULL,
    thread_id   VARCHAR(255) NOT NULL,
    title       VARCHAR(255) NOT NULL,
    metadata    JSONB        NOT NULL DEFAULT '{}'::jsonb,
    created_at  TIMESTAMPTZ  NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ  NOT NULL DEFAULT now(),
    is_active   BOOLEAN      NOT NULL DEFAULT TRUE,
    CONSTRAINT user_sessions_thread_id_key UNIQUE (thread_id)
);

-- At most one current session per (namespace, user): the database enforces it, and
-- get-or-create relies on it through INSERT ... ON CONFLICT (namespace, user_id) WHERE is_active.
CREATE UNIQUE INDEX IF NOT EXISTS user_sessions_one_active_idx
    ON user_sessions (namespace, user_id) WHERE is_active;

-- A user's sessions, newest first (list_user_sessions, ownership checks by user).
CREATE INDEX IF NOT EXISTS user_sessions_user_idx
    ON user_sessions (namespace, user_id, id DESC);

-- Active sessions of a namespace, newest first (list_active_sessions keyset pages).
CREATE INDEX IF NOT EXISTS user_sessions_active_idx
    ON user_sessions (namespace, id DESC) WHERE is_active;
