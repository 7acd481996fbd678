-- The offline inbox (src/inbox/): notifications waiting for a device, per (app, device_id).
-- Applied by herald at start-up (src/inbox/postgres.rs, sqlx's migrator, which takes an
-- advisory lock so nodes starting together apply it once). Never edit an applied
-- migration: add the next numbered file.

CREATE TABLE herald_inbox (
    app            text    NOT NULL,
    device_id      text    NOT NULL,
    -- The notification id (UUIDv7); one row per (app, device, id), so a redelivered queue
    -- message stores nothing twice.
    id             uuid    NOT NULL,
    -- Store order, the tie-breaker of accepted order and part of the replay cursor.
    seq            bigint  GENERATED ALWAYS AS IDENTITY,
    -- Unix milliseconds, exactly as in the notification frame.
    accepted_at_ms bigint  NOT NULL,
    expires_at_ms  bigint  NOT NULL,
    collapse_key   text,
    size_bytes     integer NOT NULL,
    -- The exact notification frame the gateway sends (JSON text as bytes).
    frame          bytea   NOT NULL,
    PRIMARY KEY (app, device_id, id)
);

-- Replay: "pending for (app, device) in accepted order", paged by (accepted_at_ms, seq).
-- Also the per-device scan of the store's bounds and collapse checks.
CREATE INDEX herald_inbox_pending ON herald_inbox (app, device_id, accepted_at_ms, seq);

-- At most one pending entry per collapse key and device (the store replaces the older).
CREATE UNIQUE INDEX herald_inbox_collapse ON herald_inbox (app, device_id, collapse_key)
    WHERE collapse_key IS NOT NULL;

-- The reaper: soonest-expired first, in batches.
CREATE INDEX herald_inbox_expiry ON herald_inbox (expires_at_ms);

-- Stores a batch of entries in the caller's single statement (one round trip, one
-- transaction) and returns every entry it removed or refused, with why:
--   'expired'  - already past its expires_at_ms (the touched devices' expired rows are
--                deleted first, so the bounds count live rows only),
--   'overflow' - over p_max_rows / p_max_bytes for its device (oldest go first), or one
--                frame bigger than p_max_bytes on its own,
--   'replaced' - an entry with the same collapse key and a later accepted_at_ms (r_by)
--                took its place.
-- The result is the one of storing the entries one by one in accepted order.
CREATE FUNCTION herald_inbox_store(
    p_app       text[],
    p_device    text[],
    p_id        uuid[],
    p_accepted  bigint[],
    p_expires   bigint[],
    p_collapse  text[],
    p_frame     bytea[],
    p_max_rows  integer,
    p_max_bytes bigint
) RETURNS TABLE (r_app text, r_device_id text, r_id uuid, r_reason text, r_by uuid)
LANGUAGE plpgsql AS $fn$
DECLARE
    now_ms bigint := (extract(epoch FROM now()) * 1000)::bigint;
