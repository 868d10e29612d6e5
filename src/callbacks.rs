//! Agency callbacks: an agency registers URLs and the event types it wants; each event of its
//! items is POSTed to them as JSON, signed with HMAC-SHA256.
//!
//! Events are written in the transaction that wrote their evidence (so none is lost and none
//! is told before it is committed), with one `callback_delivery` and one outbox row per
//! subscribed endpoint; an event no endpoint subscribes to is not recorded. Calls go through
//! their own queue (`webhooks`) and worker, retried with the topology's backoff; a slow or dead
//! endpoint never holds up delivery work.
//!
//! Each call carries:
//! - `Dalil-Timestamp`: Unix seconds when it was signed;
//! - `Dalil-Signature`: `v1=` + hex HMAC-SHA256(secret, timestamp + "." + body);
//! - `Dalil-Event-Id`, `Dalil-Event-Type`, `Dalil-Delivery-Id`, `Dalil-Attempt`.
//!
//! A receiver recomputes the signature over the raw body, compares in constant time, and
//! refuses timestamps more than five minutes away from its clock (replay protection). The
//! event id is the same on every retry and replay, so a receiver can drop duplicates.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::Value;
use sha2::Sha256;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::evidence::{Event, ItemContext, NewEvidence};
use crate::queue::{Envelope, CALLBACKS, DELIVERY_EXCHANGE};
use crate::worker::Outcome;

/// The event types an agency can subscribe to.
pub const TYPES: [&str; 10] = [
    "accepted",
    "consigned",
    "notified",
    "opened",
    "handed_over",
    "refused",
    "undeliverable",
    "served",
    "failed",
    "recalled",
];

/// How far a receiver should accept a timestamp from its own clock.
pub const TOLERANCE_SECONDS: i64 = 300;

/// The callback event types one evidence record stands for.
pub fn types_for(e: &NewEvidence) -> Vec<&'static str> {
    let mut types = Vec::new();
    match e.event {
        Event::SubmissionAcceptance => types.push("accepted"),
        Event::ContentConsignment => types.push("consigned"),
        Event::ConsignmentNotification => types.push("notified"),
        Event::ContentAccessTracking => types.push("opened"),
        Event::ContentHandover if e.channel.as_deref() == Some("postal") => types.push("handed_over"),
        Event::ConsignmentRejection => types.push("refused"),
        Event::Undeliverable => types.push("undeliverable"),
        Event::ContentConsignmentFailure => types.push("failed"),
        Event::Recall => types.push("recalled"),
        _ => {}
    }
    if e.details.get("served").is_some_and(Value::is_object) {
        types.push("served");
    }
    types
}

/// What the payload says beyond ids: the channel, and the reason or rule where there is one.
fn extra(e: &NewEvidence, kind: &str) -> Value {
    let mut x = serde_json::json!({ "channel": e.channel });
    match kind {
        "served" => x["served"] = serde_json::json!({ "rule": e.details["served"]["rule"] }),
        "failed" | "undeliverable" | "refused" | "recalled" => {
            if let Some(r) = e.details.get("reason").filter(|r| !r.is_null()) {
                x["reason"] = r.clone();
            }
        }
        _ => {}
    }
    x
}

/// The callback events of evidence records, as the arrays [`ctes`] reads.
#[derive(Default)]
pub struct Events<'a> {
    items: Vec<Uuid>,
    ids: Vec<Uuid>,
    kinds: Vec<&'static str>,
    evidence_ids: Vec<Uuid>,
    ats: Vec<DateTime<Utc>>,
    at_texts: Vec<String>,
    events: Vec<String>,
    extras: Vec<Value>,
    agencies: Vec<Uuid>,
    references: Vec<&'a str>,
    item_kinds: Vec<&'a str>,
}

