-- pg-idempotency: least privilege for the crate's functions (issue 12).
--
-- 1. Each function pins its search_path (pg_catalog, the schema it lives in, pg_temp
--    last), so that objects a caller creates in a schema earlier on its own search_path
--    can never stand in for the tables or built-ins the function uses.
-- 2. EXECUTE is no longer granted to PUBLIC (PostgreSQL's default for new functions):
--    only the owner and the roles that use them keep it. A role that may INSERT into
--    idempotency_keys stores responses, so it may wait for a key
--    (idempotency_wait_lock); a role that may DELETE from it sweeps (idempotency_sweep).
--    A role that may SELECT from it reads the statistics (idempotency_storage and the
--    shard helpers); distributing with Citus stays the owner's.
--    The grants below carry over the table grants that exist now, so a deployment with a
--    separate application role keeps working; a role created later gets its EXECUTE
--    grants with its table grants (docs/OPERATIONS.md, "Least privilege").
DO $$
DECLARE
    function regprocedure;
    schema_name text;
    privilege text;
    grantee text;
BEGIN
    -- A function under several privileges is granted to the holders of each: the sweep's
    -- helpers run with its caller's rights, and stats reads the sizes and the shards.
    -- NULL: the owner's alone (distributing is DDL).
    FOR function, privilege IN
        VALUES ('idempotency_wait_lock(bigint, integer)'::regprocedure, 'INSERT'),
               ('idempotency_sweep(integer)'::regprocedure, 'DELETE'),
               ('idempotency_sweep_table(regclass, integer)'::regprocedure, 'DELETE'),
               ('idempotency_on_shards(regclass, text)'::regprocedure, 'DELETE'),
               ('idempotency_on_shards(regclass, text)'::regprocedure, 'SELECT'),
               ('idempotency_shard_count(regclass)'::regprocedure, 'DELETE'),
               ('idempotency_shard_count(regclass)'::regprocedure, 'SELECT'),
               ('idempotency_storage()'::regprocedure, 'SELECT'),
               ('idempotency_distribute()'::regprocedure, NULL),
               ('idempotency_colocate(regclass, text)'::regprocedure, NULL)
    LOOP
        SELECT n.nspname INTO schema_name
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE p.oid = function;
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %I, pg_temp',
                       function, schema_name);
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', function);
        FOR grantee IN
            SELECT DISTINCT CASE acl.grantee WHEN 0 THEN 'PUBLIC'
                                ELSE quote_ident(pg_get_userbyid(acl.grantee)) END
            FROM pg_class c, aclexplode(c.relacl) AS acl
            WHERE c.oid = 'idempotency_keys'::regclass
              AND acl.privilege_type = privilege
              AND acl.grantee <> c.relowner
        LOOP
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', function, grantee);
        END LOOP;
    END LOOP;
END
$$;
