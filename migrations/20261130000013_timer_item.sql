-- `timer_item` (every timer by its item) served the foreign key to `item`, which migration 11
-- dropped. Every query that finds timers by item asks for the item's deemed-service timer,
-- which the unique `timer_one_deemed` (item_id where kind = 'deemed') answers; timers fire by
-- `timer_due` and by id. The index cost an entry per timer written (one per item at least).
drop index if exists timer_item;
