-- Log indexes are assigned after commit, by one sequencer (src/log.rs), instead of inside every
-- writing transaction. Before, each writer took its indexes from evidence_log_head and held that
-- row's lock until it committed, so evidence-writing transactions committed one at a time
-- (about 1,300/s here, four per item). Now writers insert records without an index and never
-- wait for one another; the sequencer, under the log's advisory lock, gives every committed
-- record without an index the next index, in insertion order, and advances the head. Indexes stay
-- dense and are never reassigned; the record's bytes never change.

-- Insertion order: what the sequencer follows. A record written after another one committed
-- (the worker's deposit after the submission) always has a larger seq, so an item's records keep
-- their order in the log.
drop trigger evidence_no_update on evidence;
alter table evidence add column seq bigint;
update evidence set seq = log_index + 1;
create sequence evidence_seq_seq as bigint owned by evidence.seq;
select setval('evidence_seq_seq', coalesce((select max(seq) from evidence), 0) + 1, false);
alter table evidence alter column seq set default nextval('evidence_seq_seq');
alter table evidence alter column seq set not null;

alter table evidence drop constraint evidence_pkey;
alter table evidence alter column log_index drop not null;
-- Partial: a record enters this index when it is sequenced, not at insert (nulls would all
-- crowd onto the index's last page, which every writer would then contend for).
create unique index evidence_log_index on evidence (log_index) where log_index is not null;
-- What the sequencer has still to do.
create index evidence_unsequenced on evidence (seq) where log_index is null;
drop index evidence_item;
create index evidence_item on evidence (item_id, seq);
drop index evidence_recipient;
create index evidence_recipient on evidence (recipient_id, seq) where recipient_id is not null;

comment on table evidence_log_head is
    'size = records sequenced so far; only the sequencer (holding the log advisory lock) moves it';

-- Still append-only: the one change allowed is the sequencer giving a record its index, once.
-- Every other column must stay as written.
create function evidence_sequenced_once() returns trigger language plpgsql as $$
begin
    if old.log_index is null and new.log_index is not null
       and (new.evidence_id, new.item_id, new.recipient_id, new.event, new.at, new.channel, new.canonical,
            new.sha256, new.leaf_hash, new.created_at, new.seq)
           is not distinct from
           (old.evidence_id, old.item_id, old.recipient_id, old.event, old.at, old.channel, old.canonical,
            old.sha256, old.leaf_hash, old.created_at, old.seq) then
        return new;
    end if;
    raise exception 'evidence is append-only: UPDATE refused (only the sequencer gives a record its log index, once)'
        using errcode = 'insufficient_privilege';
end $$;
create trigger evidence_no_update before update on evidence
    for each row execute function evidence_sequenced_once();
create trigger evidence_no_delete before delete on evidence
    for each row execute function evidence_is_append_only();

-- The record that served an item is named by its evidence id: its index may not be assigned yet
-- when the item is served.
alter table item add column served_evidence_id uuid;
update item i set served_evidence_id = e.evidence_id from evidence e where e.log_index = i.served_evidence;
drop trigger item_served_once on item;
alter table item drop column served_evidence;
alter table item rename column served_evidence_id to served_evidence;
create trigger item_served_once before update on item
    for each row when (old.served_at is not null) execute function item_served_once();

-- No NOTIFY from writing transactions: PostgreSQL makes every transaction that sent one take
-- the same lock at commit and hold it through the WAL flush, so they committed one at a time.
-- The relay polls (relay.poll_interval_ms) and is woken in-process after a submission.
drop trigger outbox_notify on outbox;
drop function outbox_notify_rows();
drop function outbox_notify();

