-- herald_inbox_store, faster for the common batch (issue 12's write benchmark): a batch
-- without collapse keys skips the temp table (the rows go from the arrays straight into the
-- insert) and deletes the touched devices' expired rows in the same pass as the bounds
-- trim, instead of a pass before the insert. Profiled with auto_explain on one 100-row
-- batch: the function took ~7 ms against ~2 ms for a raw INSERT of the same rows, spent in
-- the temp table (insert, ON COMMIT truncate), the separate expired-rows pass (one index
-- scan per device) and PL/pgSQL statement overhead; this path roughly halves it. The
-- result is the same: the rows kept, and every entry removed or refused with why. A
-- batch with collapse keys runs the 0001 steps unchanged.

CREATE OR REPLACE FUNCTION herald_inbox_store(
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

    -- The common batch, without collapse keys: straight from the arrays, no temp table,
    -- and the touched devices' expired rows and the bounds in one pass over their rows.
    IF NOT EXISTS (SELECT 1 FROM unnest(p_collapse) AS c WHERE c IS NOT NULL) THEN
        -- Refused on arrival: expired, or too big for any inbox.
        RETURN QUERY
        SELECT t.a, t.d, t.id,
               CASE WHEN t.e <= now_ms THEN 'expired' ELSE 'overflow' END, NULL::uuid
        FROM unnest(p_app, p_device, p_id, p_expires, p_frame) AS t(a, d, id, e, f)
        WHERE t.e <= now_ms OR octet_length(t.f) > p_max_bytes;

        INSERT INTO herald_inbox
            (app, device_id, id, accepted_at_ms, expires_at_ms, collapse_key, size_bytes, frame)
        SELECT t.a, t.d, t.id, t.acc, t.e, NULL, octet_length(t.f), t.f
        FROM unnest(p_app, p_device, p_id, p_accepted, p_expires, p_frame)
             WITH ORDINALITY AS t(a, d, id, acc, e, f, ord)
        WHERE t.e > now_ms AND octet_length(t.f) <= p_max_bytes
        ORDER BY t.acc, t.ord
        -- A repeated (device, id), within the batch or already stored (a redelivered
        -- queue message), is kept once and reported as nothing.
        ON CONFLICT (app, device_id, id) DO NOTHING;

        -- The touched devices' expired rows, and past the bounds (newest first, counting
        -- unexpired rows only: expired ones are a partition of their own).
        RETURN QUERY
        DELETE FROM herald_inbox i
        USING (
            SELECT w.app, w.device_id, w.id, w.why
            FROM (
                SELECT x.app, x.device_id, x.id,
                       CASE WHEN x.expires_at_ms <= now_ms THEN 'expired' ELSE 'overflow' END
                           AS why,
                       row_number() OVER w AS n,
                       sum(x.size_bytes) OVER w AS b
                FROM herald_inbox x
                JOIN (SELECT DISTINCT a, d FROM unnest(p_app, p_device) AS t(a, d)) dv
                  ON x.app = dv.a AND x.device_id = dv.d
                WINDOW w AS (PARTITION BY x.app, x.device_id, (x.expires_at_ms <= now_ms)
                             ORDER BY x.accepted_at_ms DESC, x.seq DESC)
            ) w
            WHERE w.why = 'expired' OR w.n > p_max_rows OR w.b > p_max_bytes
        ) o
        WHERE i.app = o.app AND i.device_id = o.device_id AND i.id = o.id
        RETURNING i.app, i.device_id, i.id, o.why, NULL::uuid;
        RETURN;
    END IF;

    -- A batch with collapse keys: as in 0001 (the locks are already held).

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
