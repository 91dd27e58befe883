-- What each API pod observes of its upstream connections (catalog and health), so the operator
-- can mirror it into Connection and Persona status. One row per pod and connection; rows of pods
-- that stopped reporting age out by reported_at.
CREATE TABLE connection_reports (
    tenant         text        NOT NULL,
    connection     text        NOT NULL,
    reporter       text        NOT NULL,
    health         text        NOT NULL,
    tools          jsonb       NOT NULL DEFAULT '[]'::jsonb,
    config_version bigint,
    reported_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, connection, reporter)
);
CREATE INDEX connection_reports_reported_at ON connection_reports (reported_at);
