//! The evidence log: append-only records of every event in an item's life, named after
//! ETSI EN 319 522, each kept as RFC 8785 canonical JSON with its SHA-256.
//!
//! A record is written in the transaction of the change it proves, without a log index: writers
//! never wait for one another. The sequencer ([`crate::log::sequence`]) gives committed records
//! their dense indexes afterwards, in insertion order. Records of version 2 therefore do not
//! carry their index; the index is their position in the Merkle tree, which inclusion proofs
//! fix. Version 1 records (written before the sequencer) name theirs and stay verifiable.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub enum Event {
    SubmissionAcceptance,
    SubmissionRejection,
    ContentConsignment,
    ContentConsignmentFailure,
    ConsignmentNotification,
    ConsignmentNotificationFailure,
    NotificationDelivered,
    ContentAccessTracking,
    ContentHandover,
    /// The recipient acknowledged receipt in the portal (ETSI's acceptance by the recipient).
    ConsignmentAcceptance,
    ConsignmentRejection,
    RelayToNonERDS,
    RelayFailure,
    Undeliverable,
    DeemedDelivery,
    Recall,
    /// A recipient changed their own settings (digital consent, contact points). Not about an
    /// item: the record names the recipient only.
    RecipientSettingsChange,
}

impl Event {
    pub fn as_str(self) -> String {
        // The serde name is the one in the records; keep one spelling.
        serde_json::to_value(self).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
    }
}

/// Who caused the event.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", content = "id", rename_all = "lowercase")]
pub enum Actor {
    Agency(String),
    Citizen(String),
    Platform(String),
}

/// The item an event belongs to, as every record names it: sender, recipient and the policy
/// that drives it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ItemContext {
    pub item_id: Uuid,
    pub agency_id: Uuid,
    pub agency_code: String,
    /// The item's kind and the agency's reference, which callbacks carry.
    pub kind: String,
    pub reference: String,
    pub recipient_scheme: String,
    pub recipient_value: String,
    pub policy_id: String,
    pub policy_version: i32,
}

impl ItemContext {
    pub async fn load(conn: &mut PgConnection, item_id: Uuid) -> sqlx::Result<ItemContext> {
        sqlx::query_as(
            "select i.id as item_id, a.id as agency_id, a.code as agency_code, i.kind, i.reference,
                    case when r.pinfl is not null then 'pinfl' else 'tin' end as recipient_scheme,
                    coalesce(r.pinfl, r.tin) as recipient_value,
                    i.policy_id, i.policy_version
             from item i join agency a on a.id = i.agency_id join recipient r on r.id = i.recipient_id
             where i.id = $1",
        )
        .bind(item_id)
        .fetch_one(conn)
        .await
    }
}

/// An event to record.
#[derive(Debug, Clone)]
pub struct NewEvidence {
    pub event: Event,
    pub at: DateTime<Utc>,
    pub actor: Actor,
    pub channel: Option<String>,
    pub details: Value,
    /// SHA-256 digests of the content the event is about, when it is about content.
    pub digests: Option<Value>,
}

#[derive(Serialize)]
struct Record<'a> {
    version: u32,
    evidence_id: Uuid,
    event: Event,
    at: String,
    item_id: Uuid,
    sender: Value,
    recipient: Value,
    actor: &'a Actor,
    channel: &'a Option<String>,
    policy: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    digests: &'a Option<Value>,
    details: &'a Value,
}

/// Version of the records written now: 2 has no `log_index` inside.
pub const RECORD_VERSION: u32 = 2;

/// One appended record, as stored. Its log index comes later, from the sequencer.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Appended {
    pub evidence_id: Uuid,
    pub event: Event,
    pub at: DateTime<Utc>,
    pub sha256: String,
    /// The record's canonical bytes, as stored.
    #[serde(skip)]
    pub canonical: Vec<u8>,
}

impl Appended {
    /// The record as [`for_item`] would read it back, before the sequencer has indexed it.
    pub fn stored(&self) -> StoredEvidence {
        let record: Value = serde_json::from_slice(&self.canonical).unwrap_or(Value::Null);
        StoredEvidence {
            evidence_id: self.evidence_id,
            log_index: None,
            event: self.event.as_str(),
            at: self.at,
            channel: record["channel"].as_str().map(String::from),
            sha256: self.sha256.clone(),
            record,
        }
    }
}

/// PostgreSQL keeps microseconds; records carry the same time as the row.
pub fn now() -> DateTime<Utc> {
    truncate(Utc::now())
}

pub fn truncate(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The canonical bytes of a JSON value (RFC 8785).
pub fn canonical(value: &impl Serialize) -> Vec<u8> {
    crate::jcs::to_vec(&serde_json::to_value(value).expect("evidence records are plain JSON"))
}

/// Appends records of one item; the caller owns the transaction.
pub async fn append(
    conn: &mut PgConnection,
    item: &ItemContext,
    events: Vec<NewEvidence>,
) -> sqlx::Result<Vec<Appended>> {
    append_many(conn, &[(item, events)]).await
}

/// Appends records of several items, with their callbacks, in one statement; the caller owns
/// the transaction. Returns the records in the order given.
pub async fn append_many(
    conn: &mut PgConnection,
    batch: &[(&ItemContext, Vec<NewEvidence>)],
) -> sqlx::Result<Vec<Appended>> {
    let prepared = prepare(batch);
    if prepared.appended.is_empty() {
        return Ok(Vec::new());
    }
    prepared.bind(sqlx::query(&APPEND_SQL)).execute(&mut *conn).await?;
    Ok(prepared.appended)
}

static APPEND_SQL: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("with {} select 1", ctes(0, "true")));

