//! Reads that concurrent requests make, made together.
//!
//! Every submission reads its agency (by the API key's hash) and its recipient (by PINFL or
//! TIN) before it can render anything. Each read is a one-row index probe, but made alone it
//! costs a round trip, a statement's start-up in PostgreSQL and a wake-up on both sides: two
//! such reads per item were four fifths of all the statements a submission's life runs, and
//! answering one from memory instead lowered the whole machine's CPU per item by about a
//! twentieth (docs/performance.md). So, as with writes ([`super::intake`]), reads that queue
//! while earlier ones are in flight are made in one statement ([`crate::group`]).
//!
//! A valid submission makes both reads in one: its agency and its recipient in the same row of
//! the same statement, so that below saturation, where each request's reads go alone, a
//! submission costs one read statement, not two.
//!
//! Nothing is cached: each read sees what is committed when its statement runs, so a revoked
//! key is refused and a withdrawn consent counts from the next request on, as before.

use futures_util::future::BoxFuture;
use sqlx::PgPool;
use uuid::Uuid;

use crate::domain::RecipientId;
use crate::group::{Group, Job, Limits, Pending};

/// The owner of an API key, as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyOwner {
    pub id: Uuid,
    pub code: String,
    pub name: String,
    pub key_hash: Vec<u8>,
}

/// A recipient as a submission needs it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Recipient {
    pub id: Uuid,
    pub name: String,
    pub phone: Option<String>,
    pub email: Option<String>,
    pub digital_consent: bool,
}

/// The SHA-256 of a presented agency key.
pub struct KeyHash(pub Vec<u8>);

/// A submission's two reads: its agency by the key's hash, and its recipient.
pub struct Submission {
    pub key_hash: Vec<u8>,
    pub recipient: RecipientId,
}

/// What a submission's reads found: the key's owner and the recipient, each if any.
pub type Submitter = (Option<KeyOwner>, Option<Recipient>);

impl Job for KeyHash {}
impl Job for Submission {}

type Found<T> = sqlx::Result<Option<T>>;

/// A statement that reads a batch's keys: what it found for each, in the keys' order.
type Read<J, T> = for<'a> fn(&'a PgPool, &'a [&'a J]) -> BoxFuture<'a, sqlx::Result<Vec<Option<T>>>>;

/// The handle requests read through; cheap to clone.
#[derive(Clone)]
pub struct Lookups {
    agencies: Group<KeyHash, Found<KeyOwner>>,
    submissions: Group<Submission, Found<Submitter>>,
}

impl Lookups {
    /// Starts the lookups' tasks on the current runtime; they end when the last handle is dropped.
    pub fn start(pool: PgPool, limits: Limits) -> Lookups {
        let p = pool.clone();
        Lookups {
            agencies: Group::start(limits, move |batch| read_batch(p.clone(), batch, "API keys", agencies)),
            submissions: Group::start(limits, move |batch| {
                read_batch(pool.clone(), batch, "API keys and recipients", submitters)
            }),
        }
    }

    /// The agency that holds this unrevoked key, by the key's hash.
    pub async fn agency(&self, key_hash: Vec<u8>) -> Found<KeyOwner> {
        self.agencies.run(KeyHash(key_hash)).await.unwrap_or(Err(sqlx::Error::PoolClosed))
    }

    /// The agency that holds this unrevoked key and the recipient registered with this
    /// identifier, in one read.
    pub async fn submitter(&self, key_hash: Vec<u8>, recipient: RecipientId) -> sqlx::Result<Submitter> {
        let found = self.submissions.run(Submission { key_hash, recipient }).await;
        Ok(found.unwrap_or(Err(sqlx::Error::PoolClosed))?.unwrap_or((None, None)))
    }
}

/// Reads a batch's keys in one statement and answers each request. A read fails for the whole
/// system (the pool exhausted, the database gone), never for one key, so when it fails every
/// request gets the error at once: retried one by one, as a failed write batch is, the last
/// of 64 would wait 64 pool timeouts for the same answer.
async fn read_batch<J: Job, T: Send + 'static>(
    pool: PgPool,
    batch: Vec<Pending<J, Found<T>>>,
    what: &str,
    read: Read<J, T>,
) {
    let keys: Vec<&J> = batch.iter().map(|p| &p.job).collect();
    let result = read(&pool, &keys).await;
    drop(keys);
    match result {
        // One answer per key, in the keys' order ([`in_order`]).
        Ok(found) => {
            for (p, f) in batch.into_iter().zip(found) {
                p.answer(Ok(f));
            }
        }
        Err(e) => {
            tracing::warn!(keys = batch.len(), error = %e, "a read of {what} failed");
            for p in batch {
                p.answer(Err(same_kind(&e, what)));
            }
        }
    }
}

/// An error like `e` for each request of a failed batch (sqlx's errors are not `Clone`): the
/// pool's own errors as they are (they answer 503), any other with its text.
fn same_kind(e: &sqlx::Error, what: &str) -> sqlx::Error {
    match e {
        sqlx::Error::PoolTimedOut => sqlx::Error::PoolTimedOut,
        sqlx::Error::PoolClosed => sqlx::Error::PoolClosed,
        e => sqlx::Error::Protocol(format!("reading {what}: {e}")),
    }
}

