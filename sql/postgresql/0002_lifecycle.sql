-- bssagent 0002: session lifecycle (PostgreSQL): states, per-session metrics, parent/child
-- sessions, an append-only event log, cheap aggregate statistics, and deletion tombstones.
--
-- Statistics and events are kept by statement-level triggers, so every write path (single
-- calls, batch expiry, deletes, hand-written SQL) keeps them exact, at one upsert per
-- statement rather than per row.

ALTER TABLE user_sessions
    ADD COLUMN IF NOT EXISTS status                VARCHAR(16)      NOT NULL DEFAULT 'active',
    ADD COLUMN IF NOT EXISTS request_count         BIGINT           NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS error_count           BIGINT           NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS total_processing_time DOUBLE PRECISION NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS last_activity_at      TIMESTAMPTZ      NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS ended_at              TIMESTAMPTZ,
    ADD COLUMN IF NOT EXISTS retained_at           TIMESTAMPTZ,
    ADD COLUMN IF NOT EXISTS parent_thread_id      VARCHAR(255);

UPDATE user_sessions SET last_activity_at = updated_at WHERE last_activity_at > updated_at;

ALTER TABLE user_sessions
    ADD CONSTRAINT user_sessions_status_check
        CHECK (status IN ('active', 'paused', 'completed', 'failed', 'expired')),
    -- The current session is always an open one.
    ADD CONSTRAINT user_sessions_current_is_open_check
        CHECK (NOT is_active OR status IN ('active', 'paused'));

-- Expiry: open sessions by idleness, oldest first (cleanup_inactive_sessions).
CREATE INDEX IF NOT EXISTS user_sessions_idle_idx
    ON user_sessions (namespace, last_activity_at) WHERE status IN ('active', 'paused');
-- Retention: ended sessions whose checkpoints have not been pruned yet.
CREATE INDEX IF NOT EXISTS user_sessions_retention_idx
    ON user_sessions (namespace, ended_at) WHERE ended_at IS NOT NULL AND retained_at IS NULL;
-- Children of a session.
CREATE INDEX IF NOT EXISTS user_sessions_parent_idx
    ON user_sessions (parent_thread_id, id DESC) WHERE parent_thread_id IS NOT NULL;

-- Aggregates per namespace, in 16 shards (by thread) so concurrent writers rarely meet.
CREATE TABLE IF NOT EXISTS user_sessions_stats (
    namespace         VARCHAR(64)      NOT NULL,
    shard             SMALLINT         NOT NULL,
    sessions          BIGINT           NOT NULL DEFAULT 0,
    current_sessions  BIGINT           NOT NULL DEFAULT 0,
    open_sessions     BIGINT           NOT NULL DEFAULT 0,
    requests          BIGINT           NOT NULL DEFAULT 0,
    errors            BIGINT           NOT NULL DEFAULT 0,
    processing_time   DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (namespace, shard)
);

INSERT INTO user_sessions_stats AS s
    (namespace, shard, sessions, current_sessions, open_sessions, requests, errors,
     processing_time)
SELECT namespace, hashtext(thread_id) & 15, count(*), count(*) FILTER (WHERE is_active),
       count(*) FILTER (WHERE status IN ('active', 'paused')), sum(request_count),
       sum(error_count), sum(total_processing_time)
FROM user_sessions GROUP BY 1, 2
ON CONFLICT (namespace, shard) DO NOTHING;

