-- Backend groups (docs/pool.md, "Groups and sticky routing"): a session is
-- routed only among the backends of its group. Every existing backend is in
-- the group `default`, where sessions naming no group go: routing is as before.
-- (`group` is an SQL keyword, hence `group_name`.) The triggers of 0001 fire
-- on every column, this one included.
ALTER TABLE backends ADD COLUMN group_name TEXT NOT NULL DEFAULT 'default';
