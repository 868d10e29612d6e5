-- Room on each page for the updates every row gets, so they are HOT (heap-only): the new
-- version goes on the same page and no index gains an entry. Every item is updated when it is
-- consigned and again when it is served; every step, attempt and SMS message once or twice
-- when its delivery is recorded. Full pages (the default, 100) made most of those updates
-- write a new entry in every index of the table: in a 20,000-item run, 17 % of item updates,
-- 66 % of attempt, 71 % of step and 45 % of sms_message updates were HOT
-- (pg_stat_user_tables; docs/performance.md). Applies to pages written from now on.
alter table item set (fillfactor = 70);
alter table step set (fillfactor = 80);
alter table attempt set (fillfactor = 80);
alter table sms_message set (fillfactor = 80);
