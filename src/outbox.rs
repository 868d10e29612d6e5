//! The transactional outbox and its relay.
//!
//! Whatever must be published is written as an outbox row in the same transaction as the
//! change that calls for it. The relay claims rows with `FOR UPDATE SKIP LOCKED` (so several
//! relays share the work), publishes them with publisher confirms, and deletes them only once
//! RabbitMQ confirmed every one — in the same transaction that holds the claim. A relay that
//! dies mid-batch leaves its rows in place; they are published again and the consumers,
//! idempotent by attempt id, absorb the duplicate.
//!
//! A published row is deleted, not marked: what it announced is recorded where it belongs (the
//! attempt, the evidence), and marking it cost a new version of the row and an entry in each
//! of its indexes, then a delete by the retention job days later. So every row in the outbox
//! waits to be published, and the relay claims them by the primary key, in order (migration
//! 15 dropped the partial index of unpublished rows, which held the same entries). A row that
//! an older version marked published (during a rolling upgrade) is stepped over and removed by
//! retention.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel};
use secrecy::ExposeSecret;
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Settings;
use crate::queue::{self, Topology};

const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the relay until cancelled, reconnecting to RabbitMQ (with backoff) whenever the
/// connection is lost.
pub async fn run(
    pool: PgPool,
    settings: Settings,
    topology: Topology,
    wake: Wake,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut connected = false;
        match run_connected(&pool, &settings, &topology, &wake.0, &cancel, &mut connected).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                if connected {
                    backoff = Duration::from_millis(200);
                }
                tracing::warn!(error = format!("{e:#}"), "relay: connection lost, reconnecting in {backoff:?}");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Wakes the relay of the app it belongs to, if that app runs one, after a commit that wrote
/// outbox rows; cheap to clone. Relays in other processes find the rows at their next poll
/// (`relay.poll_interval_ms`).
///
/// Not NOTIFY: PostgreSQL serialises the commits of every transaction that sent a NOTIFY
/// (they take one lock at commit, held through the WAL flush), which capped submissions at
/// about 300/s on this machine.
#[derive(Clone, Default)]
pub struct Wake(Arc<Notify>);

impl Wake {
    pub fn wake(&self) {
        self.0.notify_one();
    }
}

async fn run_connected(
    pool: &PgPool,
    settings: &Settings,
    topology: &Topology,
    wake: &Notify,
    cancel: &CancellationToken,
    connected: &mut bool,
) -> anyhow::Result<()> {
    let conn = queue::connect(settings.amqp_url.expose_secret(), "dalil-relay").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let poll = Duration::from_millis(settings.relay.poll_interval_ms);
    let wait = Duration::from_millis(settings.relay.batch_wait_ms);
    tracing::info!("relay: publishing outbox rows");
    *connected = true;
    loop {
        if cancel.is_cancelled() {
            let _ = conn.close(200, ShortString::from("shutdown")).await;
            return Ok(());
        }
        // The rows of every wake so far are committed, so this round sees them: a wake left
        // stored would only make an empty round later.
        let _ = wake.notified().now_or_never();
        let (claimed, published) = publish_batch(pool, &ch, topology, settings.relay.batch_size).await?;
        if claimed > 0 && published == claimed && claimed == settings.relay.batch_size as usize {
            continue; // a full batch: more may be waiting
        }
        if published < claimed {
            // Refused or unroutable rows stay unpublished; do not spin on them.
            tokio::time::sleep(poll).await;
        }
        if claimed == 0 {
            tokio::select! {
                _ = cancel.cancelled() => continue,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(poll) => continue,
            }
        }
        // Rows are coming (this round found some, or a commit woke the relay): let the ones
        // committed over the next `batch_wait_ms` join them. A round costs four statements
        // and a confirm however few rows it carries; without the wait, under light load, each
        // submission's commit was a round of its own.
        if !wait.is_zero() {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// Claims, publishes and deletes one batch. Returns (claimed, deleted): the rows published now
/// and any an older version had published and marked.
pub async fn publish_batch(
    pool: &PgPool,
    ch: &Channel,
    topology: &Topology,
    limit: i64,
) -> anyhow::Result<(usize, usize)> {
    let mut tx = pool.begin().await?;
    // By the primary key alone: without statistics, PostgreSQL guesses that few rows have no
    // `published_at` and would scan and sort the whole table to find them.
    let rows: Vec<(i64, String, String, Uuid, Value, bool)> = sqlx::query_as(
        "select id, exchange, routing_key, message_id, payload, published_at is not null from outbox
         order by id limit $1 for update skip locked",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok((0, 0));
    }
    // Publish the whole batch, then wait for the confirms: a window in flight, never one
    // awaited at a time. A row an older version published and marked is only deleted.
    let mut published: Vec<i64> = rows.iter().filter(|r| r.5).map(|r| r.0).collect();
    let mut pending = Vec::with_capacity(rows.len());
    for (id, exchange, routing_key, message_id, payload, _) in rows.iter().filter(|r| !r.5) {
        let body = serde_json::to_vec(payload)?;
        let kind = payload.get("type").and_then(Value::as_str).unwrap_or("unknown");
        let props = BasicProperties::default()
            .with_message_id(ShortString::from(message_id.to_string()))
            .with_content_type(ShortString::from("application/json"))
            .with_type(ShortString::from(kind))
            .with_delivery_mode(2);
        let confirm = ch
            .basic_publish(
                ShortString::from(topology.name(exchange)),
                ShortString::from(routing_key.as_str()),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                &body,
                props,
            )
            .await?;
        pending.push((*id, confirm));
    }
    for (id, confirm) in pending {
        // A broker that stops answering must not hold the claimed rows for ever: give up, roll
        // back, reconnect, publish again.
        let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
            .await
            .map_err(|_| anyhow::anyhow!("no publisher confirm within {CONFIRM_TIMEOUT:?}"))??;
        if confirmation.is_ack() && confirmation.take_message().is_none() {
            published.push(id);
        } else {
            tracing::warn!(
                outbox_id = id,
                "relay: RabbitMQ refused or could not route a message; it stays in the outbox"
            );
        }
    }
    sqlx::query("delete from outbox where id = any($1)").bind(&published).execute(&mut *tx).await?;
    tx.commit().await?;
    tracing::debug!(claimed = rows.len(), published = published.len(), "relay: batch");
    Ok((rows.len(), published.len()))
}
