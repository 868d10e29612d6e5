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
/// here for its next batch instead ([`KeptConn::keep`]). A connection kept unused for
/// [`PING_AFTER_IDLE`] goes back to the pool, as does one whose work failed or was abandoned
/// (dropped without `keep`): those take the pool's way back, round trip and all, so a broken
/// or half-used connection is found there as before. At most `most` are kept at once: the
/// writer's batches in flight, which would hold as many connections anyway.
#[derive(Clone)]
pub struct Kept(Arc<KeptInner>);

struct KeptInner {
    pool: PgPool,
    most: usize,
    /// Connections kept, the most recently used last.
    idle: Mutex<Vec<(PoolConnection<Postgres>, Instant)>>,
}

impl Kept {
    /// Keeps up to `most` connections of `pool` (0: none, every connection goes back to the
    /// pool). Starts, on the current runtime, the task that gives back what sat unused.
    pub fn new(pool: PgPool, most: usize) -> Kept {
        let inner = Arc::new(KeptInner { pool, most, idle: Mutex::new(Vec::new()) });
        if most > 0 {
            let home = Arc::downgrade(&inner);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(PING_AFTER_IDLE / 4);
                loop {
                    tick.tick().await;
                    let Some(inner) = home.upgrade() else { return };
                    // Dropped outside the lock: each goes back to the pool with its ping.
                    let stale = inner.take_stale(false);
                    drop(stale);
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
            match idle.pop() {
                Some((conn, at)) if at.elapsed() < PING_AFTER_IDLE => Some(conn),
                Some(stale) => {
                    idle.push(stale);
                    None
                }
                None => None,
            }
        };
        let conn = match kept {
            Some(conn) => conn,
            None => {
                // The newest was stale, so all are: give them back first.
                drop(self.0.take_stale(true));
                self.0.pool.acquire().await?
            }
        };
        Ok(KeptConn { conn: Some(conn), home: self.0.clone() })
    }
}

impl KeptInner {
    /// Takes the connections unused for [`PING_AFTER_IDLE`] (all of them, if `all` or the pool
    /// is closing) out of the kept ones.
    fn take_stale(&self, all: bool) -> Vec<(PoolConnection<Postgres>, Instant)> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let all = all || self.pool.is_closed();
        let (stale, fresh): (Vec<_>, Vec<_>) =
            idle.drain(..).partition(|(_, at)| all || at.elapsed() >= PING_AFTER_IDLE);
        *idle = fresh;
        stale
    }
}

/// A connection taken from [`Kept`]: dropped, it goes back to the pool as usual; kept, it waits
/// for the writer's next batch.
pub struct KeptConn {
    conn: Option<PoolConnection<Postgres>>,
    home: Arc<KeptInner>,
}

impl KeptConn {
    /// Keeps the connection for the next batch. Only for a connection whose work is finished:
    /// every statement answered, no transaction open.
    pub fn keep(mut self) {
        let Some(conn) = self.conn.take() else { return };
        let extra = {
            let mut idle = self.home.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < self.home.most && !self.home.pool.is_closed() {
                idle.push((conn, Instant::now()));
                None
            } else {
                Some(conn)
            }
        };
        drop(extra);
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
