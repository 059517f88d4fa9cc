-- pg-idempotency: compress stored response bodies with lz4 (issue 14).
--
-- A body of more than about 2 kB is compressed before it is stored (TOAST). PostgreSQL's
-- default method, pglz, costs the server about 1.5 ms per 100 kB of JSON; lz4 about a
-- quarter of that, for nearly the same size (docs/BENCHMARKS.md, "Response sizes").
-- Replays decompress faster too.
--
-- Only new values are compressed with lz4: nothing is rewritten, the change is a catalog
-- update. A server built without lz4 (it is optional at build time) keeps pglz: the
-- block asks the server which methods it has and skips the change otherwise.
--
-- One DO block, a single command: Citus propagates the change to the shards of a
-- distributed idempotency_keys from inside a block, not from a string of several commands.
DO $$
BEGIN
    IF EXISTS (
        SELECT FROM pg_settings
        WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)
    ) THEN
        ALTER TABLE idempotency_keys ALTER COLUMN body SET COMPRESSION lz4;
    END IF;
END
$$;
