-- Notices by SMS and email: rendered at submission (so their digests are fixed with the rest),
-- sent by the sms and email channels, confirmed by provider reports.

create table notice (
    item_id     uuid not null references item (id),
    channel     text not null check (channel in ('sms', 'email')),
    address     text not null,
    subject     text,
    body_text   text not null,
    body_html   text,
    encoding    text,
    segments    integer,
    primary key (item_id, channel)
);

alter table attempt add column segments integer;
alter table attempt add column provider_ref text;

-- One row per SMS the gateway accepted; a second send for the same attempt is impossible.
create table sms_message (
    attempt_id    uuid primary key references attempt (id),
    item_id       uuid not null references item (id),
    provider      text not null,
    provider_id   text not null,
    segments      integer not null,
    status        text not null default 'accepted',
    reported_at   timestamptz,
    created_at    timestamptz not null default now(),
    unique (provider, provider_id)
);

-- Each delivery report once, whatever the provider repeats.
create table sms_report (
    provider     text not null,
    provider_id  text not null,
    status       text not null,
    received_at  timestamptz not null default now(),
    primary key (provider, provider_id, status)
);

create table email_message (
    attempt_id   uuid primary key references attempt (id),
    item_id      uuid not null references item (id),
    message_id   text not null,
    created_at   timestamptz not null default now()
);
