-- OAuth clients registered with Portcullis's authorization server (RFC 7591), and the consent
-- each user gave each client. Client secrets are bcrypt hashes.
CREATE TABLE oauth_clients (
    client_id                  text        PRIMARY KEY,
    secret_hash                text,
    client_name                text,
    redirect_uris              text        NOT NULL,
    application_type           text        NOT NULL,
    token_endpoint_auth_method text        NOT NULL,
    grant_types                text        NOT NULL,
    created_at                 timestamptz NOT NULL
);
CREATE TABLE oauth_consents (
    client_id  text        NOT NULL,
    subject    text        NOT NULL,
    resource   text        NOT NULL,
    granted_at timestamptz NOT NULL,
    PRIMARY KEY (client_id, subject, resource)
);
