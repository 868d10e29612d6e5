-- Evidence records are written once and never touched again: a record's place in the log moves
-- from a column of the record to a narrow insert-only table, log_entry.
--
-- Before, the sequencer gave each record its index by updating the record: PostgreSQL wrote the
-- whole row (about 700 bytes of canonical JSON) a second time, with a new entry in each of the
-- table's four indexes, left the old version behind as a dead row, and needed a trigger that let
-- exactly that one update through. The sequencer was a tenth of PostgreSQL's time under load and
-- the evidence table twice its size. Now it inserts one 24-byte row per record into log_entry,
-- and evidence refuses every UPDATE, as it did before there was a sequencer.
--
-- Finding what is left to sequence without a column to mark it: each record carries the id of
-- the transaction that wrote it (xid, 64-bit, never wraps). The head remembers what the last
-- complete pass could not see: transactions that had not started yet (xid at or above its
-- snapshot's xmax, `xid_floor`) and those still running (its snapshot's in-progress list,
-- `xid_pending`). Every other transaction had ended, so its records were visible to that pass
-- and have their entries. A pass looks only at records of those transactions, by the xid
-- index, so a long transaction anywhere on the server costs a lookup of its own records, not a
-- scan of everything written since it began.

-- Sequence what is pending, as the sequencer did until now, under the log's advisory lock
-- (LOG_LOCK in src/log.rs), so every existing record has its index before the column goes.
-- Writers of an older version may still be running: the table lock waits for their open
-- transactions and holds new ones back, so none commits a record this statement cannot see.
select pg_advisory_xact_lock(7233181676573032449);
lock table evidence in exclusive mode;
with head as (select size from evidence_log_head),
     pending as (select evidence_id, row_number() over (order by seq) - 1 as rn
                 from evidence where log_index is null),
     assigned as (update evidence e set log_index = (select size from head) + p.rn
                  from pending p where e.evidence_id = p.evidence_id returning 1)
update evidence_log_head set size = size + (select count(*) from assigned);

create table log_entry (
    log_index    bigint primary key,
    -- No foreign key: only the sequencer writes here, from records it reads in the same
    -- statement, and a record can never be deleted; a key check would lock (and so write to)
    -- every record once more.
    evidence_id  uuid not null unique
);
comment on table log_entry is
    'The evidence log''s order: record i of the Merkle tree. Written only by the sequencer, append-only.';
insert into log_entry (log_index, evidence_id)
select log_index, evidence_id from evidence where log_index is not null order by log_index;

create trigger log_entry_no_update before update or delete on log_entry
    for each row execute function evidence_is_append_only();
create trigger log_entry_no_truncate before truncate on log_entry
    for each statement execute function evidence_is_append_only();

-- Records written before this migration have no xid: they are all sequenced above.
alter table evidence add column xid xid8;
alter table evidence alter column xid set default pg_current_xact_id();
create index evidence_xid on evidence (xid) where xid is not null;

alter table evidence_log_head add column xid_floor xid8 not null default '0',
                              add column xid_pending xid8[] not null default '{}';
comment on column evidence_log_head.xid_floor is
    'xmax of the last complete pass: records of transactions from here on may lack a log_entry';
comment on column evidence_log_head.xid_pending is
    'transactions in progress at the last complete pass: their records may lack a log_entry';

-- Append-only again, without exception.
drop trigger evidence_no_update on evidence;
drop function evidence_update_refused();
alter table evidence drop column log_index;
create trigger evidence_no_update before update on evidence
    for each row execute function evidence_is_append_only();
