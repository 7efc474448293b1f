-- Policy decisions on commands, published bundles and revocations.

ALTER TABLE commands
    ADD COLUMN effect   text,   -- allow | deny | approval_required; NULL before decisions existed
    ADD COLUMN enforced boolean,
    ADD COLUMN decision jsonb;  -- the whole DecisionRecord
CREATE INDEX commands_effect ON commands (effect, time DESC, event_id DESC);

CREATE TABLE policy_bundles (
    event_id     uuid PRIMARY KEY,
    time         timestamptz NOT NULL,
    version      text        NOT NULL,
    hash         text        NOT NULL,
    files        text[]      NOT NULL,
    dry_run      boolean     NOT NULL,
    published_by text        NOT NULL
);
CREATE INDEX policy_bundles_time ON policy_bundles (time DESC, event_id DESC);

CREATE TABLE revocations (
    event_id   uuid PRIMARY KEY,
    time       timestamptz NOT NULL,
    kind       text        NOT NULL,
    value      text        NOT NULL,
    revoked_by text        NOT NULL,
    reason     text
);
