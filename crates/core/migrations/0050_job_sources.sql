-- The source image of a replication or export job, as it was when the job was accepted: the
-- job reads its data from here, and the GC keeps these manifests alive until the job ends, so
-- deleting the source (or its row changing) never breaks a job already accepted.
CREATE TABLE job_sources (
    job_id            TEXT PRIMARY KEY,
    id                TEXT NOT NULL,
    owner             TEXT NOT NULL,
    name              TEXT,
    status            TEXT NOT NULL,
    visibility        TEXT NOT NULL,
    protected         BIGINT NOT NULL DEFAULT 0,
    disk_format       TEXT,
    container_format  TEXT,
    min_disk          BIGINT NOT NULL DEFAULT 0,
    min_ram           BIGINT NOT NULL DEFAULT 0,
    size              BIGINT,
    virtual_size      BIGINT,
    checksum          TEXT,
    os_hash_algo      TEXT,
    os_hash_value     TEXT,
    disk_manifest     TEXT,
    file_manifest     TEXT,
    origin            TEXT NOT NULL,
    properties        TEXT NOT NULL,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    active_at         BIGINT
);
