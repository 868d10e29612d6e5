//! The evidence log as a Merkle tree in PostgreSQL: integration of new leaves into stored
//! perfect subtrees, roots and proofs for any size, signing keys, checkpoints and the monitor.
//!
//! Appends stay cheap: the transaction that writes evidence only adds records and their leaf
//! hashes, without an index (see [`crate::evidence`]). The sequencer ([`sequence`]), run every
//! few hundred milliseconds by the scheduler and before every checkpoint and bundle, gives
//! committed records their dense indexes. The integrator, run before every checkpoint, adds each
//! new leaf's completed parent nodes — on average one node per leaf — so a root or a proof for
//! any size reads O(log n) rows, never the whole log. Both run under one advisory lock.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::SigningKey;
use secrecy::ExposeSecret;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::config::LogSettings;
use crate::merkle::{self, Hash, NodeStore, Recorder};
use crate::note::{self, VerifierKey};

/// Serialises integrators and checkpoint signers across every process.
const LOG_LOCK: i64 = 0x6461_6c69_6c00_0001;
/// Leaves integrated per transaction.
const CHUNK: i64 = 100_000;
/// Records sequenced per statement.
const SEQUENCE_CHUNK: i64 = 20_000;

/// Gives every committed record without a log entry the next indexes, in insertion order, and
/// moves the head. The caller holds [`LOG_LOCK`] in its transaction.
///
/// Only records this statement's snapshot sees as committed are taken, so a record committed
/// later gets a later index: none is skipped, none is indexed twice (`log_entry` is unique on
/// both columns and refuses updates), and indexes stay dense. A pass looks only at records of
/// the transactions the last complete pass could not see: those that had not started (`xid` at
/// or above the head's `xid_floor`, that pass's xmax) and those still running (`xid_pending`).
/// Every other transaction had ended before that pass, which therefore saw its records. When a
/// pass takes everything it finds, it leaves its own xmax and in-progress list in the head.
async fn sequence_locked(conn: &mut PgConnection) -> anyhow::Result<u64> {
    // Without statistics the pass's estimates grow with the table, and past `jit_above_cost`
    // PostgreSQL would compile it to machine code on every pass (about 0.1 s at half a million
    // records) for a statement that reads a few hundred rows.
    sqlx::query("set local jit = off").execute(&mut *conn).await?;
    let mut total = 0u64;
    loop {
        let n: i64 = sqlx::query_scalar(&SEQUENCE_SQL).bind(SEQUENCE_CHUNK).fetch_one(&mut *conn).await?;
        total += n as u64;
        if n < SEQUENCE_CHUNK {
            return Ok(total);
        }
    }
}

/// The sequencer's pass: see [`sequence_locked`].
static SEQUENCE_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "with head as (select size from evidence_log_head),
              pending as (select e.evidence_id, row_number() over (order by e.seq) - 1 as rn
                          from evidence e where {UNSEQUENCED}
                          order by e.seq limit $1),
              assigned as (insert into log_entry (log_index, evidence_id)
                           select (select size from head) + rn, evidence_id from pending order by rn
                           returning 1),
              taken as (select count(*) as n from assigned),
              moved as (update evidence_log_head
                        set size = size + (select n from taken),
                            xid_floor = case when (select n from taken) < $1
                                             then pg_snapshot_xmax(pg_current_snapshot()) else xid_floor end,
                            xid_pending = case when (select n from taken) < $1
                                               then array(select pg_snapshot_xip(pg_current_snapshot()))
                                               else xid_pending end
                        returning size)
         select n from taken"
    )
});

/// The records of `e` that may still lack a log entry (see [`sequence_locked`]) and do, as an
/// SQL condition.
///
/// Written so that its cost follows the records of those transactions, never the log's size,
/// whatever the statistics say (or do not: without autovacuum there are none). Bounded on both
/// sides, the xid range is estimated small and read through its index; the upper bound, the
/// snapshot's xmax, excludes nothing the statement can see. The entry is looked up row by row,
/// through its unique index: as a NOT EXISTS, the planner may hash the whole of `log_entry`
/// instead, every pass.
const UNSEQUENCED: &str = "((e.xid >= (select xid_floor from evidence_log_head)
       and e.xid < pg_snapshot_xmax(pg_current_snapshot()))
      or e.xid = any((select xid_pending from evidence_log_head)::xid8[]))
    and (select true from log_entry l where l.evidence_id = e.evidence_id) is null";

