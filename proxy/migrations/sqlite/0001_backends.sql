-- The backend table (DESIGN §6) for SQLite.
--
-- No CHECK constraints on the values on purpose: `sttproxy backends` validates
-- what it writes, and the proxy validates every row it reads, rejecting a bad
-- one (logged, counted) while the other rows still apply. A constraint would
-- only move that error to whoever edits the table by hand.
CREATE TABLE backends (
    id          TEXT PRIMARY KEY NOT NULL,
    url         TEXT NOT NULL,
    target_size INTEGER NOT NULL DEFAULT 16,
    max_size    INTEGER NOT NULL DEFAULT 1024,
    weight      INTEGER NOT NULL DEFAULT 1,
    enabled     INTEGER NOT NULL DEFAULT 1,
    reuse       TEXT NOT NULL DEFAULT 'fenced',
    updated_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- One row. `version` is bumped by the triggers below on every change of
-- `backends`, so a poll that finds it unchanged reads nothing else.
-- `seeded`: the table has been populated once (by the settings' seed backends,
-- `sttproxy backends add`, or found non-empty); seeds never apply after that.
CREATE TABLE sttproxy_meta (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL,
    seeded  INTEGER NOT NULL
);
INSERT INTO sttproxy_meta (id, version, seeded) VALUES (1, 0, 0);

CREATE TRIGGER backends_changed_insert AFTER INSERT ON backends
BEGIN
    UPDATE sttproxy_meta SET version = version + 1 WHERE id = 1;
END;

CREATE TRIGGER backends_changed_update AFTER UPDATE ON backends
BEGIN
    UPDATE sttproxy_meta SET version = version + 1 WHERE id = 1;
END;

CREATE TRIGGER backends_changed_delete AFTER DELETE ON backends
BEGIN
    UPDATE sttproxy_meta SET version = version + 1 WHERE id = 1;
END;

-- Hand edits get a fresh updated_at too (recursive triggers are off, and this
-- one does not watch updated_at, so it does not fire itself).
CREATE TRIGGER backends_touch AFTER UPDATE OF id, url, target_size, max_size, weight, enabled, reuse ON backends
BEGIN
    UPDATE backends SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = NEW.id;
END;
