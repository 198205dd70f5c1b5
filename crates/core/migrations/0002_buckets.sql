-- Buckets of the embedded S3-compatible endpoint (see docs/buckets.md). Portable SQL as in
-- 0001: TEXT and BIGINT columns only, times as Unix milliseconds, JSON as TEXT.

-- Bucket names are global (S3 rules); each bucket is owned by one project.
CREATE TABLE buckets (
    name        TEXT PRIMARY KEY,
    project_id  TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    -- Bucket policy (JSON subset, see docs/buckets.md), NULL when none.
    policy      TEXT
);
CREATE INDEX buckets_project ON buckets (project_id, name);

-- The visible version of each object. `version` names the rows of object_parts that hold its
-- bytes, so replacing an object is one transaction that swaps the version.
CREATE TABLE objects (
    bucket        TEXT NOT NULL REFERENCES buckets(name),
    object_key    TEXT NOT NULL,
    version       TEXT NOT NULL,
    size          BIGINT NOT NULL,
    etag          TEXT NOT NULL,
    content_type  TEXT,
    metadata      TEXT NOT NULL,          -- JSON object of user metadata (x-amz-meta-*)
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (bucket, object_key)
);

-- An object's bytes: an ordered list of part manifests (a single PUT is one part; a completed
-- multipart upload keeps its parts, so nothing is re-chunked).
CREATE TABLE object_parts (
    version      TEXT NOT NULL,
    part_number  BIGINT NOT NULL,
    bucket       TEXT NOT NULL,
    object_key   TEXT NOT NULL,
    manifest     TEXT NOT NULL,
    size         BIGINT NOT NULL,
    part_offset  BIGINT NOT NULL,         -- byte offset of the part in the object
    PRIMARY KEY (version, part_number)
);
CREATE INDEX object_parts_manifest ON object_parts (manifest);
CREATE INDEX object_parts_key ON object_parts (bucket, object_key);

CREATE TABLE multipart_uploads (
    upload_id     TEXT PRIMARY KEY,
    bucket        TEXT NOT NULL REFERENCES buckets(name),
    object_key    TEXT NOT NULL,
    project_id    TEXT NOT NULL,          -- the initiator's project
    content_type  TEXT,
    metadata      TEXT NOT NULL,
    created_at    BIGINT NOT NULL
);
CREATE INDEX multipart_uploads_bucket ON multipart_uploads (bucket, object_key, created_at);

CREATE TABLE upload_parts (
    upload_id    TEXT NOT NULL REFERENCES multipart_uploads(upload_id) ON DELETE CASCADE,
    part_number  BIGINT NOT NULL,
    manifest     TEXT NOT NULL,
    size         BIGINT NOT NULL,
    etag         TEXT NOT NULL,           -- hex MD5 of the part
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (upload_id, part_number)
);
CREATE INDEX upload_parts_manifest ON upload_parts (manifest);