/// Sequences the log (see [`sequence_locked`]); returns how many records got an index. With
/// `wait = false`, returns 0 at once when another process holds the log's lock (it is
/// sequencing, or signing, which sequences too).
pub async fn sequence(pool: &PgPool, wait: bool) -> anyhow::Result<u64> {
    let mut tx = pool.begin().await?;
    if wait {
        sqlx::query("select pg_advisory_xact_lock($1)").bind(LOG_LOCK).execute(&mut *tx).await?;
    } else {
        let got: bool =
            sqlx::query_scalar("select pg_try_advisory_xact_lock($1)").bind(LOG_LOCK).fetch_one(&mut *tx).await?;
        if !got {
            return Ok(0);
        }
    }
    let n = sequence_locked(&mut tx).await?;
    tx.commit().await?;
    Ok(n)
}

/// Records committed but not sequenced yet, and how long the oldest of them has waited.
pub async fn sequencing_lag(pool: &PgPool) -> anyhow::Result<(i64, f64)> {
    let sql = format!(
        "select count(*), coalesce(extract(epoch from now() - min(e.created_at))::float8, 0)
         from evidence e where {UNSEQUENCED}"
    );
    let mut tx = pool.begin().await?;
    sqlx::query("set local jit = off").execute(&mut *tx).await?; // as in `sequence_locked`
    Ok(sqlx::query_as(&sql).fetch_one(&mut *tx).await?)
}

/// The leaf hash of the record at `index` of the log.
pub async fn leaf_hash(conn: &mut PgConnection, index: u64) -> anyhow::Result<Vec<u8>> {
    Ok(sqlx::query_scalar(
        "select e.leaf_hash from log_entry l join evidence e on e.evidence_id = l.evidence_id where l.log_index = $1",
    )
    .bind(index as i64)
    .fetch_one(conn)
    .await?)
}

fn to_hash(bytes: &[u8]) -> anyhow::Result<Hash> {
    bytes.try_into().context("a stored hash is not 32 bytes")
}

/// Loads the perfect nodes a computation needs, in two queries.
pub async fn load_nodes(
    conn: &mut PgConnection,
    keys: BTreeSet<(u32, u64)>,
) -> anyhow::Result<HashMap<(u32, u64), Hash>> {
    let leaves: Vec<i64> = keys.iter().filter(|(l, _)| *l == 0).map(|(_, i)| *i as i64).collect();
    let (levels, idxs): (Vec<i16>, Vec<i64>) =
        keys.iter().filter(|(l, _)| *l > 0).map(|(l, i)| (*l as i16, *i as i64)).unzip();
    let mut nodes = HashMap::with_capacity(keys.len());
    let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
        "select l.log_index, e.leaf_hash from log_entry l join evidence e on e.evidence_id = l.evidence_id
             where l.log_index = any($1)",
    )
    .bind(&leaves)
    .fetch_all(&mut *conn)
    .await?;
    for (i, h) in rows {
        nodes.insert((0, i as u64), to_hash(&h)?);
    }
    let rows: Vec<(i16, i64, Vec<u8>)> = sqlx::query_as(
        "select n.level, n.idx, n.hash from merkle_node n
         join unnest($1::smallint[], $2::bigint[]) as k(level, idx) on n.level = k.level and n.idx = k.idx",
    )
    .bind(&levels)
    .bind(&idxs)
    .fetch_all(&mut *conn)
    .await?;
    for (l, i, h) in rows {
        nodes.insert((l as u32, i as u64), to_hash(&h)?);
    }
    if nodes.len() != keys.len() {
        bail!("the Merkle tree is missing {} nodes: is the log integrated that far?", keys.len() - nodes.len());
    }
    Ok(nodes)
}

