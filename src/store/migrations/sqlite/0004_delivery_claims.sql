-- A delivery attempt holds a claim on its subscription from before its request starts until its outcome
-- is recorded: a cancellation does not commit while the claim is held (a subscription that reads
-- `cancelled` was never delivered), and no other instance attempts the delivery meanwhile. Times are
-- Unix milliseconds; claimed_by names the process (see SqlStore::instance).
ALTER TABLE subscriptions ADD COLUMN claimed_until INTEGER;
ALTER TABLE subscriptions ADD COLUMN claimed_by TEXT;
