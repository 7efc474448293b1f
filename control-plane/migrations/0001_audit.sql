-- Audit projections of the event log. Every table is derived from the
-- JetStream stream and can be rebuilt by replaying it from sequence 1;
-- `events` keeps each raw event (CloudEvents JSON) for that purpose.

CREATE TABLE events (
    event_id   uuid PRIMARY KEY,
    type       text        NOT NULL,
    time       timestamptz NOT NULL,
    session_id uuid,
    seq        bigint      NOT NULL,
    body       jsonb       NOT NULL
);
CREATE INDEX events_time ON events (time DESC, event_id DESC);
CREATE INDEX events_session ON events (session_id, seq) WHERE session_id IS NOT NULL;

-- One row per session, written by SessionOpened and SessionClosed, which may
-- arrive in either order.
CREATE TABLE sessions (
    session_id        uuid PRIMARY KEY,
    worker_id         text        NOT NULL,
    identity_subject  text,
    identity_username text,
    identity_issuer   text,
    groups            text[]      NOT NULL DEFAULT '{}',
    delegation        jsonb,
    target            text,
    client_addr       text,
    client_tls        boolean,
    target_tls        boolean,
    application_name  text,
    opened_at         timestamptz,
    closed_at         timestamptz,
    close_reason      text,
    commands          bigint,
    bytes_from_client bigint,
    bytes_to_client   bigint,
    -- The time the API sorts and pages by: opened_at, or closed_at while the
    -- SessionOpened event has not been projected yet.
    time timestamptz GENERATED ALWAYS AS (coalesce(opened_at, closed_at)) STORED,
    CHECK (opened_at IS NOT NULL OR closed_at IS NOT NULL)
);
CREATE INDEX sessions_time ON sessions (time DESC, session_id DESC);
CREATE INDEX sessions_subject ON sessions (identity_subject, time DESC, session_id DESC);
CREATE INDEX sessions_username ON sessions (identity_username, time DESC, session_id DESC);
CREATE INDEX sessions_target ON sessions (target, time DESC, session_id DESC);

CREATE TABLE commands (
    event_id          uuid PRIMARY KEY,
    session_id        uuid,
    seq               bigint      NOT NULL,
    time              timestamptz NOT NULL,
    identity_subject  text,
    identity_username text,
    delegation        jsonb,
    target            text,
    protocol          text        NOT NULL,
    statement         text        NOT NULL,
    statement_name    text,
    portal            text,
    params            jsonb       NOT NULL DEFAULT '[]'
);
CREATE INDEX commands_time ON commands (time DESC, event_id DESC);
CREATE INDEX commands_subject ON commands (identity_subject, time DESC, event_id DESC);
CREATE INDEX commands_username ON commands (identity_username, time DESC, event_id DESC);
CREATE INDEX commands_target ON commands (target, time DESC, event_id DESC);
CREATE INDEX commands_session ON commands (session_id, seq);

CREATE TABLE authentication_failures (
    event_id         uuid PRIMARY KEY,
    time             timestamptz NOT NULL,
    client_addr      text        NOT NULL,
    client_tls       boolean     NOT NULL,
    claimed_user     text,
    requested_target text,
    reason           text        NOT NULL
);
CREATE INDEX authentication_failures_time ON authentication_failures (time DESC, event_id DESC);