/// Runs a tree computation against the stored nodes: one pass to learn which nodes it needs,
/// one query to load them, one pass to compute.
async fn with_nodes<T>(conn: &mut PgConnection, f: impl Fn(&dyn StoreRef) -> T) -> anyhow::Result<T> {
    let rec = Recorder::default();
    f(&rec);
    let nodes = load_nodes(conn, rec.into_keys()).await?;
    Ok(f(&nodes))
}

/// Object-safe view of a node store, so one closure serves both passes.
pub trait StoreRef {
    fn get(&self, level: u32, idx: u64) -> Hash;
}
impl<T: NodeStore> StoreRef for T {
    fn get(&self, level: u32, idx: u64) -> Hash {
        self.node(level, idx)
    }
}
struct Dyn<'a>(&'a dyn StoreRef);
impl NodeStore for Dyn<'_> {
    fn node(&self, level: u32, idx: u64) -> Hash {
        self.0.get(level, idx)
    }
}

pub async fn integrated_size(conn: &mut PgConnection) -> anyhow::Result<u64> {
    let n: i64 = sqlx::query_scalar("select integrated_size from log_state").fetch_one(conn).await?;
    Ok(n as u64)
}

pub async fn root_at(conn: &mut PgConnection, size: u64) -> anyhow::Result<Hash> {
    with_nodes(conn, |s| merkle::root(&Dyn(s), size)).await
}

pub async fn inclusion_proof(conn: &mut PgConnection, index: u64, size: u64) -> anyhow::Result<Vec<Hash>> {
    with_nodes(conn, |s| merkle::inclusion_proof(&Dyn(s), index, size)).await
}

pub async fn consistency_proof(conn: &mut PgConnection, old: u64, new: u64) -> anyhow::Result<Vec<Hash>> {
    with_nodes(conn, |s| merkle::consistency_proof(&Dyn(s), old, new)).await
}

/// Adds the perfect nodes of every committed leaf not yet integrated. Returns the integrated
/// size. The caller holds [`LOG_LOCK`] in its transaction.
async fn integrate_locked(conn: &mut PgConnection) -> anyhow::Result<u64> {
    sequence_locked(conn).await?;
    loop {
        let done = integrated_size(conn).await?;
        // Indexes below the head are all committed: only the sequencer moves it, under this lock.
        let head: i64 = sqlx::query_scalar("select size from evidence_log_head").fetch_one(&mut *conn).await?;
        let head = head as u64;
        if head <= done {
            return Ok(done);
        }
        let upto = head.min(done + CHUNK as u64);
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            // Each leaf through the record's unique index: for a large range, a join may scan
            // the whole evidence table instead.
            "select l.log_index, (select e.leaf_hash from evidence e where e.evidence_id = l.evidence_id)
             from log_entry l where l.log_index >= $1 and l.log_index < $2 order by l.log_index",
        )
        .bind(done as i64)
        .bind(upto as i64)
        .fetch_all(&mut *conn)
        .await?;
        if rows.len() as u64 != upto - done || rows.iter().enumerate().any(|(i, r)| r.0 as u64 != done + i as u64) {
            bail!("evidence log indexes {done}..{upto} are not dense: refusing to integrate");
        }
        let leaves: Vec<Hash> = rows.iter().map(|(_, h)| to_hash(h)).collect::<anyhow::Result<_>>()?;
        let frontier_keys = merkle::frontier_keys(done);
        let loaded = load_nodes(conn, frontier_keys.iter().copied().collect()).await?;
        let frontier = frontier_keys.iter().map(|&(l, i)| (l, i, loaded[&(l, i)])).collect();
        let created = merkle::extend(frontier, done, &leaves);
        let levels: Vec<i16> = created.iter().map(|n| n.0 as i16).collect();
        let idxs: Vec<i64> = created.iter().map(|n| n.1 as i64).collect();
        let hashes: Vec<Vec<u8>> = created.iter().map(|n| n.2.to_vec()).collect();
        sqlx::query("insert into merkle_node (level, idx, hash) select * from unnest($1::smallint[], $2::bigint[], $3::bytea[])")
            .bind(&levels)
            .bind(&idxs)
            .bind(&hashes)
            .execute(&mut *conn)
            .await?;
        sqlx::query("update log_state set integrated_size = $1").bind(upto as i64).execute(&mut *conn).await?;
    }
}

