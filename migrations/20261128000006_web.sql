-- The citizen's web inbox: sign-in by a one-time code sent by SMS, server-side sessions, and
-- evidence of a recipient's own settings (consent, contact points), which belongs to no item.

create table otp_challenge (
    id           uuid primary key,
    pinfl        text not null,
    -- Null when no recipient with a phone has this PINFL: the challenge then never succeeds,
    -- and the page says the same as for a real one, so it does not reveal who is registered.
    recipient_id uuid references recipient (id),
    -- SHA-256 of the challenge id and the code; the code itself is never stored.
    code_hash    bytea not null,
    client_addr  text not null,
    provider_ref text,
    created_at   timestamptz not null default now(),
    expires_at   timestamptz not null,
    attempts     integer not null default 0,
    used_at      timestamptz
);
create index otp_challenge_pinfl on otp_challenge (pinfl, created_at);
create index otp_challenge_addr on otp_challenge (client_addr, created_at);
create index otp_challenge_provider on otp_challenge (provider_ref) where provider_ref is not null;

-- A session is a random token in an HttpOnly cookie; only its SHA-256 is kept. Signing out
-- ends it here, whatever the browser keeps.
create table web_session (
    token_hash    bytea primary key,
    recipient_id  uuid not null references recipient (id),
    pinfl         text not null,
    csrf          text not null,
    created_at    timestamptz not null default now(),
    last_seen_at  timestamptz not null default now(),
    expires_at    timestamptz not null,
    ended_at      timestamptz
);
create index web_session_recipient on web_session (recipient_id);

-- Evidence about a recipient rather than an item (a change of consent or of contact points).
alter table evidence alter column item_id drop not null;
alter table evidence add column recipient_id uuid references recipient (id);
alter table evidence add constraint evidence_has_subject check (item_id is not null or recipient_id is not null);
create index evidence_recipient on evidence (recipient_id, log_index) where recipient_id is not null;