/// Records ready to be written by [`ctes`]: their rows as arrays, and their callbacks.
pub struct Prepared<'a> {
    ids: Vec<Uuid>,
    items: Vec<Uuid>,
    names: Vec<String>,
    times: Vec<DateTime<Utc>>,
    channels: Vec<Option<String>>,
    bodies: Vec<Vec<u8>>,
    hashes: Vec<Vec<u8>>,
    leaves: Vec<Vec<u8>>,
    callbacks: crate::callbacks::Events<'a>,
    /// What the records are, as [`append`] returns them.
    pub appended: Vec<Appended>,
}

/// Builds the records of these events (canonical JSON, hashes, leaf hashes) and their
/// callbacks, to be written by a statement that uses [`ctes`].
pub fn prepare<'a>(batch: &[(&'a ItemContext, Vec<NewEvidence>)]) -> Prepared<'a> {
    let n: usize = batch.iter().map(|(_, events)| events.len()).sum();
    let mut p = Prepared {
        ids: Vec::with_capacity(n),
        items: Vec::with_capacity(n),
        names: Vec::with_capacity(n),
        times: Vec::with_capacity(n),
        channels: Vec::with_capacity(n),
        bodies: Vec::with_capacity(n),
        hashes: Vec::with_capacity(n),
        leaves: Vec::with_capacity(n),
        callbacks: Default::default(),
        appended: Vec::with_capacity(n),
    };
    let mut records: Vec<(&ItemContext, Uuid, &NewEvidence)> = Vec::with_capacity(n);
    for (item, events) in batch {
        for e in events {
            let evidence_id = Uuid::now_v7();
            records.push((*item, evidence_id, e));
            let at = truncate(e.at);
            let bytes = canonical(&Record {
                version: RECORD_VERSION,
                evidence_id,
                event: e.event,
                at: format_time(at),
                item_id: item.item_id,
                sender: serde_json::json!({ "agency": item.agency_code }),
                recipient: serde_json::json!({ item.recipient_scheme.clone(): item.recipient_value }),
                actor: &e.actor,
                channel: &e.channel,
                policy: serde_json::json!({ "id": item.policy_id, "version": item.policy_version }),
                digests: &e.digests,
                details: &e.details,
            });
            let hash = Sha256::digest(&bytes).to_vec();
            p.leaves.push(crate::merkle::leaf_hash(&bytes).to_vec());
            p.appended.push(Appended {
                evidence_id,
                event: e.event,
                at,
                sha256: hex::encode(&hash),
                canonical: bytes.clone(),
            });
            p.ids.push(evidence_id);
            p.items.push(item.item_id);
            p.names.push(e.event.as_str());
            p.times.push(at);
            p.channels.push(e.channel.clone());
            p.bodies.push(bytes);
            p.hashes.push(hash);
        }
    }
    p.callbacks = crate::callbacks::events(&records);
    p
}

impl<'a> Prepared<'a> {
    /// Binds the 21 parameters of [`ctes`], in order.
    pub fn bind<'q>(
        &'q self,
        q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>
    where
        'a: 'q,
    {
        let q = q
            .bind(&self.ids)
            .bind(&self.items)
            .bind(&self.names)
            .bind(&self.times)
            .bind(&self.channels)
            .bind(&self.bodies)
            .bind(&self.hashes)
            .bind(&self.leaves);
        self.callbacks.bind(q)
    }
}

/// Common table expressions that insert prepared records (the 8 parameters after `$first`) and
/// their callbacks (the 13 after those), each row only where `guard` (an SQL condition, which
/// may name the row's item as `x.item_id`) holds: a statement that writes an item can write its evidence
/// too, without a round trip of its own.
pub fn ctes(first: usize, guard: &str) -> String {
    let p = |n: usize| format!("${}", first + n);
    format!(
        "ev_records as (
            insert into evidence (evidence_id, item_id, event, at, channel, canonical, sha256, leaf_hash)
            select e, item_id, n, t, c, b, h, f
            from unnest({}::uuid[], {}::uuid[], {}::text[], {}::timestamptz[], {}::text[], {}::bytea[], {}::bytea[],
                        {}::bytea[]) with ordinality as x(e, item_id, n, t, c, b, h, f, o)
            where {guard}
            order by o
         ), {}",
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
        p(6),
        p(7),
        p(8),
        crate::callbacks::ctes(first + 8, guard)
    )
}

#[derive(Serialize)]
struct RecipientRecord<'a> {
    version: u32,
    evidence_id: Uuid,
    event: Event,
    at: String,
    recipient: Value,
    actor: &'a Actor,
    channel: &'a Option<String>,
    details: &'a Value,
}

