-- Persona's PostgreSQL schema. persona.py carries this same text and applies it
-- in one transaction under an advisory lock; a test keeps the two equal.
-- Timestamps shown to clients are ISO 8601 UTC text, as in the SQLite schema;
-- times used for leases, windows and retries are epoch seconds of the
-- database's clock, which every host shares.

CREATE TABLE IF NOT EXISTS persona_schema (
    version integer NOT NULL
);

CREATE TABLE IF NOT EXISTS jobs (
    seq           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id        text NOT NULL UNIQUE,
    owner         text NOT NULL,
    status        text NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'running', 'completed', 'failed')),
    progress      integer NOT NULL DEFAULT 0,
    request       text NOT NULL,
    experiment_id text NOT NULL,
    created_at    text NOT NULL,
    started_at    text,
    completed_at  text,
    error         text,
    result        text,
    attempts      integer NOT NULL DEFAULT 0,
    claimed_by    text,
    heartbeat_at  double precision
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_by_experiment ON jobs (experiment_id, seq);

CREATE TABLE IF NOT EXISTS experiments (
    name          text PRIMARY KEY,
    experiment_id text NOT NULL UNIQUE,
    created_at    text NOT NULL
);

CREATE TABLE IF NOT EXISTS idempotency_keys (
    owner      text NOT NULL,
    key        text NOT NULL,
    body_hash  text NOT NULL,
    job_id     text NOT NULL,
    created_at double precision NOT NULL,
    PRIMARY KEY (owner, key)
);

CREATE TABLE IF NOT EXISTS webhooks (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    webhook_id text NOT NULL UNIQUE,
    url        text NOT NULL,
    events     text NOT NULL,
    secret     text,
    created_at text NOT NULL
);

CREATE TABLE IF NOT EXISTS rate_limits (
    client       text PRIMARY KEY,
    window_start double precision NOT NULL,
    hits         integer NOT NULL
);

CREATE TABLE IF NOT EXISTS deliveries (
    seq             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id     text NOT NULL UNIQUE,
    webhook_id      text,
    job_id          text NOT NULL,
    event           text NOT NULL,
    url             text NOT NULL,
    secret          text,
    payload         text NOT NULL,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivering', 'delivered', 'failed', 'cancelled')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at double precision NOT NULL,
    claimed_by      text,
    claimed_at      double precision,
    created_at      text NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (status, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_by_webhook ON deliveries (webhook_id, seq);
CREATE INDEX IF NOT EXISTS deliveries_by_job ON deliveries (job_id);

CREATE TABLE IF NOT EXISTS delivery_attempts (
    seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id  text NOT NULL,
    attempted_at text NOT NULL,
    http_status  integer,
    error        text,
    duration_ms  integer NOT NULL
);
CREATE INDEX IF NOT EXISTS delivery_attempts_by_delivery ON delivery_attempts (delivery_id, seq);

-- Jobs per owner and status, kept by triggers, so that limits and totals never count rows.
CREATE TABLE IF NOT EXISTS job_counts (
    owner  text NOT NULL,
    status text NOT NULL,
    n      integer NOT NULL,
    PRIMARY KEY (owner, status)
);
-- New and deleted jobs are counted once per statement (a batch of submissions, a batch of
-- expired jobs), a change of status once per row.
CREATE OR REPLACE FUNCTION persona_count_new_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_counts (owner, status, n)
    SELECT owner, status, count(*) FROM new_jobs GROUP BY owner, status ORDER BY owner, status
    ON CONFLICT (owner, status) DO UPDATE SET n = job_counts.n + excluded.n;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION persona_count_deleted_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM job_counts JOIN (SELECT DISTINCT owner, status FROM old_jobs) AS gone USING (owner, status)
    ORDER BY owner, status FOR UPDATE OF job_counts;
    UPDATE job_counts SET n = job_counts.n - gone.n
    FROM (SELECT owner, status, count(*) AS n FROM old_jobs GROUP BY owner, status) AS gone
    WHERE job_counts.owner = gone.owner AND job_counts.status = gone.status;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION persona_count_status_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Both counters are locked in one order, so that changes in opposite directions never deadlock.
    PERFORM 1 FROM job_counts WHERE owner = OLD.owner AND status IN (OLD.status, NEW.status)
    ORDER BY status FOR UPDATE;
    UPDATE job_counts SET n = n - 1 WHERE owner = OLD.owner AND status = OLD.status;
    INSERT INTO job_counts (owner, status, n) VALUES (NEW.owner, NEW.status, 1)
    ON CONFLICT (owner, status) DO UPDATE SET n = job_counts.n + 1;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS job_counts_on_insert ON jobs;
CREATE TRIGGER job_counts_on_insert AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_jobs
FOR EACH STATEMENT EXECUTE FUNCTION persona_count_new_jobs();
DROP TRIGGER IF EXISTS job_counts_on_delete ON jobs;
CREATE TRIGGER job_counts_on_delete AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_jobs
FOR EACH STATEMENT EXECUTE FUNCTION persona_count_deleted_jobs();
DROP TRIGGER IF EXISTS job_counts_on_status ON jobs;
CREATE TRIGGER job_counts_on_status AFTER UPDATE OF status ON jobs
FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION persona_count_status_change();

-- Health writes here when nothing else wrote lately: a write that succeeds proves the database takes writes.
CREATE TABLE IF NOT EXISTS write_probe (
    id        integer PRIMARY KEY CHECK (id = 1),
    probed_at double precision NOT NULL
);
