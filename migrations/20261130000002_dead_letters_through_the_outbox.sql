-- Dead letters go out through the outbox, in the same transaction that
-- settles the rest of their poll: the original key and bytes are kept as
-- they were, with the original headers plus the dlq.* ones. A letter's row id
-- is derived from the record's position, so a record dead-lettered again
-- after a crash is the same row, not a second letter.

ALTER TABLE event_outbox ADD COLUMN raw_key bytea;
ALTER TABLE event_outbox ADD COLUMN raw_payload bytea;
ALTER TABLE event_outbox ADD COLUMN headers jsonb;
