-- Image sharing (spec A.5, B.5, C.6). Portable SQL: TEXT and BIGINT only.

-- One row per recipient of an image: a project, or a domain (every project of that domain,
-- current and future). For project members `status` is the recipient's answer; for domain
-- members it stays 'pending' and each project's answer lives in image_member_answers.
CREATE TABLE image_members (
    image_id     TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    member_id    TEXT NOT NULL,
    member_type  TEXT NOT NULL,          -- project | domain
    status       TEXT NOT NULL,          -- pending | accepted | rejected
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    PRIMARY KEY (image_id, member_id)
);
CREATE INDEX image_members_member ON image_members (member_id, status);

-- The answer of one project of a domain to a domain-wide share. Removing the domain member
-- removes the answers with it.
CREATE TABLE image_member_answers (
    image_id    TEXT NOT NULL,
    domain_id   TEXT NOT NULL,
    project_id  TEXT NOT NULL,
    status      TEXT NOT NULL,           -- accepted | rejected
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (image_id, project_id),
    FOREIGN KEY (image_id, domain_id) REFERENCES image_members (image_id, member_id) ON DELETE CASCADE
);
CREATE INDEX image_member_answers_project ON image_member_answers (project_id, status);
