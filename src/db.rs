//! PostgreSQL: the pool and the migrations (embedded from `migrations/`).

use std::time::Duration;

use anyhow::Context;
use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::config::Settings;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub async fn connect(settings: &Settings) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions =
        settings.database_url.expose_secret().parse().context("database_url is not a valid PostgreSQL URL")?;
    PgPoolOptions::new()
        .max_connections(settings.database.max_connections)
        .acquire_timeout(Duration::from_millis(settings.database.acquire_timeout_ms))
        .connect_with(options.application_name("dalil"))
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
