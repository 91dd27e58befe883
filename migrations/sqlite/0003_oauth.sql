-- See migrations/postgres/0004_oauth.sql.
CREATE TABLE oauth_clients (
    client_id                  TEXT PRIMARY KEY,
    secret_hash                TEXT,
    client_name                TEXT,
    redirect_uris              TEXT NOT NULL,
    application_type           TEXT NOT NULL,
    token_endpoint_auth_method TEXT NOT NULL,
    grant_types                TEXT NOT NULL,
    created_at                 TEXT NOT NULL
);
CREATE TABLE oauth_consents (
    client_id  TEXT NOT NULL,
    subject    TEXT NOT NULL,
    resource   TEXT NOT NULL,
    granted_at TEXT NOT NULL,
    PRIMARY KEY (client_id, subject, resource)
);
