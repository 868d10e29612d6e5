-- Room on each page for one new version of every row on it, so the update each row gets when
-- its delivery is recorded is HOT (heap-only: no new index entries, no row on another page).
--
-- Migration 9 left a fifth to a third of each page free, which is room for new versions of a
-- quarter (a page 80 % full) to three sevenths (70 %) of the page's rows. That is not how they are updated: rows written together
-- (a submission batch) sit together, and are updated together (a worker's batch, one
-- statement), when no old version on the page can be pruned yet, because the statement itself
-- deleted them. The rest of the page's rows then move to another page with a new entry in
-- every index. In a 20,000-item run (2026-11-30, `dalil bench`, pg_stat_user_tables) 36 % of
-- item, 43 % of attempt, 55 % of step and 39 % of sms_message updates were HOT, which left
-- about 160,000 index entries and 66,000 moved rows to write, eight entries per item.
--
-- A row and its new version must both fit, with their line pointers and alignment: an attempt
-- grows when done (104 bytes queued, 112 done in the inbox and 122-126 with an SMS provider's
-- reference), an SMS message when reported (its report time: 96 → 104), a step (about 96) and
-- an item (about 900 with its content) stay the same size. Applies to pages written from now on.
-- With this room, the same run: every one of those updates HOT; the attempts', steps' and
-- items' update statements took 0.8 s of PostgreSQL's time instead of 2.5 s, the SMS reports'
-- 1.7 s instead of 2.2 s, and the server's WAL was 259 MB instead of 288 (docs/performance.md).
alter table item set (fillfactor = 50);
alter table step set (fillfactor = 45);
alter table attempt set (fillfactor = 40);
alter table sms_message set (fillfactor = 45);
