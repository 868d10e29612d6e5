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
//! Nothing is cached: each read sees what is committed when its statement runs, so a revoked
//! key is refused and a withdrawn consent counts from the next request on, as before.

use futures_util::future::BoxFuture;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::db::Kept;
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

impl Job for KeyHash {}
impl Job for RecipientId {}

type Found<T> = sqlx::Result<Option<T>>;

/// A statement that reads a batch's keys: what it found for each, in the keys' order.
type Read<J, T> = for<'a> fn(&'a mut PgConnection, &'a [&'a J]) -> BoxFuture<'a, sqlx::Result<Vec<Option<T>>>>;

/// The handle requests read through; cheap to clone.
#[derive(Clone)]
pub struct Lookups {
    agencies: Group<KeyHash, Found<KeyOwner>>,
    recipients: Group<RecipientId, Found<Recipient>>,
}

impl Lookups {
    /// Starts the lookups' tasks on the current runtime; they end when the last handle is dropped.
    pub fn start(pool: PgPool, limits: Limits) -> Lookups {
        let (a, r) = (Kept::new(pool.clone(), limits.concurrency), Kept::new(pool, limits.concurrency));
        Lookups {
            agencies: Group::start(limits, move |batch| read_batch(a.clone(), batch, "API keys", agencies)),
            recipients: Group::start(limits, move |batch| read_batch(r.clone(), batch, "recipients", recipients)),
        }
    }

    /// The agency that holds this unrevoked key, by the key's hash.
    pub async fn agency(&self, key_hash: Vec<u8>) -> Found<KeyOwner> {
        self.agencies.run(KeyHash(key_hash)).await.unwrap_or(Err(sqlx::Error::PoolClosed))
    }

    /// The recipient registered with this identifier.
    pub async fn recipient(&self, id: RecipientId) -> Found<Recipient> {
        self.recipients.run(id).await.unwrap_or(Err(sqlx::Error::PoolClosed))
    }
}

/// Reads a batch's keys in one statement and answers each request. A read fails for the whole
/// system (the pool exhausted, the database gone), never for one key, so when it fails every
/// request gets the error at once: retried one by one, as a failed write batch is, the last
/// of 64 would wait 64 pool timeouts for the same answer.
async fn read_batch<J: Job, T: Send + 'static>(
    conns: Kept,
    batch: Vec<Pending<J, Found<T>>>,
    what: &str,
    read: Read<J, T>,
) {
    let keys: Vec<&J> = batch.iter().map(|p| &p.job).collect();
    let result = async {
        let mut conn = conns.acquire().await?;
        let found = read(&mut conn, &keys).await?;
        conn.keep();
        Ok(found)
    }
    .await;
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
//
// A key read alone (most reads below saturation) has a statement of its own, with the key as
// a plain parameter. PostgreSQL plans a statement over an array for each run's values: its
// generic plan is costed for ten keys, so it never looks cheaper than a plan for the one or two
// a run has. Planning was 85 % of these reads' time at 1,000 submissions/s offered, 0.15 ms
// a read; the single-key statement is planned once (docs/performance.md).

fn agencies<'a>(
    conn: &'a mut PgConnection,
    keys: &'a [&'a KeyHash],
) -> BoxFuture<'a, sqlx::Result<Vec<Option<KeyOwner>>>> {
    Box::pin(async move {
        let found: Vec<Numbered<KeyOwner>> = if let [key] = keys {
            sqlx::query_as(
                "select 1::int8 as n, a.id, a.code, a.name, k.key_hash
                 from api_key k join agency a on a.id = k.agency_id
                 where k.key_hash = $1 and k.revoked_at is null",
            )
            .bind(key.0.as_slice())
            .fetch_all(&mut *conn)
            .await?
        } else {
            let hashes: Vec<&[u8]> = keys.iter().map(|k| k.0.as_slice()).collect();
            sqlx::query_as(
                "select x.n, a.id, a.code, a.name, k.key_hash
                 from unnest($1::bytea[]) with ordinality as x(h, n)
                 cross join lateral (select k.agency_id, k.key_hash from api_key k
                                     where k.key_hash = x.h and k.revoked_at is null offset 0) k
                 join agency a on a.id = k.agency_id",
            )
            .bind(&hashes)
            .fetch_all(&mut *conn)
            .await?
        };
        Ok(in_order(keys.len(), found.into_iter().map(|f| (f.n, f.row)).collect()))
    })
}

fn recipients<'a>(
    conn: &'a mut PgConnection,
    ids: &'a [&'a RecipientId],
) -> BoxFuture<'a, sqlx::Result<Vec<Option<Recipient>>>> {
    Box::pin(async move {
        let pinfls: Vec<Option<&str>> =
            ids.iter().map(|id| matches!(id, RecipientId::Pinfl(_)).then(|| id.value())).collect();
        let tins: Vec<Option<&str>> =
            ids.iter().map(|id| matches!(id, RecipientId::Tin(_)).then(|| id.value())).collect();
        let found: Vec<Numbered<Recipient>> = if let ([pinfl], [tin]) = (&pinfls[..], &tins[..]) {
            sqlx::query_as(
                "select 1::int8 as n, id, name, phone, email, digital_consent from recipient where pinfl = $1
                 union all
                 select 1::int8 as n, id, name, phone, email, digital_consent from recipient where tin = $2",
            )
            .bind(pinfl)
            .bind(tin)
            .fetch_all(&mut *conn)
            .await?
        } else {
            sqlx::query_as(
                "select x.n, r.id, r.name, r.phone, r.email, r.digital_consent
                 from unnest($1::text[], $2::text[]) with ordinality as x(pinfl, tin, n)
                 cross join lateral (select id, name, phone, email, digital_consent from recipient where pinfl = x.pinfl
                                     union all
                                     select id, name, phone, email, digital_consent from recipient where tin = x.tin) r",
            )
            .bind(&pinfls)
            .bind(&tins)
            .fetch_all(&mut *conn)
            .await?
        };
        Ok(in_order(ids.len(), found.into_iter().map(|f| (f.n, f.row)).collect()))
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
