-- The rows the pipeline writes for every item no longer carry foreign keys to the item, its
-- steps and attempts, its agency and its recipient; instead those parents can never be deleted
-- nor have their ids changed, which this migration enforces for everyone who connects.
--
-- Why: a foreign-key check is a statement of its own inside PostgreSQL (an index probe and a
-- KEY SHARE lock written onto the parent row, WAL-logged) for every child row inserted. An item
-- took about 30 of them: its steps, attempts, notice, inbox entry, SMS message, timer, four
-- evidence records and three callback events, each pointing at the item and most at its agency
-- or recipient too. `dalil bench` on 2026-11-29, alternated runs of 20,000 items at 64
-- clients: machine CPU per item 1.86-2.30 ms with the keys (seven runs), 1.65-1.98 ms without
-- (five), and 854-1,061 against 1,002-1,197 accepted items/s (docs/performance.md).
--
-- What the keys guaranteed, and what guarantees it now:
-- * A parent is not deleted while rows point at it: agency, recipient, item, step and attempt
--   rows are never deleted (nothing in Dalil deletes them; retention removes only published
--   outbox rows, finished callback deliveries and fired timers, which are children), and the
--   triggers below refuse DELETE, TRUNCATE and a change of id, so no row can be orphaned later.
-- * A child is not written with an id that names no parent: every id Dalil writes into these
--   columns it has just read from, or written to, the parent's table (the agency by its key, the
--   recipient by PINFL or TIN, the item and its steps in the same statement, the rest from the
--   job's rows); none comes from a request unread.
-- The table's owner or a superuser can still get past triggers (ALTER TABLE ... DISABLE TRIGGER,
-- session_replication_role = replica), as past the evidence table's; Dalil does neither.
-- Tables outside the per-item path (API keys, web sessions, callback endpoints and deliveries,
-- postal operators and batches, signing keys) keep their foreign keys.

alter table item           drop constraint item_agency_id_fkey,
                           drop constraint item_recipient_id_fkey;
alter table idempotency    drop constraint idempotency_agency_id_fkey;
alter table attachment     drop constraint attachment_item_id_fkey;
alter table step           drop constraint step_item_id_fkey;
alter table attempt        drop constraint attempt_item_id_fkey,
                           drop constraint attempt_step_id_fkey;
alter table inbox_entry    drop constraint inbox_entry_item_id_fkey,
                           drop constraint inbox_entry_recipient_id_fkey,
                           drop constraint inbox_entry_attempt_id_fkey;
alter table evidence       drop constraint evidence_item_id_fkey,
                           drop constraint evidence_recipient_id_fkey;
alter table notice         drop constraint notice_item_id_fkey;
alter table sms_message    drop constraint sms_message_item_id_fkey,
                           drop constraint sms_message_attempt_id_fkey;
alter table email_message  drop constraint email_message_item_id_fkey,
                           drop constraint email_message_attempt_id_fkey;
alter table letter         drop constraint letter_item_id_fkey,
                           drop constraint letter_attempt_id_fkey;
alter table postal_event   drop constraint postal_event_item_id_fkey;
alter table timer          drop constraint timer_item_id_fkey,
                           drop constraint timer_step_id_fkey;
alter table callback_event drop constraint callback_event_agency_id_fkey,
                           drop constraint callback_event_item_id_fkey;

create function parent_is_permanent() returns trigger language plpgsql as $$
begin
    raise exception '% rows are never removed and keep their ids: % refused', tg_table_name, tg_op
        using errcode = 'restrict_violation';
end $$;

-- The same three triggers on each parent. An UPDATE that does not name id (every one Dalil
-- makes) does not fire the id trigger at all.
do $$
declare t text;
begin
    foreach t in array array['agency', 'recipient', 'item', 'step', 'attempt'] loop
        execute format('create trigger %1$I before delete on %2$I
                            for each row execute function parent_is_permanent()', t || '_is_permanent', t);
        execute format('create trigger %1$I before update of id on %2$I
                            for each row when (old.id is distinct from new.id)
                            execute function parent_is_permanent()', t || '_id_is_permanent', t);
        execute format('create trigger %1$I before truncate on %2$I
                            for each statement execute function parent_is_permanent()', t || '_no_truncate', t);
    end loop;
end $$;
