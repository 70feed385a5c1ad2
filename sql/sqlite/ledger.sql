-- bssagent migration ledger (SQLite). One row per (target table, migration version) applied.
CREATE TABLE IF NOT EXISTS bssagent_migrations (
    target      TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    name        TEXT    NOT NULL,
    applied_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (target, version)
);