/// The events these records (item, evidence id, event) call for: one per event type an
/// agency may subscribe to.
pub fn events<'a>(records: &[(&'a ItemContext, Uuid, &NewEvidence)]) -> Events<'a> {
    let mut x = Events::default();
    for (item, evidence_id, e) in records {
        for kind in types_for(e) {
            x.items.push(item.item_id);
            x.agencies.push(item.agency_id);
            x.references.push(item.reference.as_str());
            x.item_kinds.push(item.kind.as_str());
            x.ids.push(Uuid::now_v7());
            x.kinds.push(kind);
            x.evidence_ids.push(*evidence_id);
            x.ats.push(e.at);
            x.at_texts.push(crate::evidence::format_time(e.at));
            x.events.push(e.event.as_str());
            x.extras.push(extra(e, kind));
        }
    }
    x
}

impl<'a> Events<'a> {
    /// Binds the parameters of [`ctes`], in order.
    pub fn bind<'q>(
        &'q self,
        q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>
    where
        'a: 'q,
    {
        q.bind(&self.items)
            .bind(&self.ids)
            .bind(&self.kinds)
            .bind(&self.evidence_ids)
            .bind(&self.ats)
            .bind(&self.at_texts)
            .bind(&self.events)
            .bind(&self.extras)
            .bind(DELIVERY_EXCHANGE)
            .bind(CALLBACKS)
            .bind(&self.agencies)
            .bind(&self.references)
            .bind(&self.item_kinds)
    }
}

/// Common table expressions that write the callback events, a delivery per subscribed endpoint
/// and the outbox rows that queue them, as part of the statement that writes the evidence (so
/// in its transaction, and without a round trip of their own). They read the 13 parameters
/// after `$first` (bound by [`Events::bind`]), each row only where `guard` holds.
///
/// An event is recorded only when one of the agency's endpoints subscribes to its type as it
/// happens: an event nobody is called for would be a copy of its evidence record that no one
/// reads (three rows and nine index entries per item sent to the inbox and by SMS, about a
/// tenth of what PostgreSQL writes for it). Replay re-sends recorded events.
pub fn ctes(first: usize, guard: &str) -> String {
    let p = |n: usize| format!("${}", first + n);
    format!(
        "cb_event as (
            insert into callback_event (id, agency_id, item_id, type, evidence_id, at, payload)
            select x.id, x.agency_id, x.item_id, x.kind, x.evidence_id, x.at,
                   jsonb_build_object('id', x.id, 'type', x.kind, 'at', x.at_text,
                       'item', jsonb_build_object('id', x.item_id, 'reference', x.reference, 'kind', x.item_kind),
                       'evidence', jsonb_build_object('id', x.evidence_id, 'event', x.event)) || x.extra
            from unnest({}::uuid[], {}::uuid[], {}::text[], {}::uuid[], {}::timestamptz[], {}::text[], {}::text[],
                        {}::jsonb[], {}::uuid[], {}::text[], {}::text[])
                 as x(item_id, id, kind, evidence_id, at, at_text, event, extra, agency_id, reference, item_kind)
            where {guard}
              and exists (select from callback_endpoint ep
                          where ep.agency_id = x.agency_id and ep.disabled_at is null and x.kind = any(ep.events))
            returning id, agency_id, type
         ), cb_delivery as (
            insert into callback_delivery (id, event_id, endpoint_id, status)
            select gen_random_uuid(), ev.id, ep.id, 'pending'
            from cb_event ev join callback_endpoint ep
              on ep.agency_id = ev.agency_id and ep.disabled_at is null and ev.type = any(ep.events)
            returning id
         ), cb_outbox as (
            insert into outbox (exchange, routing_key, message_id, payload)
            select {}, {}, d.id, jsonb_build_object('type', 'callback', 'version', 1, 'delivery_id', d.id)
            from cb_delivery d
         )",
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
        p(6),
        p(7),
        p(8),
        p(11),
        p(12),
        p(13),
        p(9),
        p(10)
    )
}

