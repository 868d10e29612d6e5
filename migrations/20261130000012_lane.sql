-- Each item travels in a lane (DESIGN invariant 5): 'standard' or 'bulk'. Every channel has a
-- queue per lane (queues/topology.toml: delivery.sms and delivery.sms.bulk, ...) and workers
-- consume both at once, so a batch of thousands never stands ahead of an item sent on its own.
-- The lane is kept with the item because its later steps (an escalation to paper days after)
-- are queued in the same lane. Items written before this migration were all in the one lane
-- there was, the standard one.
--
-- A column with a constant default is added without rewriting the table (PostgreSQL 11+); the
-- check makes PostgreSQL read the table once, under the ALTER's lock, to verify it.
alter table item add column lane text not null default 'standard'
    constraint item_lane check (lane in ('standard', 'bulk'));
