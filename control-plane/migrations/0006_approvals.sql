-- Approvals of commands and requests for access, as they stand: projected
-- from the approvals stream (`<policy.revocation_stream>_APPROVALS`, one
-- subject per approval), each row the approval's last record seen
-- (`sequence` only grows: a record older than the row changes nothing).
-- `record` is the whole approval (events/EVENTS.md, "Approval records");
-- the other columns are what compliance queries filter on. Commands that
-- waited link their approval (commands.decision / events), and decisions
-- made under access granted for a while name it (decision->'grants').

CREATE TABLE approvals (
    approval_id        uuid        PRIMARY KEY,
    kind               text        NOT NULL,  -- command | access
    state              text        NOT NULL,  -- pending | granted | denied | expired | cancelled | revoked
    requested_at       timestamptz NOT NULL,
    expires_at         timestamptz NOT NULL,
    ended_at           timestamptz,           -- left pending (for access granted: when it began)
    access_until       timestamptz,           -- access granted: when its time is up
    requester_subject  text        NOT NULL,
    requester_username text        NOT NULL,
    delegation         jsonb       NOT NULL DEFAULT '[]',
    target             text        NOT NULL,
    statement          text,                  -- command: the text as it runs
    scope              text,                  -- access: what context.grants holds
    reason             text,                  -- access: why it was asked for
    approvers_required integer     NOT NULL,
    granted_by         text[]      NOT NULL DEFAULT '{}',
    record             jsonb       NOT NULL,
    sequence           bigint      NOT NULL
);
CREATE INDEX approvals_requested ON approvals (requested_at DESC, approval_id DESC);
CREATE INDEX approvals_requester ON approvals (requester_subject, requested_at DESC);
CREATE INDEX approvals_target ON approvals (target, requested_at DESC);