/// Appends one record about a recipient rather than an item (their own settings).
pub async fn append_for_recipient(
    conn: &mut PgConnection,
    recipient_id: Uuid,
    recipient: Value,
    e: NewEvidence,
) -> sqlx::Result<Appended> {
    let evidence_id = Uuid::now_v7();
    let at = truncate(e.at);
    let bytes = canonical(&RecipientRecord {
        version: RECORD_VERSION,
        evidence_id,
        event: e.event,
        at: format_time(at),
        recipient,
        actor: &e.actor,
        channel: &e.channel,
        details: &e.details,
    });
    let hash = Sha256::digest(&bytes).to_vec();
    sqlx::query(
        "insert into evidence (evidence_id, item_id, recipient_id, event, at, channel, canonical, sha256, leaf_hash)
         values ($1, null, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(evidence_id)
    .bind(recipient_id)
    .bind(e.event.as_str())
    .bind(at)
    .bind(&e.channel)
    .bind(&bytes)
    .bind(&hash)
    .bind(crate::merkle::leaf_hash(&bytes).to_vec())
    .execute(&mut *conn)
    .await?;
    Ok(Appended { evidence_id, event: e.event, at, sha256: hex::encode(&hash), canonical: bytes })
}

/// A recipient's own records (settings changes), oldest first.
pub async fn for_recipient(conn: &mut PgConnection, recipient_id: Uuid) -> sqlx::Result<Vec<StoredEvidence>> {
    stored_where(conn, "e.recipient_id = $1", recipient_id).await
}

/// The records that `condition` (on `e`, with the one parameter `$1`) picks, oldest first, each
/// with its log index once the sequencer has given it one (looked up record by record, through
/// the unique index of `log_entry`).
async fn stored_where(conn: &mut PgConnection, condition: &str, value: Uuid) -> sqlx::Result<Vec<StoredEvidence>> {
    Ok(rows_where(conn, condition, value).await?.into_iter().map(stored).collect())
}

async fn rows_where<T>(conn: &mut PgConnection, condition: &str, value: T) -> sqlx::Result<Vec<EvidenceRow>>
where
    T: Send + for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    let sql = format!(
        "select e.evidence_id, e.item_id,
                (select l.log_index from log_entry l where l.evidence_id = e.evidence_id) as log_index,
                e.event, e.at, e.channel, e.canonical, e.sha256
         from evidence e where {condition} order by e.seq"
    );
    sqlx::query_as(&sql).bind(value).fetch_all(conn).await
}

/// The SubmissionAcceptance records of these items, with their items' ids.
pub async fn acceptances(conn: &mut PgConnection, item_ids: &[Uuid]) -> sqlx::Result<Vec<(Uuid, StoredEvidence)>> {
    let rows = rows_where(conn, "e.item_id = any($1) and e.event = 'SubmissionAcceptance'", item_ids).await?;
    Ok(rows.into_iter().filter_map(|r| Some((r.item_id?, stored(r)))).collect())
}

fn stored(r: EvidenceRow) -> StoredEvidence {
    StoredEvidence {
        evidence_id: r.evidence_id,
        log_index: r.log_index,
        event: r.event,
        at: r.at,
        channel: r.channel,
        sha256: hex::encode(r.sha256),
        record: serde_json::from_slice(&r.canonical).unwrap_or(Value::Null),
    }
}

/// A stored record, for the API.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct StoredEvidence {
    pub evidence_id: Uuid,
    /// The record's place in the log; null for the moment between its commit and the
    /// sequencer's next pass (well under a second while a scheduler runs).
    pub log_index: Option<i64>,
    pub event: String,
    pub at: DateTime<Utc>,
    pub channel: Option<String>,
    /// SHA-256 of `record`'s canonical bytes, hex.
    pub sha256: String,
    /// The record exactly as hashed (RFC 8785 canonical JSON).
    #[schema(value_type = Object)]
    pub record: Value,
}

#[derive(sqlx::FromRow)]
struct EvidenceRow {
    evidence_id: Uuid,
    /// `None` for a record about a recipient, not an item (a change of their settings).
    item_id: Option<Uuid>,
    log_index: Option<i64>,
    event: String,
    at: DateTime<Utc>,
    channel: Option<String>,
    canonical: Vec<u8>,
    sha256: Vec<u8>,
}

pub async fn for_item(conn: &mut PgConnection, item_id: Uuid) -> sqlx::Result<Vec<StoredEvidence>> {
    stored_where(conn, "e.item_id = $1", item_id).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_and_drops_whitespace() {
        let v = serde_json::json!({ "b": 1, "a": [true, null, "oʻ"], "c": { "z": 1.5e3, "y": "x" } });
        assert_eq!(String::from_utf8(canonical(&v)).unwrap(), r#"{"a":[true,null,"oʻ"],"b":1,"c":{"y":"x","z":1500}}"#);
    }

    #[test]
    fn event_names_are_the_etsi_ones() {
        assert_eq!(Event::RelayToNonERDS.as_str(), "RelayToNonERDS");
        assert_eq!(Event::ContentConsignment.as_str(), "ContentConsignment");
    }
}
