-- Keyset paging of a project's images by update time (list sorted by updated_at).
CREATE INDEX images_owner_updated ON images (owner, updated_at);
