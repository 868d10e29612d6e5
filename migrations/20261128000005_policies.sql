-- Legal service: timed steps (escalation), deemed delivery, recall, the scheduler's recurring
-- jobs, and agency callbacks.

-- What the policy decided at submission, kept on the item so that a later change of the
-- policy file never changes the rules an item was sent under.
alter table item add column digital_consent boolean not null default false;
-- Deemed service: this long after a confirmed inbox deposit (null: the policy has no such rule
-- for this recipient).
alter table item add column deemed_after interval;
alter table item add column deemed_rule jsonb;
-- Set at submission when respond_by leaves too little time for the policy's remaining steps.
alter table item add column respond_by_warning text;
alter table item add column recalled_at timestamptz;
alter table item add column recall_reason text;

-- Once served, an item stays served at the same time, by the same rule, on the same evidence.
create function item_served_once() returns trigger language plpgsql as $$
begin
    if new.served_at is distinct from old.served_at
       or new.served_rule is distinct from old.served_rule
       or new.served_evidence is distinct from old.served_evidence then
        raise exception 'item % was served at %: service is decided once', old.id, old.served_at
            using errcode = 'integrity_constraint_violation';
    end if;
    return new;
end $$;
create trigger item_served_once before update on item
    for each row when (old.served_at is not null) execute function item_served_once();

-- Steps may wait for a timer ('scheduled'), be skipped when their condition no longer holds,
-- or be cancelled by a recall.
alter table step drop constraint step_status_check;
alter table step add constraint step_status_check
    check (status in ('scheduled', 'queued', 'done', 'failed', 'skipped', 'cancelled'));
alter table step add column due_at timestamptz;
alter table step add column unless_condition text;
alter table step add column note text;
alter table attempt drop constraint attempt_status_check;
alter table attempt add constraint attempt_status_check check (status in ('queued', 'done', 'failed', 'cancelled'));
alter table letter drop constraint letter_status_check;
alter table letter add constraint letter_status_check check (status in
    ('ready', 'claimed', 'printed', 'out_for_delivery', 'held_at_office', 'delivered', 'refused', 'undeliverable',
     'recalled'));

-- Timed work. Due times live here, so a scheduler that was down fires what fell due when it
-- returns; schedulers claim timers with FOR UPDATE SKIP LOCKED, so each fires once.
create table timer (
    id          uuid primary key,
    kind        text not null check (kind in ('escalate', 'deemed')),
    item_id     uuid not null references item (id),
    step_id     uuid references step (id),
    due_at      timestamptz not null,
    fired_at    timestamptz,
    -- What firing did: queued, skipped (with why), served, or nothing to do (with why).
    outcome     text,
    fired_by    text,
    created_at  timestamptz not null default now()
);
create index timer_due on timer (due_at) where fired_at is null;
create index timer_item on timer (item_id);
create unique index timer_one_deemed on timer (item_id) where kind = 'deemed';

-- Recurring jobs: the next run of each, claimed by one scheduler at a time.
create table scheduler_job (
    name              text primary key,
    next_run_at       timestamptz not null,
    last_started_at   timestamptz,
    last_finished_at  timestamptz,
    last_error        text,
    last_claimed_by   text,
    runs              bigint not null default 0
);

-- Agency callbacks. The secret signs every call (HMAC-SHA256); it is shown once at creation
-- and kept because signing needs it.
create table callback_endpoint (
    id           uuid primary key,
    agency_id    uuid not null references agency (id),
    url          text not null,
    secret       text not null,
    events       text[] not null,
    created_at   timestamptz not null default now(),
    disabled_at  timestamptz
);
create index callback_endpoint_agency on callback_endpoint (agency_id) where disabled_at is null;

-- What an agency can be told, one row per (evidence record, event type), written in the
-- transaction that wrote the evidence. Replays re-send these.
create table callback_event (
    id           uuid primary key,
    agency_id    uuid not null references agency (id),
    item_id      uuid not null references item (id),
    type         text not null,
    evidence_id  uuid not null,
    at           timestamptz not null,
    payload      jsonb not null,
    unique (evidence_id, type)
);
create index callback_event_agency on callback_event (agency_id, at);

create table callback_delivery (
    id            uuid primary key,
    event_id      uuid not null references callback_event (id),
    endpoint_id   uuid not null references callback_endpoint (id),
    status        text not null check (status in ('pending', 'delivered', 'failed')),
    replay        boolean not null default false,
    attempts      integer not null default 0,
    last_status   integer,
    last_error    text,
    created_at    timestamptz not null default now(),
    finished_at   timestamptz
);
create index callback_delivery_endpoint on callback_delivery (endpoint_id, created_at desc);

create table callback_attempt (
    delivery_id  uuid not null references callback_delivery (id),
    n            integer not null,
    at           timestamptz not null,
    status_code  integer,
    error        text,
    duration_ms  integer not null,
    primary key (delivery_id, n)
);

-- Every evidence write may queue callbacks through the outbox, usually none: wake the relay
-- only when a statement inserted rows.
create function outbox_notify_rows() returns trigger language plpgsql as $$
begin
    if exists (select 1 from inserted) then
        perform pg_notify('dalil_outbox', '');
    end if;
    return null;
end $$;
drop trigger outbox_notify on outbox;
create trigger outbox_notify after insert on outbox
    referencing new table as inserted
    for each statement execute function outbox_notify_rows();