/// `v1=` + hex HMAC-SHA256(secret, "{timestamp}.{body}").
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// What a receiver does: true when the signature is right and the timestamp recent.
pub fn verify(secret: &str, timestamp: &str, signature_header: &str, body: &[u8], now: i64) -> bool {
    let Ok(ts) = timestamp.parse::<i64>() else { return false };
    if (now - ts).abs() > TOLERANCE_SECONDS {
        return false;
    }
    let Some(given) = signature_header.strip_prefix("v1=").and_then(|h| hex::decode(h).ok()) else { return false };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(ts.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

/// A new endpoint's secret: 32 random bytes, shown once.
pub fn new_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("whsec_{}", hex::encode(bytes))
}

/// Checks a callback URL: absolute http(s), https unless `allow_http`, no credentials in it.
pub fn check_url(url: &str, allow_http: bool) -> Result<String, String> {
    let url = url.trim();
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("not an absolute URL: {e}"))?;
    match parsed.scheme() {
        "https" => {}
        "http" if allow_http => {}
        "http" => return Err("must be https (callbacks.allow_http is off)".into()),
        other => return Err(format!("scheme {other:?}: must be https")),
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("must not carry credentials; the signature authenticates the call".into());
    }
    if url.len() > 2000 {
        return Err("longer than 2000 characters".into());
    }
    Ok(url.to_string())
}

