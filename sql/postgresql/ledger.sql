-- bssagent migration ledger (PostgreSQL). Applied before any migration, under the
-- migration lock. One row per (target table, migration version) applied.
CREATE TABLE IF NOT EXISTS bssagent_migrations (
    target      VARCHAR(128) NOT NULL,
    version     INTEGER      NOT NULL,
    name        VARCHAR(255) NOT NULL,
    applied_at  TIMESTAMPTZ  NOT NULL DEFAULT now(),
    PRIMARY KEY (target, version)
);
