//! PostgreSQL: the pool and the migrations (embedded from `migrations/`).

use std::time::Duration;

use anyhow::Context;
use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool};

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
