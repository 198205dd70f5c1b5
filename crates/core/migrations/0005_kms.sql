-- Embedded KMS (keys per project, grants) and the wrapped data keys of images.
-- Portable: TEXT and BIGINT only; times are Unix milliseconds.

-- Customer master keys. `material` is the 32-byte key sealed (AES-256-GCM) by the service
-- root key with the key id as associated data; the plaintext never leaves the service.
-- key_state uses Huawei KMS codes: 2 enabled, 3 disabled, 4 pending deletion.
CREATE TABLE kms_keys (
    id              TEXT PRIMARY KEY,
    project_id      TEXT NOT NULL,
    domain_id       TEXT NOT NULL,
    alias           TEXT NOT NULL,
    description     TEXT NOT NULL,
    key_spec        TEXT NOT NULL,
    key_usage       TEXT NOT NULL,
    origin          TEXT NOT NULL,
    key_state       TEXT NOT NULL,
    material        TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    deletion_at     BIGINT,
    UNIQUE (project_id, alias)
);
CREATE INDEX kms_keys_project ON kms_keys (project_id, created_at);

-- Grants of a key to another principal (a project, user or domain id).
CREATE TABLE kms_grants (
    id                  TEXT PRIMARY KEY,
    key_id              TEXT NOT NULL REFERENCES kms_keys(id) ON DELETE CASCADE,
    name                TEXT NOT NULL,
    grantee_principal   TEXT NOT NULL,
    grantee_type        TEXT NOT NULL,
    operations          TEXT NOT NULL,      -- JSON array
    issuing_principal   TEXT NOT NULL,
    retiring_principal  TEXT,
    created_at          BIGINT NOT NULL
);
CREATE INDEX kms_grants_key ON kms_grants (key_id, grantee_principal);

-- The data key (DEK) of an image whose manifests are encrypted, wrapped by its KMS key
-- (cmk_id set: an encrypted image) or by the service root key (cmk_id NULL: an unencrypted
-- image whose data stays encrypted at rest, e.g. the decrypted copy of an encrypted image).
CREATE TABLE image_keys (
    image_id        TEXT PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,
    cmk_id          TEXT,
    wrapped_dek     TEXT NOT NULL,
    created_at      BIGINT NOT NULL
);
CREATE INDEX image_keys_cmk ON image_keys (cmk_id);
