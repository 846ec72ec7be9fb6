-- The backend table (DESIGN §6) for PostgreSQL.
--
-- No CHECK constraints on the values on purpose: `sttproxy backends` validates
-- what it writes, and the proxy validates every row it reads, rejecting a bad
-- one (logged, counted) while the other rows still apply.
CREATE TABLE backends (
    id          TEXT PRIMARY KEY,
    url         TEXT NOT NULL,
    target_size BIGINT NOT NULL DEFAULT 16,
    max_size    BIGINT NOT NULL DEFAULT 1024,
    weight      BIGINT NOT NULL DEFAULT 1,
    enabled     BOOLEAN NOT NULL DEFAULT TRUE,
    reuse       TEXT NOT NULL DEFAULT 'fenced',
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row. `version` is bumped by the trigger below on every statement that
-- changes `backends`, so a poll that finds it unchanged reads nothing else.
-- `seeded`: the table has been populated once; seeds never apply after that.
CREATE TABLE sttproxy_meta (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL,
    seeded  BOOLEAN NOT NULL
);
INSERT INTO sttproxy_meta (id, version, seeded) VALUES (1, 0, FALSE);

CREATE FUNCTION sttproxy_backends_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER backends_touch BEFORE UPDATE ON backends
    FOR EACH ROW EXECUTE FUNCTION sttproxy_backends_touch();

-- Bump the version and tell every listening proxy (LISTEN sttproxy_backends);
-- the notification is delivered when the transaction commits.
CREATE FUNCTION sttproxy_backends_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v BIGINT;
BEGIN
    UPDATE sttproxy_meta SET version = version + 1 WHERE id = 1 RETURNING version INTO v;
    PERFORM pg_notify('sttproxy_backends', v::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER backends_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON backends
    FOR EACH STATEMENT EXECUTE FUNCTION sttproxy_backends_changed();
