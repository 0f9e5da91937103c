-- Custom headers per subscription (sent with every attempt): a JSON object of lower-case name → value,
-- and the SHA-256 (hex) of names and values, which decides whether a repeated registration of the same
-- job and callback is the same subscription. Both null for a subscription without custom headers (and
-- for every subscription registered before this migration).
ALTER TABLE subscriptions ADD COLUMN callback_headers TEXT;
ALTER TABLE subscriptions ADD COLUMN callback_headers_hash TEXT;
