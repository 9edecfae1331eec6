-- Leader election: one row per lock (`kuma-cp-lock`), held by an instance until
-- `expires_at` (the database's clock, so instances' clocks do not matter). The holder
-- renews it; anyone may take it once it expired.
CREATE TABLE IF NOT EXISTS leader_leases (
    name        text        NOT NULL PRIMARY KEY,
    holder      text        NOT NULL,
    acquired_at timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL
);
