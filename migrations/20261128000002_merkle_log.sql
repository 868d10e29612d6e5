-- The evidence log as a Merkle tree (RFC 9162): stored perfect subtrees, signed checkpoints,
-- the keys that sign them, and what the monitor found.

-- Node (level, idx) is the hash of the perfect subtree over leaves [idx·2^level, (idx+1)·2^level).
-- Level 0 is evidence.leaf_hash; levels ≥ 1 live here, written once by the integrator.
create table merkle_node (
    level  smallint not null check (level between 1 and 63),
    idx    bigint not null,
    hash   bytea not null,
    primary key (level, idx)
);

create table log_state (
    one              boolean primary key default true check (one),
    -- Leaves [0, integrated_size) have all their perfect nodes in merkle_node.
    integrated_size  bigint not null,
    -- Checkpoints up to this size have been re-verified by the monitor.
    monitored_size   bigint not null
);
insert into log_state (integrated_size, monitored_size) values (0, 0);

-- Public halves of the keys that sign checkpoints. Private keys never enter the database.
create table signing_key (
    key_id       text primary key,
    name         text not null,
    public_key   bytea not null,
    not_before   timestamptz not null,
    not_after    timestamptz,
    created_at   timestamptz not null default now()
);
create unique index signing_key_one_active on signing_key ((true)) where not_after is null;

-- Signed tree heads in the C2SP signed-note checkpoint format. Stored, never rewritten. After a
-- key rotation the same size may be signed again by the new key.
create table checkpoint (
    size        bigint not null,
    key_id      text not null references signing_key (key_id),
    root        bytea not null,
    note        text not null,
    created_at  timestamptz not null default now(),
    primary key (size, key_id)
);

create trigger checkpoint_no_update before update or delete on checkpoint
    for each row execute function evidence_is_append_only();
create trigger checkpoint_no_truncate before truncate on checkpoint
    for each statement execute function evidence_is_append_only();
create trigger merkle_node_no_update before update or delete on merkle_node
    for each row execute function evidence_is_append_only();

-- Every inconsistency the monitor found: loud in the logs, counted in /metrics, kept here.
create table log_alarm (
    id          bigserial primary key,
    size        bigint not null,
    reason      text not null,
    created_at  timestamptz not null default now()
);
