-- bssagent 0002: session lifecycle (SQLite): states, per-session metrics, parent/child
-- sessions, an append-only event log, cheap aggregate statistics, and deletion tombstones.
-- Statistics and events are kept by triggers, so every write path keeps them exact.

ALTER TABLE user_sessions ADD COLUMN status TEXT NOT NULL DEFAULT 'active'
    CHECK (status IN ('active', 'paused', 'completed', 'failed', 'expired'));
ALTER TABLE user_sessions ADD COLUMN request_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE user_sessions ADD COLUMN error_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE user_sessions ADD COLUMN total_processing_time REAL NOT NULL DEFAULT 0;
ALTER TABLE user_sessions ADD COLUMN last_activity_at TEXT NOT NULL DEFAULT '';
ALTER TABLE user_sessions ADD COLUMN ended_at TEXT;
ALTER TABLE user_sessions ADD COLUMN retained_at TEXT;
ALTER TABLE user_sessions ADD COLUMN parent_thread_id TEXT;

UPDATE user_sessions SET last_activity_at = updated_at WHERE last_activity_at = '';

CREATE INDEX IF NOT EXISTS user_sessions_idle_idx
    ON user_sessions (namespace, last_activity_at) WHERE status IN ('active', 'paused');
CREATE INDEX IF NOT EXISTS user_sessions_retention_idx
    ON user_sessions (namespace, ended_at) WHERE ended_at IS NOT NULL AND retained_at IS NULL;
CREATE INDEX IF NOT EXISTS user_sessions_parent_idx
    ON user_sessions (parent_thread_id, id DESC) WHERE parent_thread_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS user_sessions_stats (
    namespace         TEXT    NOT NULL,
    shard             INTEGER NOT NULL,
    sessions          INTEGER NOT NULL DEFAULT 0,
    current_sessions  INTEGER NOT NULL DEFAULT 0,
    open_sessions     INTEGER NOT NULL DEFAULT 0,
    requests          INTEGER NOT NULL DEFAULT 0,
    errors            INTEGER NOT NULL DEFAULT 0,
    processing_time   REAL    NOT NULL DEFAULT 0,
    PRIMARY KEY (namespace, shard)
);

INSERT INTO user_sessions_stats
    (namespace, shard, sessions, current_sessions, open_sessions, requests, errors,
     processing_time)
SELECT namespace, 0, count(*), sum(is_active), sum(status IN ('active', 'paused')),
       sum(request_count), sum(error_count), sum(total_processing_time)
FROM user_sessions GROUP BY namespace;

CREATE TABLE IF NOT EXISTS user_sessions_events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace   TEXT    NOT NULL,
    user_id     TEXT    NOT NULL,
    thread_id   TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    payload     TEXT    NOT NULL DEFAULT '{}',
    created_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'))
);
CREATE INDEX IF NOT EXISTS user_sessions_events_user_idx
    ON user_sessions_events (namespace, user_id, thread_id, seq);

CREATE TABLE IF NOT EXISTS user_sessions_tombstones (
    thread_id   TEXT PRIMARY KEY,
    deleted_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    swept_at    TEXT
);
CREATE INDEX IF NOT EXISTS user_sessions_tombstones_unswept_idx
    ON user_sessions_tombstones (deleted_at) WHERE swept_at IS NULL;

CREATE TRIGGER IF NOT EXISTS user_sessions_track_insert AFTER INSERT ON user_sessions
BEGIN
    INSERT INTO user_sessions_stats
        (namespace, shard, sessions, current_sessions, open_sessions, requests, errors,
         processing_time)
    VALUES (NEW.namespace, 0, 1, NEW.is_active, NEW.status IN ('active', 'paused'),
            NEW.request_count, NEW.error_count, NEW.total_processing_time)
    ON CONFLICT (namespace, shard) DO UPDATE SET
        sessions = sessions + excluded.sessions,
        current_sessions = current_sessions + excluded.current_sessions,
        open_sessions = open_sessions + excluded.open_sessions,
        requests = requests + excluded.requests,
        errors = errors + excluded.errors,
        processing_time = processing_time + excluded.processing_time;
    INSERT INTO user_sessions_events (namespace, user_id, thread_id, kind, payload)
    VALUES (NEW.namespace, NEW.user_id, NEW.thread_id, 'created',
            CASE WHEN NEW.parent_thread_id IS NULL THEN '{}'
                 ELSE json_object('parent_thread_id', NEW.parent_thread_id) END);
