-- Hybrid mail: postal operators, the letters handed to them, their batches and their events.

create table postal_operator (
    id          uuid primary key,
    code        text not null unique check (code ~ '^[a-z0-9][a-z0-9-]{1,62}$'),
    name        text not null,
    -- ISO 3166-2 region codes this operator delivers in.
    regions     text[] not null,
    created_at  timestamptz not null default now()
);

create table operator_key (
    id           uuid primary key,
    operator_id  uuid not null references postal_operator (id),
    prefix       text not null,
    key_hash     bytea not null unique,
    created_at   timestamptz not null default now(),
    revoked_at   timestamptz
);

create table postal_batch (
    id           uuid primary key,
    operator_id  uuid not null references postal_operator (id),
    batch_key    text not null,
    created_at   timestamptz not null default now(),
    unique (operator_id, batch_key)
);

-- One letter per item: rendered once, its SHA-256 is what the evidence names.
create table letter (
    item_id          uuid primary key references item (id),
    attempt_id       uuid not null unique references attempt (id),
    operator_id      uuid not null references postal_operator (id),
    pdf              bytea not null,
    pdf_sha256       text not null,
    address_lines    text[] not null,
    status           text not null check (status in
                        ('ready', 'claimed', 'printed', 'out_for_delivery', 'held_at_office',
                         'delivered', 'refused', 'undeliverable')),
    batch_id         uuid references postal_batch (id),
    claimed_at       timestamptz,
    unconfirmed_flagged_at timestamptz,
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now()
);
create index letter_ready on letter (operator_id, created_at) where status = 'ready';

-- Every event an operator reported, once per event id.
create table postal_event (
    operator_id       uuid not null references postal_operator (id),
    event_id          text not null,
    item_id           uuid not null references item (id),
    event             text not null,
    at                timestamptz not null,
    detail            jsonb not null,
    created_at        timestamptz not null default now(),
    primary key (operator_id, event_id)
);
