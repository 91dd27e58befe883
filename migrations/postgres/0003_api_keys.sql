-- API keys minted over REST (ApiKey resources live in snapshots). Only the digest is stored.
-- `revoked_at` is when the key stops working (a rotation may leave the old key a grace period);
-- `updated_at` lets every pod pick up changes incrementally.
CREATE TABLE api_keys (
    id          text        PRIMARY KEY,
    tenant      text        NOT NULL,
    persona     text        NOT NULL,
    digest      text        NOT NULL UNIQUE,
    key_id      text        NOT NULL,
    description text,
    created_by  text        NOT NULL,
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz,
    revoked_at  timestamptz,
    updated_at  timestamptz NOT NULL
);
CREATE INDEX api_keys_tenant_created ON api_keys (tenant, created_at DESC, id);
CREATE INDEX api_keys_updated ON api_keys (updated_at);
