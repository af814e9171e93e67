-- The outbox keeps the exact bytes it publishes (text, not jsonb: no
-- re-encoding, byte-identical re-publishes), records which relay holds a
-- lease, and has an index for claiming in order. The inbox gets an index for
-- its retention purge.

ALTER TABLE event_outbox ALTER COLUMN payload TYPE text USING payload::text;
ALTER TABLE event_outbox ADD COLUMN claimed_by uuid;

CREATE INDEX event_outbox_pending_seq_idx ON event_outbox (seq) WHERE published_at IS NULL;

CREATE INDEX processed_events_processed_at_idx ON processed_events (processed_at);
