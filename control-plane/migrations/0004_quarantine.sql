-- Events the projector could not project, kept raw so that none is dropped:
-- a message that does not decode (the whole message, event_index NULL), or
-- one event of a message that the audit database refuses (that event's own
-- CloudEvents JSON, event_index its position in the message's batch).
-- Like the other tables it is rebuilt by replaying the stream; the event
-- log keeps every message too.

CREATE TABLE quarantine (
    id          bigserial   PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    stream_seq  bigint      NOT NULL,
    subject     text        NOT NULL,
    event_index integer,             -- position in the batch; NULL: the whole message
    event_id    uuid,                -- NULL when the message did not decode
    event_type  text,
    session_id  uuid,
    reason      text        NOT NULL, -- the decode error, or SQLSTATE and message
    raw         bytea       NOT NULL
);
-- A redelivered message quarantines nothing twice: not the same part of
-- the same message (the raw bytes too, in case the stream was re-created and
-- its sequence numbers restarted) ...
CREATE UNIQUE INDEX quarantine_part
    ON quarantine (stream_seq, coalesce(event_index, -1), sha256(raw));
-- ... nor the same event published again in another message.
CREATE UNIQUE INDEX quarantine_event ON quarantine (event_id) WHERE event_id IS NOT NULL;
CREATE INDEX quarantine_session ON quarantine (session_id) WHERE session_id IS NOT NULL;