/// Checks a list of event types (empty: all of them).
pub fn check_types(types: &[String]) -> Result<Vec<String>, String> {
    if types.is_empty() {
        return Ok(TYPES.iter().map(|t| t.to_string()).collect());
    }
    let mut out: Vec<String> = Vec::new();
    for t in types {
        let t = t.trim();
        if !TYPES.contains(&t) {
            return Err(format!("unknown event type {t:?}; known: {}", TYPES.join(", ")));
        }
        if !out.iter().any(|o| o == t) {
            out.push(t.to_string());
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Endpoint {
    pub id: Uuid,
    pub url: String,
    pub events: Vec<String>,
    pub created_at: DateTime<Utc>,
}

/// Registers an endpoint; returns it and its secret (shown once).
pub async fn register(
    pool: &PgPool,
    agency_id: Uuid,
    url: &str,
    events: &[String],
) -> sqlx::Result<(Endpoint, String)> {
    let secret = new_secret();
    let endpoint: Endpoint = sqlx::query_as(
        "insert into callback_endpoint (id, agency_id, url, secret, events) values ($1, $2, $3, $4, $5)
         returning id, url, events, created_at",
    )
    .bind(Uuid::now_v7())
    .bind(agency_id)
    .bind(url)
    .bind(&secret)
    .bind(events)
    .fetch_one(pool)
    .await?;
    Ok((endpoint, secret))
}

pub async fn list(pool: &PgPool, agency_id: Uuid) -> sqlx::Result<Vec<Endpoint>> {
    sqlx::query_as(
        "select id, url, events, created_at from callback_endpoint where agency_id = $1 and disabled_at is null
         order by created_at",
    )
    .bind(agency_id)
    .fetch_all(pool)
    .await
}

/// Queues again every event of the agency from `since` (to `until`) for its endpoints that
/// subscribe to it now (or only `endpoint`); returns how many calls were queued.
pub async fn replay(
    conn: &mut PgConnection,
    agency_id: Uuid,
    since: DateTime<Utc>,
    until: Option<DateTime<Utc>>,
    endpoint: Option<Uuid>,
    limit: i64,
) -> sqlx::Result<Result<i64, i64>> {
    let matching: i64 = sqlx::query_scalar(
        "select count(*) from callback_event ev join callback_endpoint ep
           on ep.agency_id = ev.agency_id and ep.disabled_at is null and ev.type = any(ep.events)
         where ev.agency_id = $1 and ev.at >= $2 and ($3::timestamptz is null or ev.at < $3)
           and ($4::uuid is null or ep.id = $4)",
    )
    .bind(agency_id)
    .bind(since)
    .bind(until)
    .bind(endpoint)
    .fetch_one(&mut *conn)
    .await?;
    if matching > limit {
        return Ok(Err(matching));
    }
    let queued = sqlx::query(
        "with d as (
            insert into callback_delivery (id, event_id, endpoint_id, status, replay)
            select gen_random_uuid(), ev.id, ep.id, 'pending', true
            from callback_event ev join callback_endpoint ep
              on ep.agency_id = ev.agency_id and ep.disabled_at is null and ev.type = any(ep.events)
            where ev.agency_id = $1 and ev.at >= $2 and ($3::timestamptz is null or ev.at < $3)
              and ($4::uuid is null or ep.id = $4)
            order by ev.at
            returning id
         )
         insert into outbox (exchange, routing_key, message_id, payload)
         select $5, $6, d.id, jsonb_build_object('type', 'callback', 'version', 1, 'delivery_id', d.id) from d",
    )
    .bind(agency_id)
    .bind(since)
    .bind(until)
    .bind(endpoint)
    .bind(DELIVERY_EXCHANGE)
    .bind(CALLBACKS)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(Ok(queued as i64))
}

/// Makes the calls the `webhooks` queue asks for.
pub struct Caller {
    pool: PgPool,
    client: reqwest::Client,
}

#[derive(sqlx::FromRow)]
struct Call {
    status: String,
    attempts: i32,
    url: String,
    secret: String,
    disabled_at: Option<DateTime<Utc>>,
    payload: Value,
    event_id: Uuid,
    kind: String,
}

impl Caller {
    pub fn new(pool: PgPool, timeout: Duration) -> anyhow::Result<Caller> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // A callback answers; it does not send us elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("Dalil-Callbacks/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Caller { pool, client })
    }

    fn delivery_id(body: &[u8]) -> Result<Uuid, Outcome> {
        match serde_json::from_slice::<Envelope>(body) {
            Ok(Envelope::Callback { delivery_id, .. }) => Ok(delivery_id),
            Ok(other) => Err(Outcome::Dead(format!("not a callback: {other:?}"))),
            Err(e) => Err(Outcome::Dead(format!("malformed message: {e}"))),
        }
    }

    /// Makes the call a message asks for. `retries` (how often the message went round the
    /// retry queues) numbers the attempt: RabbitMQ may hand out a copy twice, and only one
    /// copy per attempt number goes on retrying.
    pub async fn process(&self, body: &[u8], retries: u32) -> Outcome {
        let delivery_id = match Self::delivery_id(body) {
            Ok(id) => id,
            Err(outcome) => return outcome,
        };
        match self.call(delivery_id, retries as i32).await {
            Ok(outcome) => outcome,
            Err(e) => Outcome::Retry(format!("database: {e}")),
        }
    }

    async fn call(&self, delivery_id: Uuid, retries: i32) -> sqlx::Result<Outcome> {
        let call: Option<Call> = sqlx::query_as(
            "select d.status, d.attempts, ep.url, ep.secret, ep.disabled_at, ev.payload, ev.id as event_id, ev.type as kind
             from callback_delivery d join callback_endpoint ep on ep.id = d.endpoint_id
             join callback_event ev on ev.id = d.event_id where d.id = $1",
        )
        .bind(delivery_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(call) = call else { return Ok(Outcome::Dead(format!("no callback delivery {delivery_id}"))) };
        if call.status != "pending" {
            return Ok(Outcome::Done);
        }
        if call.disabled_at.is_some() {
            self.finish(delivery_id, "failed", None, Some("the endpoint was removed")).await?;
            return Ok(Outcome::Done);
        }
        if call.attempts > retries {
            // A copy of this message already made this attempt (and scheduled what follows).
            return Ok(Outcome::Done);
        }
        let attempt = retries + 1;
        let body = serde_json::to_vec(&call.payload).expect("JSON");
        let timestamp = Utc::now().timestamp();
        let started = Instant::now();
        let result = self
            .client
            .post(&call.url)
            .header("content-type", "application/json")
            .header("dalil-timestamp", timestamp.to_string())
            .header("dalil-signature", signature(&call.secret, timestamp, &body))
            .header("dalil-event-id", call.event_id.to_string())
            .header("dalil-event-type", &call.kind)
            .header("dalil-delivery-id", delivery_id.to_string())
            .header("dalil-attempt", attempt.to_string())
            .body(body)
            .send()
            .await;
        let elapsed = started.elapsed().as_millis().min(i32::MAX as u128) as i32;
        let (code, error) = match &result {
            Ok(r) if r.status().is_success() => (Some(r.status().as_u16() as i32), None),
            Ok(r) => (Some(r.status().as_u16() as i32), Some(format!("answered {}", r.status()))),
            Err(e) if e.is_timeout() => (None, Some("timed out".to_string())),
            Err(e) if e.is_connect() => (None, Some(format!("could not connect: {e}"))),
            Err(e) => (None, Some(format!("{e}"))),
        };
        // The attempt counts once, whichever copy records it first; the other copy stops here
        // so that one chain of retries goes on, not two. (Counted after the call: a worker that
        // dies during the call leaves the attempt to the message's redelivery.)
        let mut tx = self.pool.begin().await?;
        let first = sqlx::query(
            "update callback_delivery set attempts = $2, last_status = $3, last_error = $4
             where id = $1 and attempts = $5 and status = 'pending'",
        )
        .bind(delivery_id)
        .bind(attempt)
        .bind(code)
        .bind(&error)
        .bind(retries)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !first {
            return Ok(Outcome::Done);
        }
        sqlx::query(
            "insert into callback_attempt (delivery_id, n, at, status_code, error, duration_ms)
             values ($1, $2, now(), $3, $4, $5) on conflict do nothing",
        )
        .bind(delivery_id)
        .bind(attempt)
        .bind(code)
        .bind(&error)
        .bind(elapsed)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        match error {
            None => {
                self.finish(delivery_id, "delivered", code, None).await?;
                Ok(Outcome::Done)
            }
            Some(why) => Ok(Outcome::Retry(format!("callback {}: {why}", call.url))),
        }
    }

    async fn finish(&self, id: Uuid, status: &str, code: Option<i32>, error: Option<&str>) -> sqlx::Result<()> {
        sqlx::query(
            "update callback_delivery set status = $2, last_status = coalesce($3, last_status),
                    last_error = coalesce($4, last_error), finished_at = now()
             where id = $1 and status = 'pending'",
        )
        .bind(id)
        .bind(status)
        .bind(code)
        .bind(error)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// After the last retry: the delivery fails for good (it can still be replayed).
    pub async fn give_up(&self, body: &[u8], why: &str) -> Outcome {
        let delivery_id = match Self::delivery_id(body) {
            Ok(id) => id,
            Err(outcome) => return outcome,
        };
        tracing::warn!(%delivery_id, why, "callback failed after the last retry");
        match self.finish(delivery_id, "failed", None, Some(&format!("gave up after the last retry: {why}"))).await {
            Ok(()) => Outcome::Done,
            Err(e) => Outcome::Retry(format!("recording failure: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_expire() {
        let body = br#"{"id":"x","type":"served"}"#;
        let now = 1_800_000_000;
        let sig = signature("whsec_test", now, body);
        assert!(sig.starts_with("v1=") && sig.len() == 3 + 64);
        assert!(verify("whsec_test", &now.to_string(), &sig, body, now + 10));
        assert!(!verify("whsec_other", &now.to_string(), &sig, body, now));
        assert!(!verify("whsec_test", &now.to_string(), &sig, b"{}", now));
        assert!(!verify("whsec_test", &(now + 1).to_string(), &sig, body, now));
        // Replayed after the tolerance: refused even with a good signature.
        assert!(!verify("whsec_test", &now.to_string(), &sig, body, now + TOLERANCE_SECONDS + 1));
    }

    #[test]
    fn urls_and_types_are_checked() {
        assert!(check_url("https://agency.uz/hooks/dalil", false).is_ok());
        assert!(check_url("http://agency.uz/hooks", false).is_err());
        assert!(check_url("http://127.0.0.1:9/hooks", true).is_ok());
        assert!(check_url("ftp://agency.uz/", true).is_err());
        assert!(check_url("https://user:pw@agency.uz/", false).is_err());
        assert!(check_url("/relative", true).is_err());
        assert_eq!(check_types(&[]).unwrap().len(), TYPES.len());
        assert_eq!(check_types(&["served".into(), "served".into()]).unwrap(), vec!["served"]);
        assert!(check_types(&["delivered".into()]).unwrap_err().contains("unknown event type"));
    }
}
