-- Persona's SQLite schema. persona.py carries this same text and applies it;
-- a test keeps the two equal. Timestamps shown to clients are ISO 8601 UTC
-- text; times used only for arithmetic (leases, windows) are epoch seconds.

CREATE TABLE IF NOT EXISTS jobs (
    seq           INTEGER PRIMARY KEY,
    job_id        TEXT NOT NULL UNIQUE,
    owner         TEXT NOT NULL,
    status        TEXT NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'running', 'completed', 'failed')),
    progress      INTEGER NOT NULL DEFAULT 0,
    request       TEXT NOT NULL,
    experiment_id TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    started_at    TEXT,
    completed_at  TEXT,
    error         TEXT,
    result        TEXT,
    attempts      INTEGER NOT NULL DEFAULT 0,
    claimed_by    TEXT,
    heartbeat_at  REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_by_experiment ON jobs (experiment_id, seq);

CREATE TABLE IF NOT EXISTS experiments (
    name          TEXT PRIMARY KEY,
    experiment_id TEXT NOT NULL UNIQUE,
    created_at    TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS idempotency_keys (
    owner      TEXT NOT NULL,
    key        TEXT NOT NULL,
    body_hash  TEXT NOT NULL,
    job_id     TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (owner, key)
);

CREATE TABLE IF NOT EXISTS webhooks (
    seq        INTEGER PRIMARY KEY,
    webhook_id TEXT NOT NULL UNIQUE,
    url        TEXT NOT NULL,
    events     TEXT NOT NULL,
    secret     TEXT,
    created_at TEXT NOT NULL
);

-- Who registered a webhook on a server with API keys: the webhook hears that owner's jobs
-- alone. A webhook without a row here (registered with auth off) hears every job.
CREATE TABLE IF NOT EXISTS webhook_owners (
    webhook_id TEXT PRIMARY KEY,
    owner      TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS rate_limits (
    client       TEXT PRIMARY KEY,
    window_start REAL NOT NULL,
    hits         INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS deliveries (
    seq             INTEGER PRIMARY KEY,
    delivery_id     TEXT NOT NULL UNIQUE,
    webhook_id      TEXT,
    job_id          TEXT NOT NULL,
    event           TEXT NOT NULL,
    url             TEXT NOT NULL,
    secret          TEXT,
    payload         TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivering', 'delivered', 'failed', 'cancelled')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    claimed_by      TEXT,
    claimed_at      REAL,
    created_at      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (status, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_by_webhook ON deliveries (webhook_id, seq);

CREATE TABLE IF NOT EXISTS delivery_attempts (
    delivery_id  TEXT NOT NULL,
    attempted_at TEXT NOT NULL,
    http_status  INTEGER,
    error        TEXT,
    duration_ms  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS delivery_attempts_by_delivery ON delivery_attempts (delivery_id);
CREATE INDEX IF NOT EXISTS deliveries_by_job ON deliveries (job_id);

-- Jobs per owner and status, kept by triggers, so that limits and totals never count rows.
CREATE TABLE IF NOT EXISTS job_counts (
    owner  TEXT NOT NULL,
    status TEXT NOT NULL,
    n      INTEGER NOT NULL,
    PRIMARY KEY (owner, status)
);
CREATE TRIGGER IF NOT EXISTS job_counts_on_insert AFTER INSERT ON jobs BEGIN
    INSERT INTO job_counts (owner, status, n) VALUES (NEW.owner, NEW.status, 1)
    ON CONFLICT (owner, status) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS job_counts_on_status AFTER UPDATE OF status ON jobs
WHEN OLD.status != NEW.status BEGIN
    UPDATE job_counts SET n = n - 1 WHERE owner = OLD.owner AND status = OLD.status;
    INSERT INTO job_counts (owner, status, n) VALUES (NEW.owner, NEW.status, 1)
    ON CONFLICT (owner, status) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS job_counts_on_delete AFTER DELETE ON jobs BEGIN
    UPDATE job_counts SET n = n - 1 WHERE owner = OLD.owner AND status = OLD.status;
END;
-- A database from before the counters gets them from its jobs once, as it upgrades.
INSERT INTO job_counts (owner, status, n)
SELECT owner, status, COUNT(*) FROM jobs WHERE NOT EXISTS (SELECT 1 FROM job_counts) GROUP BY owner, status;

-- Health writes here when nothing else wrote lately: a write that succeeds proves the disk takes writes.
CREATE TABLE IF NOT EXISTS write_probe (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    probed_at REAL NOT NULL
);