BEGIN
    -- Serialize writers of the same device so the bounds hold under concurrent stores
    -- (a count taken by one transaction would not see another's uncommitted rows).
    -- Locks are taken in key order, so two batches sharing devices cannot deadlock.
    -- The two-key form keeps herald's locks apart from other users of the database:
    -- 1751478881 is 'hera' in ASCII.
    PERFORM pg_advisory_xact_lock(1751478881, k)
    FROM (SELECT DISTINCT hashtext(a || '/' || d) AS k
          FROM unnest(p_app, p_device) AS t(a, d) ORDER BY 1) AS keys;

    -- The batch as a session-local table, so each step below can read what the previous
    -- ones decided. Created once per connection (not IF NOT EXISTS, which would send a
    -- notice on every call); ON COMMIT DELETE ROWS empties it in place at each commit.
    IF to_regclass('pg_temp.herald_inbox_input') IS NULL THEN
    CREATE TEMP TABLE herald_inbox_input (
        app text, device_id text, id uuid, accepted_at_ms bigint, expires_at_ms bigint,
        collapse_key text, frame bytea, ord bigint, keep boolean
    ) ON COMMIT DELETE ROWS;
    END IF;

    INSERT INTO herald_inbox_input
    SELECT t.*, true
    FROM unnest(p_app, p_device, p_id, p_accepted, p_expires, p_collapse, p_frame)
         WITH ORDINALITY AS t;

    -- The touched devices' expired rows.
    RETURN QUERY
    DELETE FROM herald_inbox i
    USING (SELECT DISTINCT app, device_id FROM herald_inbox_input) dv
    WHERE i.app = dv.app AND i.device_id = dv.device_id AND i.expires_at_ms <= now_ms
    RETURNING i.app, i.device_id, i.id, 'expired'::text, NULL::uuid;

    -- Refused on arrival: expired, or too big for any inbox.
    RETURN QUERY
    UPDATE herald_inbox_input n SET keep = false
    WHERE n.expires_at_ms <= now_ms OR octet_length(n.frame) > p_max_bytes
    RETURNING n.app, n.device_id, n.id,
              CASE WHEN n.expires_at_ms <= now_ms THEN 'expired' ELSE 'overflow' END, NULL::uuid;

    -- Collapse keys (skipped, with their statements, when the batch has none).
    IF EXISTS (SELECT 1 FROM unnest(p_collapse) AS c WHERE c IS NOT NULL) THEN
        -- Collapse within the batch: per (device, key) the latest accepted entry wins.
        RETURN QUERY
        WITH ranked AS (
            SELECT n.ord, n.app, n.device_id, n.id,
                   first_value(n.id) OVER (PARTITION BY n.app, n.device_id, n.collapse_key
                                           ORDER BY n.accepted_at_ms DESC, n.ord DESC) AS winner
            FROM herald_inbox_input n
            WHERE n.keep AND n.collapse_key IS NOT NULL)
        UPDATE herald_inbox_input n SET keep = false
        FROM ranked r
        WHERE n.ord = r.ord AND r.winner <> r.id
        RETURNING n.app, n.device_id, n.id, 'replaced'::text, r.winner;

        -- Collapse against stored rows: the later accepted one stays.
        RETURN QUERY
        DELETE FROM herald_inbox i
        USING herald_inbox_input n
        WHERE n.keep AND n.collapse_key IS NOT NULL
          AND i.app = n.app AND i.device_id = n.device_id AND i.collapse_key = n.collapse_key
          AND i.accepted_at_ms <= n.accepted_at_ms AND i.id <> n.id
        RETURNING i.app, i.device_id, i.id, 'replaced'::text, n.id;

        RETURN QUERY
        UPDATE herald_inbox_input n SET keep = false
        FROM herald_inbox i
        WHERE n.keep AND n.collapse_key IS NOT NULL
          AND i.app = n.app AND i.device_id = n.device_id AND i.collapse_key = n.collapse_key
          AND i.id <> n.id
        RETURNING n.app, n.device_id, n.id, 'replaced'::text, i.id;
    END IF;

    INSERT INTO herald_inbox
        (app, device_id, id, accepted_at_ms, expires_at_ms, collapse_key, size_bytes, frame)
    SELECT n.app, n.device_id, n.id, n.accepted_at_ms, n.expires_at_ms, n.collapse_key,
           octet_length(n.frame), n.frame
    FROM herald_inbox_input n
    WHERE n.keep
    ORDER BY n.accepted_at_ms, n.ord
    -- A repeated (device, id), within the batch or already stored (a redelivered queue
    -- message), is kept once and reported as nothing.
    ON CONFLICT (app, device_id, id) DO NOTHING;

    -- The bounds, newest first: everything past p_max_rows rows or p_max_bytes bytes goes.
    RETURN QUERY
    DELETE FROM herald_inbox i
    USING (
        SELECT w.app, w.device_id, w.id
        FROM (
            SELECT x.app, x.device_id, x.id,
                   row_number() OVER w AS n,
                   sum(x.size_bytes) OVER w AS b
            FROM herald_inbox x
            JOIN (SELECT DISTINCT app, device_id FROM herald_inbox_input) dv
              ON x.app = dv.app AND x.device_id = dv.device_id
            WINDOW w AS (PARTITION BY x.app, x.device_id
                         ORDER BY x.accepted_at_ms DESC, x.seq DESC)
        ) w
        WHERE w.n > p_max_rows OR w.b > p_max_bytes
    ) o
    WHERE i.app = o.app AND i.device_id = o.device_id AND i.id = o.id
    RETURNING i.app, i.device_id, i.id, 'overflow'::text, NULL::uuid;
END
$fn$;
