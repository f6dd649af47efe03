-- The check of an Op::PutMetaIf, inside the group transaction: takes a
-- transaction-scoped advisory lock on the key (so that two writers of one
-- setting take turns, also when it does not exist yet) and raises BR002
-- when the setting's value is not `expected` (NULL: absent).
CREATE FUNCTION braid_meta_if(k text, expected bytea) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    cur bytea;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('braid meta ' || k));
    SELECT value INTO cur FROM meta WHERE key = k;
    IF cur IS DISTINCT FROM expected THEN
        RAISE EXCEPTION USING
            ERRCODE = 'BR002',
            MESSAGE = format('setting %s changed since it was read', k);
    END IF;
END
$$;
