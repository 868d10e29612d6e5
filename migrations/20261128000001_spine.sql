-- The delivery spine: agencies and their keys, recipients, items with their attachments,
-- delivery steps and attempts, the transactional outbox, the portal inbox and the evidence log.

create table agency (
    id          uuid primary key,
    code        text not null unique check (code ~ '^[a-z0-9][a-z0-9-]{1,62}$'),
    name        text not null check (length(name) between 1 and 300),
    created_at  timestamptz not null default now()
);

-- API keys are shown once; only their SHA-256 is kept. The prefix identifies a key in lists
-- and logs without revealing it.
create table api_key (
    id          uuid primary key,
    agency_id   uuid not null references agency (id),
    prefix      text not null,
    key_hash    bytea not null unique,
    created_at  timestamptz not null default now(),
    revoked_at  timestamptz
);

create table recipient (
    id              uuid primary key,
    pinfl           text unique check (pinfl ~ '^[0-9]{14}$'),
    tin             text unique check (tin ~ '^[0-9]{9}$'),
    name            text not null check (length(name) between 1 and 300),
    phone           text,
    email           text,
    address         jsonb,
    digital_consent boolean not null default false,
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now(),
    check ((pinfl is null) <> (tin is null))
);

create table item (
    id               uuid primary key,
    agency_id        uuid not null references agency (id),
    recipient_id     uuid not null references recipient (id),
    kind             text not null check (kind in ('notification', 'summons', 'decision', 'letter')),
    template         text not null,
    language         text not null,
    reference        text not null,
    personalisation  jsonb not null,
    subject          text not null,
    -- Rendered at submission: the digest in SubmissionAcceptance covers exactly this.
    content_html     text not null,
    content_sha256   text not null,
    respond_by       timestamptz,
    policy_id        text not null,
    policy_version   integer not null,
    status           text not null,
    served_at        timestamptz,
    served_rule      text,
    served_evidence  bigint,
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now()
);
create index item_agency_listing on item (agency_id, id desc);
create index item_agency_reference on item (agency_id, reference);
create index item_recipient on item (recipient_id);

create table attachment (
    item_id       uuid not null references item (id),
    n             integer not null,
    name          text not null,
    content_type  text not null,
    size          integer not null,
    sha256        text not null,
    data          bytea not null,
    primary key (item_id, n)
);

-- The agency's Idempotency-Key: the first answer is kept and returned on every retry.
create table idempotency (
    agency_id       uuid not null references agency (id),
    key             text not null,
    request_sha256  text not null,
    item_id         uuid,
    response        jsonb,
    created_at      timestamptz not null default now(),
    primary key (agency_id, key)
);

-- One step of an item's delivery plan on one channel.
create table step (
    id          uuid primary key,
    item_id     uuid not null references item (id),
    seq         integer not null,
    channel     text not null,
    status      text not null check (status in ('queued', 'done', 'failed')),
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now(),
    unique (item_id, seq, channel)
);

-- One try of a step. Its id is the RabbitMQ message id, so a redelivered message finds the
-- attempt it belongs to.
create table attempt (
    id           uuid primary key,
    step_id      uuid not null references step (id),
    item_id      uuid not null references item (id),
    channel      text not null,
    status       text not null check (status in ('queued', 'done', 'failed')),
    tries        integer not null default 0,
    detail       text,
    created_at   timestamptz not null default now(),
    finished_at  timestamptz
);
create index attempt_item on attempt (item_id);

-- Transactional outbox: written in the same transaction as what it announces; the relay
-- publishes rows with publisher confirms and marks them only after the broker confirmed.
create table outbox (
    id            bigserial primary key,
    exchange      text not null,
    routing_key   text not null,
    message_id    uuid not null,
    payload       jsonb not null,
    created_at    timestamptz not null default now(),
    published_at  timestamptz
);
create index outbox_unpublished on outbox (id) where published_at is null;

create function outbox_notify() returns trigger language plpgsql as $$
begin
    perform pg_notify('dalil_outbox', '');
    return null;
end $$;
create trigger outbox_notify after insert on outbox
    for each statement execute function outbox_notify();

-- The citizen's portal inbox. One deposit per item, whatever the broker redelivers.
create table inbox_entry (
    item_id          uuid primary key references item (id),
    recipient_id     uuid not null references recipient (id),
    attempt_id       uuid not null references attempt (id),
    deposited_at     timestamptz not null,
    first_opened_at  timestamptz,
    acknowledged_at  timestamptz
);
create index inbox_recipient on inbox_entry (recipient_id, deposited_at desc);

create table attachment_access (
    item_id     uuid not null,
    n           integer not null,
    first_at    timestamptz not null,
    primary key (item_id, n)
);

-- The evidence log. log_index is dense and follows commit order: every writer takes the next
-- indexes from evidence_log_head, whose row lock is held until its transaction commits.
create table evidence_log_head (
    one   boolean primary key default true check (one),
    size  bigint not null
);
insert into evidence_log_head (size) values (0);

create table evidence (
    log_index     bigint primary key,
    evidence_id   uuid not null unique,
    item_id       uuid not null references item (id),
    event         text not null,
    at            timestamptz not null,
    channel       text,
    -- RFC 8785 canonical JSON of the record, kept byte for byte, its SHA-256, and its Merkle
    -- leaf hash SHA-256(0x00 ‖ canonical) (RFC 9162).
    canonical     bytea not null,
    sha256        bytea not null,
    leaf_hash     bytea not null,
    created_at    timestamptz not null default now()
);
create index evidence_item on evidence (item_id, log_index);

-- Evidence is append-only, whoever connects: no UPDATE, DELETE or TRUNCATE.
create function evidence_is_append_only() returns trigger language plpgsql as $$
begin
    raise exception 'evidence is append-only: % refused', tg_op
        using errcode = 'insufficient_privilege';
end $$;
create trigger evidence_no_update before update or delete on evidence
    for each row execute function evidence_is_append_only();
create trigger evidence_no_truncate before truncate on evidence
    for each statement execute function evidence_is_append_only();