/// The key that signs checkpoints now.
#[derive(Clone)]
pub struct Signer {
    pub name: String,
    pub key: SigningKey,
    pub key_id: String,
    pub origin: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("name", &self.name).field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

/// A signing key's public half and validity, as `GET /v1/log/keys` publishes it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct PublishedKey {
    pub name: String,
    /// First 4 bytes of SHA-256(name ‖ "\n" ‖ 0x01 ‖ key), hex.
    pub key_id: String,
    /// `name+keyid+base64(0x01 ‖ key)`: what verifiers are given.
    pub verifier_key: String,
    pub not_before: DateTime<Utc>,
    /// Null for the key in use.
    pub not_after: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    name: String,
    key_id: String,
    public_key: Vec<u8>,
    not_before: DateTime<Utc>,
    not_after: Option<DateTime<Utc>>,
}

pub async fn published_keys(conn: &mut PgConnection) -> anyhow::Result<Vec<PublishedKey>> {
    let rows: Vec<KeyRow> =
        sqlx::query_as("select name, key_id, public_key, not_before, not_after from signing_key order by not_before")
            .fetch_all(conn)
            .await?;
    rows.into_iter()
        .map(|r| {
            let bytes: [u8; 32] = r.public_key.as_slice().try_into().context("public key size")?;
            let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)?;
            Ok(PublishedKey {
                verifier_key: VerifierKey::new(&r.name, key).encode(),
                name: r.name,
                key_id: r.key_id,
                not_before: r.not_before,
                not_after: r.not_after,
            })
        })
        .collect()
}

pub fn verifier_keys(keys: &[PublishedKey]) -> Vec<VerifierKey> {
    keys.iter().filter_map(|k| VerifierKey::parse(&k.verifier_key).ok()).collect()
}

fn key_path(settings: &LogSettings, key_id: &str) -> PathBuf {
    settings.key_dir.join(format!("{key_id}.pem"))
}

/// Creates a key pair: the private half as a file in `key_dir`, the public half in the
/// database. With `rotate`, the current key stops signing now and the new one starts.
pub async fn new_signing_key(pool: &PgPool, settings: &LogSettings, rotate: bool) -> anyhow::Result<PublishedKey> {
    let mut tx = pool.begin().await?;
    sqlx::query("select pg_advisory_xact_lock($1)").bind(LOG_LOCK).execute(&mut *tx).await?;
    let active: Option<String> =
        sqlx::query_scalar("select key_id from signing_key where not_after is null").fetch_optional(&mut *tx).await?;
    match (&active, rotate) {
        (Some(id), false) => bail!("key {id} is in use already: rotate it with `dalil admin signing-key rotate`"),
        (None, true) => bail!("there is no key to rotate: create one with `dalil admin signing-key generate`"),
        _ => {}
    }
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let id = hex::encode(note::key_id(&settings.key_name, &key.verifying_key()));
    let path = key_path(settings, &id);
    std::fs::create_dir_all(&settings.key_dir).with_context(|| format!("creating {}", settings.key_dir.display()))?;
    let pem = key.to_pkcs8_pem(Default::default()).context("encoding the key")?;
    {
        use std::io::Write;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&path).with_context(|| format!("writing {}", path.display()))?;
        file.write_all(pem.as_bytes())?;
    }
    let now = crate::evidence::now();
    if let Some(old) = &active {
        sqlx::query("update signing_key set not_after = $2 where key_id = $1")
            .bind(old)
            .bind(now)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("insert into signing_key (key_id, name, public_key, not_before) values ($1, $2, $3, $4)")
        .bind(&id)
        .bind(&settings.key_name)
        .bind(key.verifying_key().as_bytes().as_slice())
        .bind(now)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(key_id = id, path = %path.display(), rotated = ?active, "new checkpoint signing key");
    Ok(PublishedKey {
        name: settings.key_name.clone(),
        verifier_key: VerifierKey::new(&settings.key_name, key.verifying_key()).encode(),
        key_id: id,
        not_before: now,
        not_after: None,
    })
}

