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

-- Who registered a webhook on a server with API keys: the webhook hears that owner's jobs
-- alone. A webhook without a row here (registered with auth off) hears every job.
CREATE TABLE IF NOT EXISTS webhook_owners (
    webhook_id text PRIMARY KEY,
    owner      text NOT NULL
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

-- A batch of submissions admitted in one round trip, its commit included. Every statement in
-- a function takes a fresh snapshot, so the quotas and Idempotency-Keys read after the locks
-- include every batch that held them before, from any host. The caller passes one submission
-- per Idempotency-Key (the batch's first); it gets back, per submission in order, whether its
-- job went in, the job and body hash an earlier request's key holds, and, for one refused
-- for its quota, its owner's jobs pending or running. As batches commit one after another,
-- jobs are numbered in the order they commit: a listing paged by offset gains new jobs only
-- at its end.
CREATE OR REPLACE FUNCTION persona_admit(
    lock_names text[], job_ids text[], owners text[], requests text[], named text[], fixed_experiments text[],
    new_experiments text[], job_limits integer[], idempotency_keys text[], body_hashes text[],
    key_ttl double precision)
RETURNS TABLE (admitted boolean, known_hash text, known_job text, owner_active bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    created text;
    found_hashes text[];
    found_jobs text[];
    added_ids text[];
BEGIN
    -- The locks, taken in one order so that batches never deadlock: 'persona:admission', which
    -- every batch takes, so that batches from all hosts commit one after another; and one per
    -- owner (its quota) and per Idempotency-Key, which a server of schema 2 takes alone.
    PERFORM pg_advisory_xact_lock(hashtextextended(name, 0))
    FROM (SELECT DISTINCT unnest(lock_names) AS name) AS names ORDER BY name;
    created := to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"');  -- in seq order
    SELECT array_agg(i.body_hash ORDER BY b.n), array_agg(i.job_id ORDER BY b.n) INTO found_hashes, found_jobs
    FROM unnest(owners, idempotency_keys) WITH ORDINALITY AS b (owner, key, n)
    LEFT JOIN idempotency_keys AS i ON i.owner = b.owner AND i.key = b.key
                                   AND i.created_at > extract(epoch FROM clock_timestamp()) - key_ttl;
    INSERT INTO experiments (name, experiment_id, created_at)
    SELECT DISTINCT ON (e.name) e.name, e.candidate, created
    FROM unnest(named, new_experiments, found_jobs) AS e (name, candidate, found)
    WHERE e.name IS NOT NULL AND e.found IS NULL ORDER BY e.name
    ON CONFLICT (name) DO NOTHING;
    WITH batch AS MATERIALIZED (
        SELECT b.n, b.job_id, b.owner, b.request, b.job_limit, b.key, b.body_hash,
               COALESCE(b.fixed, x.experiment_id) AS experiment_id,
               (SELECT COALESCE(SUM(c.n), 0) FROM job_counts AS c
                WHERE c.owner = b.owner AND c.status IN ('pending', 'running'))
               + ROW_NUMBER() OVER (PARTITION BY b.owner ORDER BY b.n) AS place
        FROM unnest(job_ids, owners, requests, fixed_experiments, named, job_limits, idempotency_keys,
                    body_hashes, found_jobs)
             WITH ORDINALITY AS b (job_id, owner, request, fixed, name, job_limit, key, body_hash, found, n)
        LEFT JOIN experiments AS x ON x.name = b.name
        WHERE b.found IS NULL
    ), added AS (
        INSERT INTO jobs (job_id, owner, request, experiment_id, created_at)
        SELECT job_id, owner, request, experiment_id, created FROM batch WHERE place <= job_limit ORDER BY n
        RETURNING job_id
    ), kept AS (
        INSERT INTO idempotency_keys (owner, key, body_hash, job_id, created_at)
        SELECT batch.owner, batch.key, batch.body_hash, batch.job_id, extract(epoch FROM clock_timestamp())
        FROM batch JOIN added USING (job_id) WHERE batch.key IS NOT NULL
        ON CONFLICT (owner, key) DO UPDATE SET body_hash = excluded.body_hash, job_id = excluded.job_id,
                                               created_at = excluded.created_at
    )
    SELECT array_agg(job_id) INTO added_ids FROM added;
    IF added_ids IS NOT NULL THEN  -- the other hosts hear of new jobs as the batch commits
        PERFORM pg_notify('persona', 'jobs');
    END IF;
    RETURN QUERY
    SELECT b.job_id = ANY(COALESCE(added_ids, '{}')), b.hash, b.found,
           CASE WHEN b.found IS NULL AND NOT b.job_id = ANY(COALESCE(added_ids, '{}')) THEN
               (SELECT COALESCE(SUM(c.n), 0)::bigint FROM job_counts AS c
                WHERE c.owner = b.owner AND c.status IN ('pending', 'running')) END
    FROM unnest(job_ids, owners, found_hashes, found_jobs) WITH ORDINALITY AS b (job_id, owner, hash, found, n)
    ORDER BY b.n;
END $$;