-- The event log: append-only; seq orders it. Payloads are small and never hold messages.
CREATE TABLE IF NOT EXISTS user_sessions_events (
    seq         BIGSERIAL    PRIMARY KEY,
    namespace   VARCHAR(64)  NOT NULL,
    user_id     VARCHAR(255) NOT NULL,
    thread_id   VARCHAR(255) NOT NULL,
    kind        VARCHAR(32)  NOT NULL,
    payload     JSONB        NOT NULL DEFAULT '{}'::jsonb,
    created_at  TIMESTAMPTZ  NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS user_sessions_events_user_idx
    ON user_sessions_events (namespace, user_id, thread_id, seq);

-- Deleted threads: a late write to one must not bring it back. Thread ids only (no user).
-- swept_at: when the thread's LangGraph checkpoints were deleted too (an outbox: a crash
-- between the two deletions is finished by the next sweep).
CREATE TABLE IF NOT EXISTS user_sessions_tombstones (
    thread_id   VARCHAR(255) PRIMARY KEY,
    deleted_at  TIMESTAMPTZ  NOT NULL DEFAULT now(),
    swept_at    TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS user_sessions_tombstones_unswept_idx
    ON user_sessions_tombstones (deleted_at) WHERE swept_at IS NULL;

CREATE OR REPLACE FUNCTION user_sessions_track_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO user_sessions_stats AS s
        (namespace, shard, sessions, current_sessions, open_sessions, requests, errors,
         processing_time)
    SELECT namespace, hashtext(thread_id) & 15, count(*), count(*) FILTER (WHERE is_active),
           count(*) FILTER (WHERE status IN ('active', 'paused')), sum(request_count),
           sum(error_count), sum(total_processing_time)
    FROM new_rows GROUP BY 1, 2 ORDER BY 1, 2  -- one lock order for the shards
    ON CONFLICT (namespace, shard) DO UPDATE SET
        sessions = s.sessions + EXCLUDED.sessions,
        current_sessions = s.current_sessions + EXCLUDED.current_sessions,
        open_sessions = s.open_sessions + EXCLUDED.open_sessions,
        requests = s.requests + EXCLUDED.requests,
        errors = s.errors + EXCLUDED.errors,
        processing_time = s.processing_time + EXCLUDED.processing_time;
    INSERT INTO user_sessions_events (namespace, user_id, thread_id, kind, payload)
    SELECT namespace, user_id, thread_id, 'created',
           CASE WHEN parent_thread_id IS NULL THEN '{}'::jsonb
                ELSE jsonb_build_object('parent_thread_id', parent_thread_id) END
    FROM new_rows ORDER BY id;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION user_sessions_track_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO user_sessions_stats AS s
        (namespace, shard, sessions, current_sessions, open_sessions, requests, errors,
         processing_time)
    SELECT n.namespace, hashtext(n.thread_id) & 15, 0,
           sum(n.is_active::int - o.is_active::int),
           sum((n.status IN ('active', 'paused'))::int - (o.status IN ('active', 'paused'))::int),
           sum(n.request_count - o.request_count), sum(n.error_count - o.error_count),
           sum(n.total_processing_time - o.total_processing_time)
    FROM new_rows n JOIN old_rows o USING (id) GROUP BY 1, 2
    HAVING bool_or(n.is_active <> o.is_active OR n.status <> o.status
                   OR n.request_count <> o.request_count)
    ORDER BY 1, 2
    ON CONFLICT (namespace, shard) DO UPDATE SET
        current_sessions = s.current_sessions + EXCLUDED.current_sessions,
        open_sessions = s.open_sessions + EXCLUDED.open_sessions,
        requests = s.requests + EXCLUDED.requests,
        errors = s.errors + EXCLUDED.errors,
        processing_time = s.processing_time + EXCLUDED.processing_time;
    INSERT INTO user_sessions_events (namespace, user_id, thread_id, kind, payload)
    SELECT namespace, user_id, thread_id, kind, payload FROM (
        SELECT n.id, n.namespace, n.user_id, n.thread_id,
               CASE
                   WHEN n.status <> o.status THEN
                       CASE n.status WHEN 'paused' THEN 'paused' WHEN 'active' THEN 'resumed'
                                     WHEN 'expired' THEN 'expired' ELSE 'ended' END
                   WHEN n.is_active AND NOT o.is_active THEN 'switched'
                   WHEN o.is_active AND NOT n.is_active THEN 'deactivated'
                   WHEN n.error_count > o.error_count THEN 'error'
                   WHEN n.title <> o.title OR n.metadata <> o.metadata THEN 'updated'
               END AS kind,
               CASE
                   WHEN n.status <> o.status THEN
                       jsonb_build_object('from', o.status, 'to', n.status)
                   WHEN n.is_active <> o.is_active THEN '{}'::jsonb
                   WHEN n.error_count > o.error_count THEN
                       jsonb_build_object('error_count', n.error_count)
                   ELSE jsonb_build_object('fields', to_jsonb(array_remove(ARRAY[
                       CASE WHEN n.title <> o.title THEN 'title' END,
                       CASE WHEN n.metadata <> o.metadata THEN 'metadata' END], NULL)))
               END AS payload
        FROM new_rows n JOIN old_rows o USING (id)
    ) AS changes WHERE kind IS NOT NULL ORDER BY id;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION user_sessions_track_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO user_sessions_stats AS s
        (namespace, shard, sessions, current_sessions, open_sessions, requests, errors,
         processing_time)
    SELECT namespace, hashtext(thread_id) & 15, -count(*), -count(*) FILTER (WHERE is_active),
           -count(*) FILTER (WHERE status IN ('active', 'paused')), -sum(request_count),
           -sum(error_count), -sum(total_processing_time)
    FROM old_rows GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (namespace, shard) DO UPDATE SET
        sessions = s.sessions + EXCLUDED.sessions,
        current_sessions = s.current_sessions + EXCLUDED.current_sessions,
        open_sessions = s.open_sessions + EXCLUDED.open_sessions,
        requests = s.requests + EXCLUDED.requests,
        errors = s.errors + EXCLUDED.errors,
        processing_time = s.processing_time + EXCLUDED.processing_time;
    INSERT INTO user_sessions_events (namespace, user_id, thread_id, kind, payload)
    SELECT namespace, user_id, thread_id, 'deleted', '{}'::jsonb FROM old_rows ORDER BY id;
    INSERT INTO user_sessions_tombstones (thread_id)
    SELECT thread_id FROM old_rows ON CONFLICT (thread_id) DO NOTHING;
    RETURN NULL;
END $$;

CREATE TRIGGER user_sessions_track_insert_trg AFTER INSERT ON user_sessions
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION user_sessions_track_insert();
CREATE TRIGGER user_sessions_track_update_trg AFTER UPDATE ON user_sessions
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION user_sessions_track_update();
CREATE TRIGGER user_sessions_track_delete_trg AFTER DELETE ON user_sessions
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION user_sessions_track_delete();