/// The active key's private half, from configuration or from `key_dir`; `None` when there is
/// no active key.
pub async fn load_signer(pool: &PgPool, settings: &LogSettings) -> anyhow::Result<Option<Signer>> {
    let active: Option<(String, String, Vec<u8>)> =
        sqlx::query_as("select key_id, name, public_key from signing_key where not_after is null")
            .fetch_optional(pool)
            .await?;
    let Some((key_id, name, public)) = active else { return Ok(None) };
    let pem = if settings.signing_key_pem.expose_secret().trim().is_empty() {
        let path = key_path(settings, &key_id);
        std::fs::read_to_string(&path)
            .with_context(|| format!("the private half of signing key {key_id} is not at {}", path.display()))?
    } else {
        settings.signing_key_pem.expose_secret().to_string()
    };
    let key = SigningKey::from_pkcs8_pem(&pem).context("the signing key is not an Ed25519 PKCS#8 PEM")?;
    if key.verifying_key().as_bytes().as_slice() != public.as_slice() {
        bail!("the configured private key does not match signing key {key_id} in the database");
    }
    Ok(Some(Signer { name, key, key_id, origin: String::new() }))
}

/// A stored checkpoint.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct StoredCheckpoint {
    pub size: i64,
    pub key_id: String,
    /// The signed note, as signed.
    pub note: String,
    pub created_at: DateTime<Utc>,
    #[serde(skip)]
    pub root: Vec<u8>,
}

const CHECKPOINT_COLUMNS: &str = "size, key_id, note, created_at, root";

pub async fn latest_checkpoint(conn: &mut PgConnection) -> anyhow::Result<Option<StoredCheckpoint>> {
    Ok(sqlx::query_as(&format!(
        "select {CHECKPOINT_COLUMNS} from checkpoint order by size desc, created_at desc limit 1"
    ))
    .fetch_optional(conn)
    .await?)
}

pub async fn checkpoint_at(conn: &mut PgConnection, size: i64) -> anyhow::Result<Option<StoredCheckpoint>> {
    Ok(sqlx::query_as(&format!(
        "select {CHECKPOINT_COLUMNS} from checkpoint where size = $1 order by created_at desc limit 1"
    ))
    .bind(size)
    .fetch_optional(conn)
    .await?)
}

/// Integrates the log and signs its current size with `signer`, unless that size is signed by
/// that key already. Returns the checkpoint of the current size.
pub async fn sign_checkpoint(pool: &PgPool, signer: &Signer) -> anyhow::Result<StoredCheckpoint> {
    let mut tx = pool.begin().await?;
    sqlx::query("select pg_advisory_xact_lock($1)").bind(LOG_LOCK).execute(&mut *tx).await?;
    let size = integrate_locked(&mut tx).await?;
    let existing: Option<StoredCheckpoint> =
        sqlx::query_as(&format!("select {CHECKPOINT_COLUMNS} from checkpoint where size = $1 and key_id = $2"))
            .bind(size as i64)
            .bind(&signer.key_id)
            .fetch_optional(&mut *tx)
            .await?;
    if let Some(cp) = existing {
        tx.commit().await?;
        return Ok(cp);
    }
    let root = root_at(&mut tx, size).await?;
    let note = note::sign_checkpoint(&signer.origin, size, &root, &signer.name, &signer.key);
    let cp: StoredCheckpoint = sqlx::query_as(&format!(
        "insert into checkpoint (size, key_id, root, note) values ($1, $2, $3, $4) returning {CHECKPOINT_COLUMNS}"
    ))
    .bind(size as i64)
    .bind(&signer.key_id)
    .bind(root.as_slice())
    .bind(&note)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(size, key_id = signer.key_id, "signed a checkpoint");
    Ok(cp)
}

