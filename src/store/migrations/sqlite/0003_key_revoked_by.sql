-- Who revoked a key: 'config' (it left --api-keys, and comes back if it is listed again) or 'command'
-- (`jobhook keys revoke`: it stays revoked, even while still listed).
ALTER TABLE api_keys ADD COLUMN revoked_by TEXT;
