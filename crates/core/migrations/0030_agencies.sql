-- IAM agencies: a domain lets a cloud service act for it (cross-region replication needs one
-- that delegates to the image service). Portable: TEXT and BIGINT only; times are Unix ms.
CREATE TABLE agencies (
    id                  TEXT PRIMARY KEY,
    domain_id           TEXT NOT NULL,
    name                TEXT NOT NULL,
    delegated_service   TEXT NOT NULL,
    description         TEXT NOT NULL,
    created_at          BIGINT NOT NULL,
    UNIQUE (domain_id, name)
);
