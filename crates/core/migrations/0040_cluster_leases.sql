-- Cluster-wide named leases: at most one node holds a lease (e.g. "gc") until it expires or
-- is released, so node-wide maintenance runs once at a time across every node sharing the
-- database.
CREATE TABLE cluster_leases (
    name      TEXT PRIMARY KEY,
    holder    TEXT NOT NULL,
    until_ms  BIGINT NOT NULL
);

-- Cluster-wide facts every node must agree on (e.g. a check value of the KMS root key, so a
-- node started with a different root key refuses to start instead of failing to unwrap keys).
CREATE TABLE cluster_settings (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
