-- The prepared statements a command runs by name, with their texts
-- (CommandReceived.executes): a JSON array of {"name", "text"}; NULL when
-- the command runs none, or was recorded before the field existed.

ALTER TABLE commands
    ADD COLUMN executes jsonb;
