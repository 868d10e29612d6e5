//! PostgreSQL: the pool and the migrations (embedded from `migrations/`).

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use secrecy::ExposeSecret;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Postgres};

use crate::config::Settings;

/// How long a pooled connection may sit idle before it is checked with a ping when taken.
const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub async fn connect(settings: &Settings) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions =
        settings.database_url.expose_secret().parse().context("database_url is not a valid PostgreSQL URL")?;
    PgPoolOptions::new()
        .max_connections(settings.database.max_connections)
        .acquire_timeout(Duration::from_millis(settings.database.acquire_timeout_ms))
        // sqlx pings every connection it hands out: a round trip before every statement or
        // transaction, several per item. A connection used within the last second is alive;
        // one idle for longer is still pinged, so a restarted server or a dropped link is found
        // (and the connection replaced) before a statement fails on it.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_AFTER_IDLE {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_with(options.application_name("dalil").options(settings.database.session_options()))
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", settings.database_url_redacted()))
}

/// Connections a busy writer keeps between its batches.
///
/// sqlx tests every connection given back to its pool with a round trip (a `Sync`, answered by
/// `ReadyForQuery`) before any task may take it again: a wake-up of the connection's PostgreSQL
/// backend and of a runtime thread for every statement or transaction taken from the pool,
/// 4-6 % of the machine's CPU per item in `dalil bench` (docs/performance.md). A writer whose
/// work ended cleanly (its statement answered, its transaction committed) keeps the connection
/// here for its next batch instead ([`KeptConn::keep`]), at most `most` at once: the writer's
/// batches in flight, which would hold as many connections anyway.
///
/// What goes back to the pool, the pool's way (ping and all, so a broken or half-used
/// connection is found there as before): a connection whose work failed or was abandoned
/// (dropped without `keep`); one kept while a transaction is open or a statement unsent; one
/// kept unused for [`PING_AFTER_IDLE`]; every kept one whenever the pool has no connection to
/// spare (all of them taken, as many as it may open), so other users of the pool wait at most
/// [`KEPT_CHECK`] for one; and one first taken from the pool [`KEPT_LIFE`] ago, so the pool's
/// own lifetime rules still apply to it.
#[derive(Clone)]
pub struct Kept(Arc<KeptInner>);

/// How often kept connections are looked at while there are any.
const KEPT_CHECK: Duration = Duration::from_millis(50);
/// How long a connection may go from batch to batch before it goes back to the pool once.
const KEPT_LIFE: Duration = Duration::from_secs(600);

struct KeptInner {
    pool: PgPool,
    most: usize,
    /// Connections kept, the most recently used last.
    idle: Mutex<Vec<Idle>>,
    /// Tells the task that gives connections back that one was kept.
    kept: Arc<tokio::sync::Notify>,
}

struct Idle {
    conn: PoolConnection<Postgres>,
    /// When its last batch ended.
    used: Instant,
    /// When it was taken from the pool.
    since: Instant,
}

impl Kept {
    /// Keeps up to `most` connections of `pool` (0: none, every connection goes back to the
    /// pool). Starts, on the current runtime, the task that gives back what should go back.
    pub fn new(pool: PgPool, most: usize) -> Kept {
        let kept = Arc::new(tokio::sync::Notify::new());
        let inner = Arc::new(KeptInner { pool, most, idle: Mutex::new(Vec::new()), kept: kept.clone() });
        if most > 0 {
            let home = Arc::downgrade(&inner);
            tokio::spawn(async move {
                loop {
                    // Asleep while nothing is kept (woken by `keep`, or to see whether the
                    // writer is gone).
                    let _ = tokio::time::timeout(Duration::from_secs(5), kept.notified()).await;
                    loop {
                        let Some(inner) = home.upgrade() else { return };
                        let (back, left) = inner.to_give_back(false);
                        // Dropped outside the lock: each goes back to the pool with its ping.
                        drop(back);
                        drop(inner);
                        if left == 0 {
                            break;
                        }
                        tokio::time::sleep(KEPT_CHECK).await;
                    }
                }
            });
        }
        Kept(inner)
    }

    pub fn pool(&self) -> &PgPool {
        &self.0.pool
    }