END;

CREATE TRIGGER IF NOT EXISTS user_sessions_track_update AFTER UPDATE ON user_sessions
BEGIN
    INSERT INTO user_sessions_stats
        (namespace, shard, sessions, current_sessions, open_sessions, requests, errors,
         processing_time)
    SELECT NEW.namespace, 0, 0, NEW.is_active - OLD.is_active,
           (NEW.status IN ('active', 'paused')) - (OLD.status IN ('active', 'paused')),
           NEW.request_count - OLD.request_count, NEW.error_count - OLD.error_count,
           NEW.total_processing_time - OLD.total_processing_time
    WHERE NEW.is_active <> OLD.is_active OR NEW.status <> OLD.status
       OR NEW.request_count <> OLD.request_count
    ON CONFLICT (namespace, shard) DO UPDATE SET
        current_sessions = current_sessions + excluded.current_sessions,
        open_sessions = open_sessions + excluded.open_sessions,
        requests = requests + excluded.requests,
        errors = errors + excluded.errors,
        processing_time = processing_time + excluded.processing_time;
    INSERT INTO user_sessions_events (namespace, user_id, thread_id, kind, payload)
    SELECT NEW.namespace, NEW.user_id, NEW.thread_id, kind, payload FROM (
        SELECT CASE
                   WHEN NEW.status <> OLD.status THEN
                       CASE NEW.status WHEN 'paused' THEN 'paused' WHEN 'active' THEN 'resumed'
                                       WHEN 'expired' THEN 'expired' ELSE 'ended' END
                   WHEN NEW.is_active AND NOT OLD.is_active THEN 'switched'
                   WHEN OLD.is_active AND NOT NEW.is_active THEN 'deactivated'
                   WHEN NEW.error_count > OLD.error_count THEN 'error'
                   WHEN NEW.title <> OLD.title OR NEW.metadata <> OLD.metadata THEN 'updated'
               END AS kind,
               CASE
                   WHEN NEW.status <> OLD.status THEN
                       json_object('from', OLD.status, 'to', NEW.status)
                   WHEN NEW.is_active <> OLD.is_active THEN '{}'
                   WHEN NEW.error_count > OLD.error_count THEN
                       json_object('error_count', NEW.error_count)
                   WHEN NEW.title <> OLD.title AND NEW.metadata <> OLD.metadata THEN
                       json_object('fields', json_array('title', 'metadata'))
                   WHEN NEW.title <> OLD.title THEN json_object('fields', json_array('title'))
                   ELSE json_object('fields', json_array('metadata'))
               END AS payload
    ) WHERE kind IS NOT NULL;
END;

CREATE TRIGGER IF NOT EXISTS user_sessions_track_delete AFTER DELETE ON user_sessions
BEGIN
    INSERT INTO user_sessions_stats
        (namespace, shard, sessions, current_sessions, open_sessions, requests, errors,
         processing_time)
    VALUES (OLD.namespace, 0, -1, -OLD.is_active, -(OLD.status IN ('active', 'paused')),
            -OLD.request_count, -OLD.error_count, -OLD.total_processing_time)
    ON CONFLICT (namespace, shard) DO UPDATE SET
        sessions = sessions + excluded.sessions,
        current_sessions = current_sessions + excluded.current_sessions,
        open_sessions = open_sessions + excluded.open_sessions,
        requests = requests + excluded.requests,
        errors = errors + excluded.errors,
        processing_time = processing_time + excluded.processing_time;
    INSERT INTO user_sessions_events (namespace, user_id, thread_id, kind, payload)
    VALUES (OLD.namespace, OLD.user_id, OLD.thread_id, 'deleted', '{}');
    INSERT INTO user_sessions_tombstones (thread_id) VALUES (OLD.thread_id)
    ON CONFLICT (thread_id) DO NOTHING;
END;
