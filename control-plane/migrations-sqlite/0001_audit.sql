-- The audit projections of a single node (`audit_db_url = "sqlite:PATH"`,
-- what `gatehouse dev` uses without --audit-db): the tables of the
-- PostgreSQL schema (../migrations), in SQLite's types. Ids are uuids as
-- 16-byte BLOBs; times are TEXT in RFC 3339 UTC with six fraction digits
-- (2026-12-07T18:00:00.123456Z), so that text order is time order; JSON
-- and arrays are JSON TEXT. Like there, every table is derived from the
-- event log and can be rebuilt by replaying it.

CREATE TABLE events (
    event_id   BLOB PRIMARY KEY,
    type       TEXT    NOT NULL,
    time       TEXT    NOT NULL,
    session_id BLOB,
    seq        INTEGER NOT NULL,
    body       TEXT    NOT NULL
);
CREATE INDEX events_time ON events (time DESC, event_id DESC);
CREATE INDEX events_session ON events (session_id, seq) WHERE session_id IS NOT NULL;

CREATE TABLE sessions (
    session_id        BLOB PRIMARY KEY,
    worker_id         TEXT NOT NULL,
    identity_subject  TEXT,
    identity_username TEXT,
    identity_issuer   TEXT,
    groups            TEXT NOT NULL DEFAULT '[]',
    delegation        TEXT,
    target            TEXT,
    client_addr       TEXT,
    client_tls        INTEGER,
    target_tls        INTEGER,
    application_name  TEXT,
    opened_at         TEXT,
    closed_at         TEXT,
    close_reason      TEXT,
    commands          INTEGER,
    bytes_from_client INTEGER,
    bytes_to_client   INTEGER,
    time TEXT GENERATED ALWAYS AS (coalesce(opened_at, closed_at)) STORED,
    CHECK (opened_at IS NOT NULL OR closed_at IS NOT NULL)
);
CREATE INDEX sessions_time ON sessions (time DESC, session_id DESC);
CREATE INDEX sessions_subject ON sessions (identity_subject, time DESC, session_id DESC);
CREATE INDEX sessions_username ON sessions (identity_username, time DESC, session_id DESC);
CREATE INDEX sessions_target ON sessions (target, time DESC, session_id DESC);

CREATE TABLE commands (
    event_id          BLOB PRIMARY KEY,
    session_id        BLOB,
    seq               INTEGER NOT NULL,
    time              TEXT    NOT NULL,
    identity_subject  TEXT,
    identity_username TEXT,
    delegation        TEXT,
    target            TEXT,
    protocol          TEXT    NOT NULL,
    statement         TEXT    NOT NULL,
    statement_name    TEXT,
    portal            TEXT,
    params            TEXT    NOT NULL DEFAULT '[]',
    executes          TEXT,
    effect            TEXT,
    enforced          INTEGER,
    decision          TEXT
);
CREATE INDEX commands_time ON commands (time DESC, event_id DESC);
CREATE INDEX commands_subject ON commands (identity_subject, time DESC, event_id DESC);
CREATE INDEX commands_username ON commands (identity_username, time DESC, event_id DESC);
CREATE INDEX commands_target ON commands (target, time DESC, event_id DESC);
CREATE INDEX commands_session ON commands (session_id, seq);
CREATE INDEX commands_effect ON commands (effect, time DESC, event_id DESC);

CREATE TABLE authentication_failures (
    event_id         BLOB PRIMARY KEY,
    time             TEXT    NOT NULL,
    client_addr      TEXT    NOT NULL,
    client_tls       INTEGER NOT NULL,
    claimed_user     TEXT,
    requested_target TEXT,
    reason           TEXT    NOT NULL
);
CREATE INDEX authentication_failures_time ON authentication_failures (time DESC, event_id DESC);

CREATE TABLE policy_bundles (
    event_id     BLOB PRIMARY KEY,
    time         TEXT    NOT NULL,
    version      TEXT    NOT NULL,
    hash         TEXT    NOT NULL,
    files        TEXT    NOT NULL,
    dry_run      INTEGER NOT NULL,
    published_by TEXT    NOT NULL
);
CREATE INDEX policy_bundles_time ON policy_bundles (time DESC, event_id DESC);

CREATE TABLE revocations (
    event_id   BLOB PRIMARY KEY,
    time       TEXT NOT NULL,
    kind       TEXT NOT NULL,
    value      TEXT NOT NULL,
    revoked_by TEXT NOT NULL,
    reason     TEXT
);

CREATE TABLE reinstatements (
    event_id      BLOB PRIMARY KEY,
    time          TEXT NOT NULL,
    kind          TEXT NOT NULL,
    value         TEXT NOT NULL,
    reinstated_by TEXT NOT NULL,
    reason        TEXT NOT NULL
);
CREATE INDEX reinstatements_identity ON reinstatements (kind, value, time DESC);

CREATE TABLE quarantine (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    stream_seq  INTEGER NOT NULL,
    subject     TEXT    NOT NULL,
    event_index INTEGER,
    event_id    BLOB,
    event_type  TEXT,
    session_id  BLOB,
    reason      TEXT    NOT NULL,
    raw         BLOB    NOT NULL
);
-- A redelivered part of a message, or an event published again, is
-- quarantined once (the PostgreSQL schema indexes sha256(raw); SQLite the
-- bytes themselves).
CREATE UNIQUE INDEX quarantine_part ON quarantine (stream_seq, coalesce(event_index, -1), raw);
CREATE UNIQUE INDEX quarantine_event ON quarantine (event_id) WHERE event_id IS NOT NULL;
CREATE INDEX quarantine_session ON quarantine (session_id) WHERE session_id IS NOT NULL;
