-- Backend groups (docs/pool.md, "Groups and sticky routing"): a session is
-- routed only among the backends of its group. Every existing backend is in
-- the group `default`, where sessions naming no group go: routing is as before.
-- (`group` is an SQL keyword, hence `group_name`.)
ALTER TABLE backends ADD COLUMN group_name TEXT NOT NULL DEFAULT 'default';

-- The touch trigger names the columns it watches: a hand edit of the group
-- must refresh updated_at too. (The version triggers watch every column.)
DROP TRIGGER backends_touch;
CREATE TRIGGER backends_touch AFTER UPDATE OF id, url, target_size, max_size, weight, enabled, reuse, group_name ON backends
BEGIN
    UPDATE backends SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = NEW.id;
END;
