-- braid's PostgreSQL schema, version 1. Ids are bytea (flow ids 16 bytes,
-- holding ids 6, checksums 32) so that they sort as the embedded store's
-- keys do; times are milliseconds since the Unix epoch (bigint).

-- One row per flow: the columns that queries need, the rest of the
-- record (start, result, error, seed, exact wake time) as postcard in `rest`.
CREATE TABLE flows (
    flow_id           bytea   PRIMARY KEY,
    holding           bytea   NOT NULL,
    -- Only for client-started flows; at most one flow per vnode and id.
    client_request_id text,
    flow_name         text    NOT NULL,
    package           bytea   NOT NULL,
    status            text    NOT NULL CHECK (status IN
                          ('START_REQUESTED', 'RUNNING', 'COMPLETED', 'FAILED', 'KILLED')),
    -- The partition of the fence of the batch that last wrote the flow
    -- (0 when unfenced).
    partition         integer NOT NULL CHECK (partition BETWEEN 0 AND 65535),
    created_ms        bigint  NOT NULL,
    updated_ms        bigint  NOT NULL,
    -- updated_ms once the flow has ended, NULL before.
    ended_ms          bigint,
    -- When a suspended flow wants waking (capped at the bigint range; the
    -- exact value is in `rest`).
    wake_at_ms        bigint,
    journal_len       bigint  NOT NULL,
    -- Bumped on every write of the row.
    version           bigint  NOT NULL,
    rest              bytea   NOT NULL,
    CONSTRAINT flows_client_request_id_key UNIQUE (holding, client_request_id)
);
-- list_flows: a vnode's flows in creation order, status without a heap visit.
CREATE INDEX flows_by_vnode ON flows (holding, created_ms, flow_id) INCLUDE (status);
-- finished_before: ended flows by end time.
CREATE INDEX flows_finished ON flows (ended_ms, flow_id) WHERE ended_ms IS NOT NULL;
-- load (and a partition's takeover): the unfinished flows.
CREATE INDEX flows_unfinished ON flows (partition, flow_id) WHERE ended_ms IS NULL;
-- Timers of unfinished flows.
CREATE INDEX flows_wake ON flows (wake_at_ms) WHERE wake_at_ms IS NOT NULL AND ended_ms IS NULL;

-- Journal entries: insert-only.
CREATE TABLE journal (
    flow_id bytea  NOT NULL,
    idx     bigint NOT NULL,
    entry   bytea  NOT NULL,
    PRIMARY KEY (flow_id, idx)
);

-- Messages delivered to flows of this cluster, by SessionMessage::key
-- (which starts with the receiving flow's id); `message` is postcard.
CREATE TABLE inbox (
    key     bytea PRIMARY KEY,
    flow_id bytea NOT NULL,
    message bytea NOT NULL
);
CREATE INDEX inbox_by_flow ON inbox (flow_id, key);

-- The transactional outbox.
CREATE TABLE outbox (
    key        bytea PRIMARY KEY,
    to_holding bytea NOT NULL,
    message    bytea NOT NULL
);

CREATE TABLE vnodes (
    holding             bytea   PRIMARY KEY,
    name                text    NOT NULL,
    package             bytea   NOT NULL,
    created_ms          bigint  NOT NULL,
    flow_starts_enabled boolean NOT NULL
);

-- Package metadata (`flows` is the postcard list of the flows it offers)
-- and, apart, the bytes.
CREATE TABLE packages (
    checksum    bytea  PRIMARY KEY,
    flows       bytea  NOT NULL,
    size        bigint NOT NULL,
    uploaded_ms bigint NOT NULL
);
CREATE TABLE package_bytes (
    checksum bytea PRIMARY KEY,
    bytes    bytea NOT NULL
);

-- Kills requested and not yet carried out (reason: UTF-8).
CREATE TABLE kills (
    flow_id bytea PRIMARY KEY,
    reason  bytea NOT NULL
);

-- Node settings, RBAC state, p2p keys.
CREATE TABLE meta (
    key   text  PRIMARY KEY,
    value bytea NOT NULL
);

-- Partition owners: claim_partition increments `epoch`; an Op::Fence
-- checks it (braid_fence).
CREATE TABLE partitions (
    partition  integer     PRIMARY KEY CHECK (partition BETWEEN 0 AND 65535),
    epoch      bigint      NOT NULL,
    owner      text        NOT NULL,
    claimed_at timestamptz
);

-- The check of an Op::Fence, inside the group transaction: locks the
-- partition's row FOR SHARE (so a claim waits for this transaction) and
-- raises BR001, with the current epoch as DETAIL, when the epoch is not
-- `e`. A partition never claimed gets its row (epoch 0) here, so that
-- there is a row to lock.
CREATE FUNCTION braid_fence(p integer, e bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    cur bigint;
BEGIN
    INSERT INTO partitions (partition, epoch, owner) VALUES (p, 0, '')
        ON CONFLICT (partition) DO NOTHING;
    SELECT epoch INTO cur FROM partitions WHERE partition = p FOR SHARE;
    IF cur <> e THEN
        RAISE EXCEPTION USING
            ERRCODE = 'BR001',
            MESSAGE = format('partition %s is owned at epoch %s, not %s', p, cur, e),
            DETAIL = cur::text;
    END IF;
END
$$;
