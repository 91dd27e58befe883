-- Published configuration: every version is kept (changelog, rollback).
CREATE TABLE config_snapshots (
    version BIGINT PRIMARY KEY,
    digest TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    source TEXT NOT NULL,
    snapshot JSONB NOT NULL,      -- the compiled snapshot with secret values blanked
    secrets BYTEA NOT NULL,       -- nonce || ChaCha20-Poly1305 of the secret values
    summary JSONB NOT NULL        -- objects added, changed, removed since the previous version
);

-- Audit events, range-partitioned by month. The default partition catches anything outside the
-- partitions created ahead of time, so no event is ever refused for want of a partition.
CREATE TABLE audit_events (
    id UUID NOT NULL,
    tenant TEXT NOT NULL,
    time TIMESTAMPTZ NOT NULL,
    subject TEXT,
    persona TEXT,
    auth_method TEXT,
    client_name TEXT,
    channel TEXT NOT NULL,
    operation TEXT NOT NULL,
    endpoint TEXT,
    tool TEXT,
    connection TEXT,
    status TEXT NOT NULL,
    error_code TEXT,
    detail TEXT,
    latency_ms DOUBLE PRECISION NOT NULL,
    request_id TEXT NOT NULL,
    PRIMARY KEY (time, id)
) PARTITION BY RANGE (time);
CREATE TABLE audit_events_default PARTITION OF audit_events DEFAULT;
CREATE INDEX audit_events_tenant_time ON audit_events (tenant, time DESC, id DESC);
CREATE INDEX audit_events_tenant_subject_time ON audit_events (tenant, subject, time DESC);
CREATE INDEX audit_events_tenant_tool_time ON audit_events (tenant, tool, time DESC);

-- Creates the monthly partitions from this month to `months_ahead` months ahead.
CREATE FUNCTION portcullis_ensure_audit_partitions(months_ahead INT) RETURNS VOID AS $$
DECLARE
    month_start DATE;
    partition_name TEXT;
BEGIN
    FOR i IN 0..months_ahead LOOP
        month_start := date_trunc('month', now() + make_interval(months => i))::date;
        partition_name := 'audit_events_' || to_char(month_start, 'YYYY_MM');
        IF to_regclass(partition_name) IS NULL THEN
            EXECUTE format('CREATE TABLE %I PARTITION OF audit_events FOR VALUES FROM (%L) TO (%L)',
                partition_name, month_start, (month_start + INTERVAL '1 month')::date);
        END IF;
    END LOOP;
END
$$ LANGUAGE plpgsql;

-- Drops monthly partitions that end before `cutoff`; returns how many were dropped.
CREATE FUNCTION portcullis_drop_audit_partitions_before(cutoff DATE) RETURNS INT AS $$
DECLARE
    partition RECORD;
    dropped INT := 0;
BEGIN
    FOR partition IN
        SELECT c.relname AS name FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class p ON p.oid = i.inhparent
        WHERE p.relname = 'audit_events' AND c.relname ~ '^audit_events_[0-9]{4}_[0-9]{2}$'
    LOOP
        IF (to_date(substring(partition.name from 14), 'YYYY_MM') + INTERVAL '1 month')::date <= cutoff THEN
            EXECUTE format('DROP TABLE %I', partition.name);
            dropped := dropped + 1;
        END IF;
    END LOOP;
    RETURN dropped;
END
$$ LANGUAGE plpgsql;