/// Rows found for the `n`th (from 1) of `len` keys, in the keys' order.
fn in_order<T>(len: usize, found: Vec<(i64, T)>) -> Vec<Option<T>> {
    let mut out: Vec<Option<T>> = (0..len).map(|_| None).collect();
    for (n, row) in found {
        if let Some(slot) = usize::try_from(n - 1).ok().and_then(|i| out.get_mut(i)) {
            *slot = Some(row);
        }
    }
    out
}

#[derive(sqlx::FromRow)]
struct Numbered<T> {
    n: i64,
    #[sqlx(flatten)]
    row: T,
}

// Each key is a probe of a unique index (a lateral subquery per key, kept apart from the outer
// query by `offset 0` or `union all`): one row in, so a prepared plan made on an empty
// database (never analyzed, counted as at least ten pages) probes the index and keeps doing
// so as the table grows to millions of recipients. One exception: a table analyzed while it
// held about a page may be scanned per key, until its next ANALYZE replans the statement.

fn agencies<'a>(pool: &'a PgPool, keys: &'a [&'a KeyHash]) -> BoxFuture<'a, sqlx::Result<Vec<Option<KeyOwner>>>> {
    Box::pin(async move {
        let hashes: Vec<&[u8]> = keys.iter().map(|k| k.0.as_slice()).collect();
        let found: Vec<Numbered<KeyOwner>> = sqlx::query_as(
            "select x.n, a.id, a.code, a.name, k.key_hash
             from unnest($1::bytea[]) with ordinality as x(h, n)
             cross join lateral (select k.agency_id, k.key_hash from api_key k
                                 where k.key_hash = x.h and k.revoked_at is null offset 0) k
             join agency a on a.id = k.agency_id",
        )
        .bind(&hashes)
        .fetch_all(pool)
        .await?;
        Ok(in_order(keys.len(), found.into_iter().map(|f| (f.n, f.row)).collect()))
    })
}

/// The identifier as the statements bind it: (PINFL, TIN), one of them null.
fn pinfl_and_tin(id: &RecipientId) -> (Option<&str>, Option<&str>) {
    match id {
        RecipientId::Pinfl(_) => (Some(id.value()), None),
        RecipientId::Tin(_) => (None, Some(id.value())),
    }
}

#[derive(sqlx::FromRow)]
struct SubmitterRow {
    n: i64,
    agency_id: Option<Uuid>,
    code: Option<String>,
    agency_name: Option<String>,
    key_hash: Option<Vec<u8>>,
    recipient_id: Option<Uuid>,
    recipient_name: Option<String>,
    phone: Option<String>,
    email: Option<String>,
    digital_consent: Option<bool>,
}

fn submitters<'a>(pool: &'a PgPool, keys: &'a [&'a Submission]) -> BoxFuture<'a, sqlx::Result<Vec<Option<Submitter>>>> {
    Box::pin(async move {
        let hashes: Vec<&[u8]> = keys.iter().map(|k| k.key_hash.as_slice()).collect();
        let (pinfls, tins): (Vec<Option<&str>>, Vec<Option<&str>>) =
            keys.iter().map(|k| pinfl_and_tin(&k.recipient)).unzip();
        // The two reads above, side by side: a row per submission, with what each found.
        let rows: Vec<SubmitterRow> = sqlx::query_as(
            "select x.n, a.id as agency_id, a.code, a.name as agency_name, k.key_hash,
                    r.id as recipient_id, r.name as recipient_name, r.phone, r.email, r.digital_consent
             from unnest($1::bytea[], $2::text[], $3::text[]) with ordinality as x(h, pinfl, tin, n)
             left join lateral (select k.agency_id, k.key_hash from api_key k
                                where k.key_hash = x.h and k.revoked_at is null offset 0) k on true
             left join lateral (select a.id, a.code, a.name from agency a where a.id = k.agency_id offset 0) a on true
             left join lateral (select id, name, phone, email, digital_consent from recipient where pinfl = x.pinfl
                                union all
                                select id, name, phone, email, digital_consent from recipient where tin = x.tin) r on true",
        )
        .bind(&hashes)
        .bind(&pinfls)
        .bind(&tins)
        .fetch_all(pool)
        .await?;
        let found = rows.into_iter().map(|r| {
            let owner = match (r.agency_id, r.code, r.agency_name, r.key_hash) {
                (Some(id), Some(code), Some(name), Some(key_hash)) => Some(KeyOwner { id, code, name, key_hash }),
                _ => None,
            };
            let recipient = match (r.recipient_id, r.recipient_name, r.digital_consent) {
                (Some(id), Some(name), Some(digital_consent)) => {
                    Some(Recipient { id, name, phone: r.phone, email: r.email, digital_consent })
                }
                _ => None,
            };
            (r.n, (owner, recipient))
        });
        Ok(in_order(keys.len(), found.collect()))
    })
}

#[cfg(test)]
mod tests {
    use super::in_order;

    #[test]
    fn rows_land_in_their_keys_places_and_keys_without_one_get_none() {
        assert_eq!(in_order(4, vec![(3, "c"), (1, "a")]), vec![Some("a"), None, Some("c"), None]);
        // A number out of range (never sent by the statements) is dropped, not a panic.
        assert_eq!(in_order(1, vec![(0, "x"), (2, "y")]), vec![None]);
    }
}