/// The newest checkpoint by the current key that covers `min_size` leaves, signing one if none
/// does yet.
pub async fn checkpoint_covering(pool: &PgPool, signer: &Signer, min_size: u64) -> anyhow::Result<StoredCheckpoint> {
    let existing: Option<StoredCheckpoint> = sqlx::query_as(&format!(
        "select {CHECKPOINT_COLUMNS} from checkpoint where size >= $1 and key_id = $2 order by size desc limit 1"
    ))
    .bind(min_size as i64)
    .bind(&signer.key_id)
    .fetch_optional(pool)
    .await?;
    match existing {
        Some(cp) => Ok(cp),
        None => sign_checkpoint(pool, signer).await,
    }
}

/// Re-verifies every checkpoint newer than the last one checked: its signature against the
/// published keys, its root against the stored tree, and its consistency with the checkpoint
/// before it. Each failure is logged loudly and kept in `log_alarm`. Returns (checked, alarms).
pub async fn monitor(pool: &PgPool) -> anyhow::Result<(usize, usize)> {
    let mut tx = pool.begin().await?;
    sqlx::query("select pg_advisory_xact_lock($1)").bind(LOG_LOCK).execute(&mut *tx).await?;
    let from: i64 = sqlx::query_scalar("select monitored_size from log_state").fetch_one(&mut *tx).await?;
    let keys = verifier_keys(&published_keys(&mut tx).await?);
    let previous: Option<StoredCheckpoint> = sqlx::query_as(&format!(
        "select {CHECKPOINT_COLUMNS} from checkpoint where size <= $1 order by size desc, created_at limit 1"
    ))
    .bind(from)
    .fetch_optional(&mut *tx)
    .await?;
    let newer: Vec<StoredCheckpoint> = sqlx::query_as(&format!(
        "select {CHECKPOINT_COLUMNS} from checkpoint where size > $1 order by size, created_at"
    ))
    .bind(from)
    .fetch_all(&mut *tx)
    .await?;
    let mut alarms = Vec::new();
    let mut prev = match previous {
        Some(cp) => Some((cp.size as u64, to_hash(&cp.root)?)),
        None => None,
    };
    for cp in &newer {
        let size = cp.size as u64;
        let stored_root = to_hash(&cp.root)?;
        match note::verify_checkpoint(&cp.note, &keys) {
            Ok(v) if v.size == size && v.root == stored_root => {}
            Ok(_) => alarms.push((cp.size, "the signed note does not say the stored size and root".to_string())),
            Err(e) => alarms.push((cp.size, format!("checkpoint signature: {e}"))),
        }
        let recomputed = root_at(&mut tx, size).await?;
        if recomputed != stored_root {
            alarms.push((cp.size, "the stored tree no longer has the signed root: the log was rewritten".into()));
        }
        if let Some((old_size, old_root)) = prev {
            let proof = consistency_proof(&mut tx, old_size, size).await?;
            if !merkle::verify_consistency(old_size, size, &old_root, &stored_root, &proof) {
                alarms.push((cp.size, format!("checkpoint {size} is not consistent with checkpoint {old_size}")));
            }
        }
        prev = Some((size, stored_root));
    }
    for (size, reason) in &alarms {
        tracing::error!(size, reason, "EVIDENCE LOG INCONSISTENT");
        sqlx::query("insert into log_alarm (size, reason) values ($1, $2)")
            .bind(size)
            .bind(reason)
            .execute(&mut *tx)
            .await?;
    }
    if let Some(last) = newer.last() {
        sqlx::query("update log_state set monitored_size = $1").bind(last.size).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok((newer.len(), alarms.len()))
}

/// The signer for this deployment, creating the first key when configured to.
pub async fn signer(pool: &PgPool, settings: &LogSettings) -> anyhow::Result<Option<Signer>> {
    let mut found = load_signer(pool, settings).await?;
    if found.is_none() && settings.generate_key_if_missing {
        match new_signing_key(pool, settings, false).await {
            Ok(_) => {}
            // Another process created it first.
            Err(e) if e.to_string().contains("in use already") => {}
            Err(e) => return Err(e),
        }
        found = load_signer(pool, settings).await?;
    }
    Ok(found.map(|s| Signer { origin: settings.origin.clone(), ..s }))
}
