-- Audit log of dev mode: one row per REST request, MCP request, tool call, auth failure,
-- denial and throttle.
CREATE TABLE audit_events (
    id TEXT PRIMARY KEY NOT NULL,
    tenant TEXT NOT NULL,
    time TEXT NOT NULL,           -- RFC 3339 UTC with microseconds; sorts as text
    subject TEXT,
    persona TEXT,
    auth_method TEXT,
    client_name TEXT,
    channel TEXT NOT NULL,        -- rest | mcp
    operation TEXT NOT NULL,      -- HTTP method and route, or the JSON-RPC method
    endpoint TEXT,
    tool TEXT,
    connection TEXT,
    status TEXT NOT NULL,         -- ok | error | denied | throttled | invalid
    error_code TEXT,
    detail TEXT,
    latency_ms REAL NOT NULL,
    request_id TEXT NOT NULL
);
CREATE INDEX audit_events_tenant_time ON audit_events (tenant, time DESC, id DESC);
CREATE INDEX audit_events_tenant_subject_time ON audit_events (tenant, subject, time DESC);
CREATE INDEX audit_events_tenant_tool_time ON audit_events (tenant, tool, time DESC);