    /// The connection used last, if it was used within [`PING_AFTER_IDLE`]; otherwise one from
    /// the pool (which pings it first if it sat idle there).
    pub async fn acquire(&self) -> sqlx::Result<KeptConn> {
        let kept = {
            let mut idle = self.0.idle.lock().unwrap_or_else(|e| e.into_inner());
            let fresh = idle.last().is_some_and(|i| i.used.elapsed() < PING_AFTER_IDLE);
            if fresh && !self.0.pool.is_closed() {
                idle.pop()
            } else {
                None
            }
        };
        if let Some(Idle { conn, since, .. }) = kept {
            return Ok(KeptConn { conn: Some(conn), since, home: self.0.clone() });
        }
        // The newest was stale (or the pool is closing), so all are: give them back first.
        drop(self.0.to_give_back(true));
        let conn = self.0.pool.acquire().await?;
        Ok(KeptConn { conn: Some(conn), since: Instant::now(), home: self.0.clone() })
    }
}

impl KeptInner {
    /// Whether the pool has no connection to spare: none idle, and as many open as it may.
    fn pressed(&self) -> bool {
        self.pool.num_idle() == 0 && self.pool.size() >= self.pool.options().get_max_connections()
    }

    /// Takes out what should go back to the pool (everything, if `all`, if the pool is closing
    /// or has none to spare); returns it and how many stay kept.
    fn to_give_back(&self, all: bool) -> (Vec<Idle>, usize) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let all = all || self.pool.is_closed() || self.pressed();
        let (back, stay): (Vec<Idle>, Vec<Idle>) =
            idle.drain(..).partition(|i| all || i.used.elapsed() >= PING_AFTER_IDLE);
        *idle = stay;
        let left = idle.len();
        (back, left)
    }
}

/// A connection taken from [`Kept`]: dropped, it goes back to the pool as usual; kept, it waits
/// for the writer's next batch.
pub struct KeptConn {
    conn: Option<PoolConnection<Postgres>>,
    since: Instant,
    home: Arc<KeptInner>,
}

impl KeptConn {
    /// Keeps the connection for the next batch, if its work is finished (no transaction open,
    /// nothing unsent) and the pool can spare it; otherwise it goes back to the pool.
    pub fn keep(mut self) {
        let Some(conn) = self.conn.take() else { return };
        let home = &self.home;
        let clean = !conn.is_in_transaction() && !conn.should_flush();
        let back = {
            let mut idle = home.idle.lock().unwrap_or_else(|e| e.into_inner());
            if clean
                && idle.len() < home.most
                && self.since.elapsed() < KEPT_LIFE
                && !home.pool.is_closed()
                && !home.pressed()
            {
                idle.push(Idle { conn, used: Instant::now(), since: self.since });
                None
            } else {
                Some(conn)
            }
        };
        match back {
            // Outside the lock: back to the pool with its ping.
            Some(conn) => drop(conn),
            None => home.kept.notify_one(),
        }
    }
}

impl Deref for KeptConn {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        self.conn.as_ref().expect("a kept connection is only taken by `keep`")
    }
}

impl DerefMut for KeptConn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn.as_mut().expect("a kept connection is only taken by `keep`")
    }
}

/// Applies pending migrations, creating the database first if it does not exist.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    create_database_if_missing(settings).await?;
    let pool = connect(settings).await?;
    MIGRATOR.run(&pool).await.context("applying migrations")?;
    pool.close().await;
    Ok(())
}

async fn create_database_if_missing(settings: &Settings) -> anyhow::Result<()> {
    use sqlx::ConnectOptions;
    let options: PgConnectOptions = settings.database_url.expose_secret().parse()?;
    let Some(name) = options.get_database().map(str::to_string) else { return Ok(()) };
    let mut admin = options
        .clone()
        .database("postgres")
        .connect()
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", settings.database_url_redacted()))?;
    let exists: bool = sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
        .bind(&name)
        .fetch_one(&mut admin)
        .await?;
    if !exists {
        let quoted = name.replace('"', "\"\"");
        sqlx::query(&format!("create database \"{quoted}\"")).execute(&mut admin).await?;
        tracing::info!(database = name, "created database");
    }
    Ok(())
}
