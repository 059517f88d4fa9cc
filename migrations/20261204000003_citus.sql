-- pg-idempotency: sweeping, statistics and distribution that also work on Citus.
--
-- On plain PostgreSQL (and on a Citus coordinator where the tables are local) these
-- functions do what the earlier migrations did. When idempotency_keys (and
-- idempotency_requests, the phased requests in progress) are Citus distributed tables,
-- they reach each shard on its worker instead: Citus refuses the sweep's
-- `ctid = ANY(ARRAY(SELECT .. FOR UPDATE SKIP LOCKED))` across shards, and a catalog
-- subquery beside an aggregate over a distributed table. docs/OPERATIONS.md, "Citus".
--
-- Nothing here names a Citus object outside a branch that runs only once Citus is there:
-- PL/pgSQL resolves a statement's names the first time the statement runs.

-- The shards of p_table when it is a Citus table, else NULL; refuses a table whose shards
-- have several placements (a reference table, or a replication factor above 1):
-- run_command_on_shards reaches one placement of each shard, so deleting there would let
-- the copies drift apart.
CREATE FUNCTION idempotency_shard_count(p_table regclass DEFAULT 'idempotency_keys')
RETURNS integer
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    shards integer;
    replicated boolean;
BEGIN
    IF to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT count(*), coalesce(bool_or(placements > 1), false)
    INTO shards, replicated
    FROM (SELECT s.shardid, count(p.placementid) AS placements
          FROM pg_dist_shard s
          LEFT JOIN pg_dist_placement p USING (shardid)
          WHERE s.logicalrelid = p_table
          GROUP BY s.shardid) per_shard;
    IF shards = 0 THEN
        RETURN NULL;
    END IF;
    IF replicated THEN
        RAISE EXCEPTION '% has shards with several placements', p_table
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Distribute it by scope with one placement per shard: '
                         'SELECT idempotency_distribute()';
    END IF;
    RETURN shards;
END
$$;
COMMENT ON FUNCTION idempotency_shard_count(regclass) IS
    'pg-idempotency: how many Citus shards the table (default idempotency_keys) has, NULL '
    'when it is a plain table; refuses a table whose shards have several placements.';

-- Runs `command` on every shard of p_table (%1$s names the shard) and adds up the
-- integers the shards answer. Each shard runs it in a transaction of its own on its
-- worker, which commits at once: no lock outlives one shard's statement.
CREATE FUNCTION idempotency_on_shards(p_table regclass, p_command text)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    total bigint := 0;
    answer record;
BEGIN
    FOR answer IN
        SELECT shardid, success, result FROM run_command_on_shards(p_table, p_command)
    LOOP
        IF NOT answer.success THEN
            RAISE EXCEPTION 'shard % of % failed: %', answer.shardid, p_table, answer.result;
        END IF;
        total := total + answer.result::bigint;
    END LOOP;
    RETURN total;
END
$$;
COMMENT ON FUNCTION idempotency_on_shards(regclass, text) IS
    'pg-idempotency: runs a command on each Citus shard of a table, each in its own '
    'transaction on its worker, and returns the sum of the integers they answer.';

-- Deletes at most p_batch expired rows of p_table (per shard on Citus), skipping rows
-- other transactions hold. p_table is one of this crate's tables, each with expires_at.
CREATE FUNCTION idempotency_sweep_table(p_table regclass, p_batch integer)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    deleted bigint;
    statement constant text :=
        'WITH gone AS (DELETE FROM %1$s WHERE ctid = ANY (ARRAY('
        'SELECT ctid FROM %1$s WHERE expires_at <= now() LIMIT %2$s '
        'FOR UPDATE SKIP LOCKED)) AND expires_at <= now() RETURNING 1) '
        'SELECT count(*) FROM gone';
BEGIN
    IF p_batch <= 0 THEN
        RETURN 0;
    END IF;
    IF idempotency_shard_count(p_table) IS NULL THEN
        EXECUTE format(statement, p_table, p_batch) INTO deleted;
        RETURN deleted;
    END IF;
    -- %1$s stays for run_command_on_shards to fill in with each shard's name.
    RETURN idempotency_on_shards(p_table, replace(statement, '%2$s', p_batch::text));
END
$$;
COMMENT ON FUNCTION idempotency_sweep_table(regclass, integer) IS
    'pg-idempotency: deletes at most p_batch expired rows of one of the crate''s tables (per '
    'shard on Citus), skipping rows other transactions hold; idempotency_sweep''s worker.';

-- The same contract as before per shard: at most p_batch expired rows per shard of
-- idempotency_keys, then of idempotency_requests with what is left of the batch on a
-- plain database (a plain table is one shard).
CREATE OR REPLACE FUNCTION idempotency_sweep(p_batch integer)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    keys bigint := idempotency_sweep_table('idempotency_keys', p_batch);
BEGIN
    IF idempotency_shard_count('idempotency_requests') IS NULL THEN
        RETURN keys + idempotency_sweep_table('idempotency_requests', p_batch - keys::integer);
    END IF;
    RETURN keys + idempotency_sweep_table('idempotency_requests', p_batch);
