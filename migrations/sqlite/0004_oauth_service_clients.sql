-- See migrations/postgres/0005_oauth_service_clients.sql.
ALTER TABLE oauth_clients ADD COLUMN tenant TEXT;
ALTER TABLE oauth_clients ADD COLUMN persona TEXT;
ALTER TABLE oauth_clients ADD COLUMN created_by TEXT;
