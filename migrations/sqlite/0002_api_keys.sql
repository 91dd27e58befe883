-- API keys minted over REST (see migrations/postgres/0003_api_keys.sql).
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    persona     TEXT NOT NULL,
    digest      TEXT NOT NULL UNIQUE,
    key_id      TEXT NOT NULL,
    description TEXT,
    created_by  TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    expires_at  TEXT,
    revoked_at  TEXT,
    updated_at  TEXT NOT NULL
);
CREATE INDEX api_keys_tenant_created ON api_keys (tenant, created_at DESC, id);
