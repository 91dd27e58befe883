-- Confidential clients minted by a tenant's administrators for the client-credentials grant:
-- bound to one persona of one tenant.
ALTER TABLE oauth_clients ADD COLUMN tenant text;
ALTER TABLE oauth_clients ADD COLUMN persona text;
ALTER TABLE oauth_clients ADD COLUMN created_by text;
CREATE INDEX oauth_clients_tenant ON oauth_clients (tenant, created_at DESC) WHERE tenant IS NOT NULL;
