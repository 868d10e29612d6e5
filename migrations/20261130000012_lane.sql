-- Each item travels in a lane (DESIGN invariant 5): 'standard' or 'bulk'. Every channel has a
-- queue per lane (queues/topology.toml: delivery.sms and delivery.sms.bulk, ...) and workers
-- consume both at once, so a batch of thousands never stands ahead of an item sent on its own.
-- The lane is kept with the item because its later steps (an escalation to paper days after)
-- are queued in the same lane. Items written before this migration were all in the one lane
-- there was, the standard one.
--
-- A column with a constant default is added without rewriting the table (PostgreSQL 11+), and
-- the checks are added NOT VALID: rows written from now on are checked, and the rows already
-- there hold the default, which passes, so the tables are not read under the ALTER's lock.
alter table item add column lane text not null default 'standard';
alter table item add constraint item_lane check (lane in ('standard', 'bulk')) not valid;

-- A letter keeps its item's lane, and operators claim the standard lane's ready letters first
-- (src/api/postal.rs), so a summons's letter is not printed after a ministry's bulk mailing.
-- The index serves that order as it is written: standard before bulk, then oldest first.
alter table letter add column lane text not null default 'standard';
alter table letter add constraint letter_lane check (lane in ('standard', 'bulk')) not valid;
drop index letter_ready;
create index letter_ready on letter (operator_id, (lane = 'bulk'), created_at) where status = 'ready';
