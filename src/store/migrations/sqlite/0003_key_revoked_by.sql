-- Who revoked a key: 'config' (it left --api-keys, and comes back if it is listed again) or 'command'
-- (`jobhook keys revoke`: it stays revoked, even while still listed).
ALTER TABLE api_keys ADD COLUMN revoked_by TEXT;
-- Keys revoked before this column existed: which way is unknown, so they count as revoked by the
-- command and stay revoked even if listed (start-up warns about a listed one).
UPDATE api_keys SET revoked_by = 'command' WHERE revoked_at IS NOT NULL;
