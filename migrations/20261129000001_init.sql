-- Batches, their essays, the phase-status log, configuration snapshots,
-- the transactional outbox and the inbox of processed events.
-- Enum columns are text with a CHECK of the allowed values; a test compares
-- these lists with the Rust enums.

CREATE TABLE batches (
    id               text PRIMARY KEY,
    correlation_id   uuid NOT NULL,
    name             text,
    class_id         text,
    status           text NOT NULL CONSTRAINT batches_status_check CHECK (status IN ('awaiting_content_validation', 'content_ingestion_failed', 'awaiting_pipeline_configuration', 'ready_for_pipeline_execution', 'processing_pipelines', 'awaiting_student_validation', 'student_validation_completed', 'validation_timeout_processed', 'completed_successfully', 'completed_with_failures', 'failed_critically', 'cancelled')),
    context          jsonb NOT NULL,
    pipeline_state   jsonb NOT NULL,
    orchestration    jsonb NOT NULL,
    total_essays     integer NOT NULL DEFAULT 0,
    failed_essay_ids jsonb NOT NULL DEFAULT '[]',
    parked_request   jsonb,
    error_details    jsonb NOT NULL DEFAULT '[]',
    version          bigint NOT NULL DEFAULT 1,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    completed_at     timestamptz
);

CREATE INDEX batches_status_idx ON batches (status);

CREATE TABLE batch_essays (
    batch_id                  text NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    essay_id                  text NOT NULL,
    text_storage_id           text NOT NULL,
    corrected_text_storage_id text,
    position                  integer NOT NULL,
    PRIMARY KEY (batch_id, essay_id)
);

CREATE TABLE phase_status_log (
    id             bigserial PRIMARY KEY,
    batch_id       text NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    phase          text NOT NULL CONSTRAINT phase_status_log_phase_check CHECK (phase IN ('spellcheck', 'nlp', 'cj_assessment', 'ai_feedback', 'student_matching')),
    old_status     text NOT NULL CONSTRAINT phase_status_log_old_status_check CHECK (old_status IN ('requested_by_user', 'pending_dependencies', 'dispatch_initiated', 'in_progress', 'completed_successfully', 'completed_with_partial_success', 'failed', 'skipped_due_to_dependency_failure', 'skipped_by_user_config', 'cancelled')),
    new_status     text NOT NULL CONSTRAINT phase_status_log_new_status_check CHECK (new_status IN ('requested_by_user', 'pending_dependencies', 'dispatch_initiated', 'in_progress', 'completed_successfully', 'completed_with_partial_success', 'failed', 'skipped_due_to_dependency_failure', 'skipped_by_user_config', 'cancelled')),
    correlation_id uuid,
    completed_at   timestamptz,
    changed_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX phase_status_log_batch_idx ON phase_status_log (batch_id, phase, id);

CREATE TABLE configuration_snapshots (
    id             bigserial PRIMARY KEY,
    batch_id       text NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    correlation_id uuid,
    configuration  jsonb NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- The row id is the message's event_id and never changes.
CREATE TABLE event_outbox (
    id              uuid PRIMARY KEY,
    seq             bigserial NOT NULL UNIQUE,
    topic           text NOT NULL,
    message_key     text NOT NULL,
    event_type      text NOT NULL,
    correlation_id  uuid NOT NULL,
    payload         jsonb NOT NULL,
    traceparent     text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    -- A relay's lease on the row while it publishes it.
    claimed_until   timestamptz
);

CREATE INDEX event_outbox_unpublished_idx ON event_outbox (message_key, seq) WHERE published_at IS NULL;
CREATE INDEX event_outbox_published_idx ON event_outbox (published_at) WHERE published_at IS NOT NULL;

CREATE FUNCTION event_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted) THEN
        PERFORM pg_notify('bos_outbox', '');
    END IF;
    RETURN NULL;
END;
$$;

-- Wakes the relays once per statement that inserted rows.
CREATE TRIGGER event_outbox_notify AFTER INSERT ON event_outbox
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION event_outbox_notify();

-- The inbox: one row per consumed event whose effects are committed.
CREATE TABLE processed_events (
    event_id     uuid PRIMARY KEY,
    topic        text NOT NULL,
    batch_id     text NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now()
);
