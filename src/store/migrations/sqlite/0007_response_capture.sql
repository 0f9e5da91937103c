-- What the receiver answered, per attempt: its Content-Type and the first 2 KiB of its body (lossy
-- UTF-8). Null for attempts that got no answer, and for attempts logged before this migration.
ALTER TABLE delivery_attempts ADD COLUMN response_content_type TEXT;
ALTER TABLE delivery_attempts ADD COLUMN response_body TEXT;
