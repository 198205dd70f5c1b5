-- One schema for SQLite and PostgreSQL: only TEXT, BIGINT and DOUBLE PRECISION columns,
-- booleans as 0/1, times as Unix milliseconds, JSON as TEXT.

CREATE TABLE domains (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

CREATE TABLE projects (
    id          TEXT PRIMARY KEY,
    domain_id   TEXT NOT NULL REFERENCES domains(id),
    name        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    UNIQUE (domain_id, name)
);

CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    domain_id     TEXT NOT NULL REFERENCES domains(id),
    name          TEXT NOT NULL,
    password_hash TEXT,
    created_at    BIGINT NOT NULL,
    UNIQUE (domain_id, name)
);

-- Which users may act in which projects.
CREATE TABLE role_assignments (
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    project_id  TEXT NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    role        TEXT NOT NULL,
    PRIMARY KEY (user_id, project_id)
);

-- AK/SK keys: bound to one user and one project.
CREATE TABLE access_keys (
    access_key  TEXT PRIMARY KEY,
    secret_key  TEXT NOT NULL,
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    project_id  TEXT NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    created_at  BIGINT NOT NULL
);

-- Keystone-style tokens; only a hash of the token is kept.
CREATE TABLE tokens (
    token_hash  TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    project_id  TEXT NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    issued_at   BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX tokens_expiry ON tokens (expires_at);

CREATE TABLE images (
    id                TEXT PRIMARY KEY,
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
    -- Manifest of the virtual disk (the image's content) and, for uploads in a non-raw
    -- format, of the file as uploaded (served byte-exact by GET /file).
    disk_manifest     TEXT,
    file_manifest     TEXT,
    -- How the image came to be: upload | file | iso | copy | whole | metadata
    origin            TEXT NOT NULL,
    -- Every other attribute (__os_version, __description, custom properties), JSON object.
    properties        TEXT NOT NULL,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    active_at         BIGINT,
    -- Node and time of the upload in progress (status saving).
    upload_token      TEXT
);
CREATE INDEX images_owner ON images (owner, created_at);
CREATE INDEX images_disk_manifest ON images (disk_manifest);

CREATE TABLE image_tags (
    image_id    TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    tag_key     TEXT NOT NULL,
    tag_value   TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (image_id, tag_key)
);

CREATE TABLE jobs (
    id              TEXT PRIMARY KEY,
    project_id      TEXT NOT NULL,
    job_type        TEXT NOT NULL,
    status          TEXT NOT NULL,          -- INIT | RUNNING | SUCCESS | FAIL
    params          TEXT NOT NULL,          -- JSON, the job's input
    checkpoint      TEXT,                   -- JSON, what is already done (resumable steps)
    image_id        TEXT,
    image_name      TEXT,
    current_task    TEXT,
    process_percent DOUBLE PRECISION NOT NULL DEFAULT 0,
    bytes_done      BIGINT NOT NULL DEFAULT 0,
    bytes_total     BIGINT NOT NULL DEFAULT 0,
    results         TEXT,                   -- JSON array for member jobs
    error_code      TEXT,
    fail_reason     TEXT,
    attempts        BIGINT NOT NULL DEFAULT 0,
    lease_owner     TEXT,
    lease_until     BIGINT,
    created_at      BIGINT NOT NULL,
    begin_time      BIGINT,
    end_time        BIGINT,
    updated_at      BIGINT NOT NULL
);
CREATE INDEX jobs_queue ON jobs (status, created_at);
CREATE INDEX jobs_project ON jobs (project_id, job_type, status);
