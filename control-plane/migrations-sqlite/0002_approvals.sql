-- Approvals of commands and requests for access, as they stand: the table
-- of ../migrations/0006_approvals.sql in SQLite's types, projected from the
-- approvals stream the same way.

CREATE TABLE approvals (
    approval_id        BLOB    PRIMARY KEY,
    kind               TEXT    NOT NULL,
    state              TEXT    NOT NULL,
    requested_at       TEXT    NOT NULL,
    expires_at         TEXT    NOT NULL,
    ended_at           TEXT,
    access_until       TEXT,
    requester_subject  TEXT    NOT NULL,
    requester_username TEXT    NOT NULL,
    delegation         TEXT    NOT NULL DEFAULT '[]',
    target             TEXT    NOT NULL,
    statement          TEXT,
    scope              TEXT,
    reason             TEXT,
    approvers_required INTEGER NOT NULL,
    granted_by         TEXT    NOT NULL DEFAULT '[]',
    record             TEXT    NOT NULL,
    sequence           INTEGER NOT NULL
);
CREATE INDEX approvals_requested ON approvals (requested_at DESC, approval_id DESC);
CREATE INDEX approvals_requester ON approvals (requester_subject, requested_at DESC);
CREATE INDEX approvals_target ON approvals (target, requested_at DESC);
