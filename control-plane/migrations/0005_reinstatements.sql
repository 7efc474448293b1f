-- Revoked identities reinstated (IdentityReinstated), next to the
-- revocations they end: the reason is required by the API.

CREATE TABLE reinstatements (
    event_id      uuid PRIMARY KEY,
    time          timestamptz NOT NULL,
    kind          text        NOT NULL,
    value         text        NOT NULL,
    reinstated_by text        NOT NULL,
    reason        text        NOT NULL
);
CREATE INDEX reinstatements_identity ON reinstatements (kind, value, time DESC);
