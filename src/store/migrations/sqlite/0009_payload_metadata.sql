-- How a subscription's deliveries are shaped: 'raw' (the upstream's body, byte for byte) or 'envelope'
-- (the Standard Webhooks payload structure), and the caller's metadata (a JSON object, at most 4 KiB,
-- carried in the envelope). Null payload = raw, as for every subscription registered before this.
ALTER TABLE subscriptions ADD COLUMN payload TEXT;
ALTER TABLE subscriptions ADD COLUMN metadata TEXT;