END
$$;
COMMENT ON FUNCTION idempotency_sweep(integer) IS
    'pg-idempotency: deletes at most p_batch expired rows per shard (a plain table is one '
    'shard; on Citus each shard commits on its own worker) of idempotency_keys and '
    'idempotency_requests (abandoned phased requests), skipping rows other transactions '
    'hold, and returns how many it deleted. Called by the crate''s sweeper, its CLI, and '
    'pg_cron (SELECT idempotency_sweep(1000)).';

-- Sizes and dead tuples of idempotency_keys, added up over its shards on Citus.
CREATE FUNCTION idempotency_storage(
    OUT table_bytes bigint, OUT index_bytes bigint, OUT dead_tuples bigint)
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    IF idempotency_shard_count() IS NULL THEN
        table_bytes := pg_table_size('idempotency_keys'::regclass);
        index_bytes := pg_indexes_size('idempotency_keys'::regclass);
        dead_tuples := coalesce((SELECT n_dead_tup FROM pg_stat_user_tables
                                 WHERE relid = 'idempotency_keys'::regclass), 0);
        RETURN;
    END IF;
    table_bytes := citus_table_size('idempotency_keys'::regclass);
    index_bytes := citus_total_relation_size('idempotency_keys'::regclass) - table_bytes;
    dead_tuples := idempotency_on_shards('idempotency_keys',
        'SELECT coalesce(sum(n_dead_tup), 0) FROM pg_stat_user_tables '
        'WHERE relid = ''%1$s''::regclass');
END
$$;
COMMENT ON FUNCTION idempotency_storage() IS
    'pg-idempotency: heap and TOAST bytes, index bytes and dead tuples of idempotency_keys, '
    'over all its shards on Citus.';

-- Distributes idempotency_keys by scope, and idempotency_requests co-located with it
-- (true), or leaves them as they are when they already are (false). Refuses when Citus is
-- missing or a table is distributed another way.
CREATE FUNCTION idempotency_distribute()
RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    column_name text;
    distributed boolean := false;
BEGIN
    IF to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RAISE EXCEPTION 'the citus extension is not installed in this database'
            USING ERRCODE = 'undefined_object',
                  HINT = 'Connect to a Citus coordinator database with CREATE EXTENSION citus and workers added.';
    END IF;
    SELECT column_to_column_name(logicalrelid, partkey) INTO column_name
    FROM pg_dist_partition WHERE logicalrelid = 'idempotency_keys'::regclass;
    IF NOT FOUND THEN
        PERFORM create_distributed_table('idempotency_keys'::regclass::text, 'scope');
        distributed := true;
    ELSIF column_name IS DISTINCT FROM 'scope' THEN
        RAISE EXCEPTION 'idempotency_keys is already a Citus table, distributed by %',
            coalesce(column_name, 'nothing (a reference or single-shard table)')
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'undistribute_table(''idempotency_keys''), then distribute it by scope';
    END IF;
    PERFORM idempotency_shard_count(); -- refuses several placements per shard
    RETURN idempotency_colocate('idempotency_requests', 'scope') OR distributed;
END
$$;
COMMENT ON FUNCTION idempotency_distribute() IS
    'pg-idempotency: distributes idempotency_keys by scope on Citus, and '
    'idempotency_requests co-located with it; false when they already are. Run once, before '
    'the tables grow (distributing copies their rows).';

-- Distributes a business table by its tenant column, co-located with idempotency_keys
-- (true), or leaves it when it already is (false): one request's key row and business
-- rows then live on one worker and commit as a single-node transaction.
CREATE FUNCTION idempotency_colocate(p_table regclass, p_column text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    ours integer;
    theirs integer;
    column_name text;
BEGIN
    IF NOT coalesce(idempotency_shard_count() IS NOT NULL, false) THEN
        RAISE EXCEPTION 'idempotency_keys is not distributed yet'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'SELECT idempotency_distribute() first.';
    END IF;
    SELECT colocationid INTO ours
    FROM pg_dist_partition WHERE logicalrelid = 'idempotency_keys'::regclass;
    SELECT colocationid, column_to_column_name(logicalrelid, partkey)
    INTO theirs, column_name
    FROM pg_dist_partition WHERE logicalrelid = p_table;
    IF NOT FOUND THEN
        PERFORM create_distributed_table(p_table::text, p_column,
                                         colocate_with => 'idempotency_keys'::regclass::text);
        RETURN true;
    END IF;
    IF theirs IS DISTINCT FROM ours OR column_name IS DISTINCT FROM p_column THEN
        RAISE EXCEPTION '% is already a Citus table, distributed by % and not co-located with idempotency_keys',
            p_table, coalesce(column_name, 'nothing')
            USING ERRCODE = 'feature_not_supported',
                  HINT = format('undistribute_table(%L), then co-locate it', p_table::text);
    END IF;
    RETURN false;
END
$$;
COMMENT ON FUNCTION idempotency_colocate(regclass, text) IS
    'pg-idempotency: distributes a business table by its tenant column on Citus, co-located '
    'with idempotency_keys; false when it already is.';
