-- bssagent 0003: change notifications (PostgreSQL), for the caches of other processes.
--
-- After a statement changes who is current, a session's state, title or metadata, or deletes
-- sessions, one NOTIFY on channel "<table>_changes" per changed user:
--     {"origin": <the writer's bssagent.origin>, "namespace": ..., "user_id": ...}
-- or, for a bulk change (more than 20 users, as an expiry batch), one per namespace without
-- "user_id": listeners forget the whole namespace. Request counters alone notify nothing:
-- a cached session is trusted for who is current, not for its counters. NOTIFY is
-- transactional: listeners hear of a change only once it is committed.

CREATE OR REPLACE FUNCTION user_sessions_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    channel text := TG_TABLE_NAME || '_changes';
    origin text := coalesce(current_setting('bssagent.origin', true), '');
    users jsonb;
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT jsonb_agg(DISTINCT jsonb_build_array(namespace, user_id)) INTO users
        FROM new_rows;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT jsonb_agg(DISTINCT jsonb_build_array(namespace, user_id)) INTO users
        FROM old_rows;
    ELSE
        SELECT jsonb_agg(DISTINCT jsonb_build_array(n.namespace, n.user_id)) INTO users
        FROM new_rows n JOIN old_rows o USING (id)
        WHERE n.is_active <> o.is_active OR n.status <> o.status OR n.title <> o.title
              OR n.metadata <> o.metadata;
    END IF;
    IF users IS NULL THEN
        RETURN NULL;
    END IF;
    IF jsonb_array_length(users) > 20 THEN
        PERFORM pg_notify(channel, jsonb_build_object('origin', origin, 'namespace', ns)::text)
        FROM (SELECT DISTINCT u ->> 0 AS ns FROM jsonb_array_elements(users) AS u) AS spaces;
    ELSE
        PERFORM pg_notify(channel, jsonb_build_object(
                    'origin', origin, 'namespace', u ->> 0, 'user_id', u ->> 1)::text)
        FROM jsonb_array_elements(users) AS u;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER user_sessions_notify_insert_trg AFTER INSERT ON user_sessions
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION user_sessions_notify();
CREATE TRIGGER user_sessions_notify_update_trg AFTER UPDATE ON user_sessions
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION user_sessions_notify();
CREATE TRIGGER user_sessions_notify_delete_trg AFTER DELETE ON user_sessions
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION user_sessions_notify();
