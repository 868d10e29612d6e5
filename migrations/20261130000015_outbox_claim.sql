-- The relay claims outbox rows by their primary key, in order. `outbox_unpublished` (id, where
-- published_at is null) was its index while it marked the rows it had published; since the
-- tenth session it deletes them in the transaction that claimed them, so every row is
-- unpublished and the partial index held an entry for every row, as the primary key does: two
-- index entries written per outbox row (two rows per item) where one does.
--
-- Rows that earlier versions marked published are removed here, as the retention job would
-- have within `retention.outbox_days`: nothing reads them, and the relay's scan of the primary
-- key would otherwise step over them on every round until then.
delete from outbox where published_at is not null;
drop index if exists outbox_unpublished;
