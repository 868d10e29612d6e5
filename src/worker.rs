//! Delivery workers: one step function, one dumb loop.
//!
//! [`process`] loads the attempt a message names, skips it if it is already done, lets the
//! channel do its work and records the result, the evidence and the item's new status in one
//! transaction. It returns an [`Outcome`]; [`run`] only acks, publishes retries and
//! dead-letters according to it, always after the database commit.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel as AmqpChannel};
use secrecy::ExposeSecret;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::channels::{self, Channel, ChannelError, Job};
use crate::config::Settings;
use crate::evidence::{self, Actor, Event, ItemContext, NewEvidence};
use crate::queue::{self, Envelope, Topology, RETRY_EXCHANGE, RETRY_HEADER};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Recorded (or found already recorded): ack.
    Done,
    /// Try again later: publish to the retry ladder, then ack.
    Retry(String),
    /// Cannot ever be processed: dead-letter.
    Dead(String),
}

const RETRIES_HEADER: &str = "x-dalil-retries";

/// Processes one message body for `channel`. Safe to call any number of times for the same
/// message: the attempt's status and the channel's own unique constraint make it idempotent.
pub async fn process(pool: &PgPool, channel: &dyn Channel, body: &[u8]) -> Outcome {
    let envelope: Envelope = match serde_json::from_slice(body) {
        Ok(e) => e,
        Err(e) => return Outcome::Dead(format!("malformed message: {e}")),
    };
    let Envelope::Deliver { attempt_id, trace_id, .. } = envelope else {
        return Outcome::Dead(format!("not a delivery for the {} channel: {envelope:?}", channel.name()));
    };
    let span = tracing::info_span!("deliver", %attempt_id, %trace_id, channel = channel.name());
    async move { process_logged(pool, channel, attempt_id).await }.instrument(span).await
}

async fn process_logged(pool: &PgPool, channel: &dyn Channel, attempt_id: Uuid) -> Outcome {
    match process_attempt(pool, channel, attempt_id).await {
        Ok(outcome) => outcome,
        Err(ChannelError::Transient(why)) => Outcome::Retry(why),
        Err(ChannelError::Permanent(why)) => match record_failure(pool, channel, attempt_id, &why).await {
            Ok(()) => Outcome::Done,
            Err(e) => Outcome::Retry(format!("recording failure: {e}")),
        },
    }
}

async fn load_job(conn: &mut sqlx::PgConnection, attempt_id: Uuid) -> Result<Option<(Job, String)>, sqlx::Error> {
    let row: Option<(Uuid, Uuid, Uuid, String)> = sqlx::query_as(
        "select a.step_id, a.item_id, i.recipient_id, a.status from attempt a join item i on i.id = a.item_id where a.id = $1",
    )
    .bind(attempt_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((step_id, item_id, recipient_id, status)) = row else { return Ok(None) };
    let item = ItemContext::load(conn, item_id).await?;
    Ok(Some((Job { attempt_id, step_id, recipient_id, item }, status)))
}

async fn process_attempt(pool: &PgPool, channel: &dyn Channel, attempt_id: Uuid) -> Result<Outcome, ChannelError> {
    let mut conn = pool.acquire().await?;
    let Some((job, status)) = load_job(&mut conn, attempt_id).await? else {
        return Ok(Outcome::Dead(format!("no attempt {attempt_id}")));
    };
    drop(conn);
    if status != "queued" {
        tracing::info!(status, "attempt already finished; redelivery skipped");
        return Ok(Outcome::Done);
    }
    let sent = channel.send(&job).await?;

    let mut tx = pool.begin().await?;
    // Lock order everywhere: the item row (a recall holds it), then the attempt (two copies of
    // one message racing each other finish once), then the evidence log head.
    sqlx::query("select 1 from item where id = $1 for update").bind(job.item.item_id).execute(&mut *tx).await?;
    let status: String = sqlx::query_scalar("select status from attempt where id = $1 for update")
        .bind(attempt_id)
        .fetch_one(&mut *tx)
        .await?;
    if status != "queued" {
        return Ok(Outcome::Done);
    }
    let fresh = channel.record(&mut tx, &job, &sent).await?;
    sqlx::query(
        "update attempt set status = 'done', tries = tries + 1, finished_at = now(), provider_ref = $2, segments = $3
         where id = $1",
    )
    .bind(attempt_id)
    .bind(&sent.provider_ref)
    .bind(sent.segments)
    .execute(&mut *tx)
    .await?;
    sqlx::query("update step set status = 'done', updated_at = now() where id = $1")
        .bind(job.step_id)
        .execute(&mut *tx)
        .await?;
    if let (true, Some(event)) = (fresh, sent.event) {
        if event == Event::ContentConsignment {
            sqlx::query(
                "update item set status = 'consigned', updated_at = now() where id = $1 and status = 'accepted'",
            )
            .bind(job.item.item_id)
            .execute(&mut *tx)
            .await?;
            // A confirmed deposit starts the deemed-service clock, where the policy has one.
            sqlx::query(
                "insert into timer (id, kind, item_id, due_at)
                 select $1, 'deemed', id, now() + deemed_after from item where id = $2 and deemed_after is not null
                 on conflict do nothing",
            )
            .bind(Uuid::now_v7())
            .bind(job.item.item_id)
            .execute(&mut *tx)
            .await?;
        }
        let mut details = sent.details.clone();
        details["attempt_id"] = serde_json::json!(attempt_id);
        evidence::append(
            &mut tx,
            &job.item,
            vec![NewEvidence {
                event,
                at: evidence::now(),
                actor: Actor::Platform(format!("channel:{}", channel.name())),
                channel: Some(channel.name().into()),
                details,
                digests: None,
            }],
        )
        .await?;
    }
    tx.commit().await?;
    tracing::info!(item_id = %job.item.item_id, event = ?sent.event, fresh, "delivered");
    Ok(Outcome::Done)
}

/// After the last retry: the attempt fails permanently, with evidence.
async fn give_up(pool: &PgPool, channel: &dyn Channel, body: &[u8], why: &str) -> Outcome {
    let Ok(Envelope::Deliver { attempt_id, .. }) = serde_json::from_slice::<Envelope>(body) else {
        return Outcome::Dead("malformed message".into());
    };
    let reason = format!("gave up after the last retry: {why}");
    match record_failure(pool, channel, attempt_id, &reason).await {
        Ok(()) => Outcome::Done,
        Err(e) => Outcome::Retry(format!("recording failure: {e}")),
    }
}

async fn record_failure(pool: &PgPool, channel: &dyn Channel, attempt_id: Uuid, why: &str) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let Some((job, _)) = load_job(&mut tx, attempt_id).await? else { return Ok(()) };
    sqlx::query("select 1 from item where id = $1 for update").bind(job.item.item_id).execute(&mut *tx).await?;
    let status: String = sqlx::query_scalar("select status from attempt where id = $1 for update")
        .bind(attempt_id)
        .fetch_one(&mut *tx)
        .await?;
    if status != "queued" {
        return Ok(());
    }
    let event = channel.failure_event();
    sqlx::query(
        "update attempt set status = 'failed', tries = tries + 1, detail = $2, finished_at = now() where id = $1",
    )
    .bind(attempt_id)
    .bind(why)
    .execute(&mut *tx)
    .await?;
    sqlx::query("update step set status = 'failed', updated_at = now() where id = $1")
        .bind(job.step_id)
        .execute(&mut *tx)
        .await?;
    if event == Event::ContentConsignmentFailure {
        // Only the inbox carries the item itself; a failed notice leaves the item as it is.
        sqlx::query("update item set status = 'failed', updated_at = now() where id = $1 and status = 'accepted'")
            .bind(job.item.item_id)
            .execute(&mut *tx)
            .await?;
    }

    evidence::append(
        &mut tx,
        &job.item,
        vec![NewEvidence {
            event,
            at: evidence::now(),
            actor: Actor::Platform(format!("channel:{}", channel.name())),
            channel: Some(channel.name().into()),
            details: serde_json::json!({ "attempt_id": attempt_id, "reason": why }),
            digests: None,
        }],
    )
    .await?;
    tx.commit().await?;
    tracing::warn!(item_id = %job.item.item_id, reason = why, "delivery failed permanently");
    Ok(())
}

/// What a consumer does with each message of its queue.
trait Handler: Send + Sync {
    fn name(&self) -> &str;
    /// `retries`: how many times this message went round the retry queues.
    fn process<'a>(&'a self, body: &'a [u8], retries: u32) -> BoxFuture<'a, Outcome>;
    /// After the last retry: record the failure for good.
    fn give_up<'a>(&'a self, body: &'a [u8], why: &'a str) -> BoxFuture<'a, Outcome>;
}

struct ChannelHandler {
    pool: PgPool,
    channel: Box<dyn Channel>,
}

impl Handler for ChannelHandler {
    fn name(&self) -> &str {
        self.channel.name()
    }

    fn process<'a>(&'a self, body: &'a [u8], _retries: u32) -> BoxFuture<'a, Outcome> {
        Box::pin(process(&self.pool, self.channel.as_ref(), body))
    }

    fn give_up<'a>(&'a self, body: &'a [u8], why: &'a str) -> BoxFuture<'a, Outcome> {
        Box::pin(give_up(&self.pool, self.channel.as_ref(), body, why))
    }
}

impl Handler for crate::callbacks::Caller {
    fn name(&self) -> &str {
        queue::CALLBACKS
    }

    fn process<'a>(&'a self, body: &'a [u8], retries: u32) -> BoxFuture<'a, Outcome> {
        Box::pin(crate::callbacks::Caller::process(self, body, retries))
    }

    fn give_up<'a>(&'a self, body: &'a [u8], why: &'a str) -> BoxFuture<'a, Outcome> {
        Box::pin(crate::callbacks::Caller::give_up(self, body, why))
    }
}

/// The names `run` accepts: the delivery channels and `webhooks` (agency callbacks).
pub fn known_queues() -> Vec<&'static str> {
    channels::KNOWN_CHANNELS.iter().copied().chain([queue::CALLBACKS]).collect()
}

/// Consumes the queues of `channels` (and `webhooks`, the agency callbacks) until cancelled,
/// reconnecting when the broker goes away.
pub async fn run(
    pool: PgPool,
    settings: Settings,
    topology: Topology,
    channel_names: Vec<String>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for name in channel_names {
        let handler: Arc<dyn Handler> = if name == queue::CALLBACKS {
            let timeout = Duration::from_millis(settings.callbacks.timeout_ms);
            Arc::new(crate::callbacks::Caller::new(pool.clone(), timeout)?)
        } else {
            Arc::new(ChannelHandler { pool: pool.clone(), channel: channels::build(&name, &settings, &pool)? })
        };
        let queue = topology.channel_queue(&name).with_context(|| format!("no queue for {name} in the topology"))?;
        let (settings, topology, cancel) = (settings.clone(), topology.clone(), cancel.clone());
        tasks.push(tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                let mut connected = false;
                match consume(&settings, &topology, &queue, handler.clone(), &cancel, &mut connected).await {
                    Ok(()) => return,
                    Err(e) => {
                        if connected {
                            // It worked until now: start the backoff over.
                            backoff = Duration::from_millis(200);
                        }
                        tracing::warn!(
                            queue,
                            error = format!("{e:#}"),
                            "worker: connection lost, reconnecting in {backoff:?}"
                        );
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(())
}

async fn consume(
    settings: &Settings,
    topology: &Topology,
    queue_name: &str,
    handler: Arc<dyn Handler>,
    cancel: &CancellationToken,
    connected: &mut bool,
) -> anyhow::Result<()> {
    let conn = queue::connect(settings.amqp_url.expose_secret(), &format!("dalil-worker-{}", handler.name())).await?;
    let amqp = conn.create_channel().await?;
    amqp.basic_qos(settings.worker.prefetch, BasicQosOptions::default()).await?;
    amqp.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut consumer = amqp
        .basic_consume(
            ShortString::from(queue_name),
            ShortString::from(format!("dalil-{}-{}", handler.name(), Uuid::new_v4())),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue = queue_name, "worker: consuming");
    *connected = true;
    let limit = Arc::new(Semaphore::new(settings.worker.concurrency));
    let ladder = topology.retry_ladder();
    let result = loop {
        let delivery = tokio::select! {
            _ = cancel.cancelled() => break Ok(()),
            d = consumer.next() => d,
        };
        let delivery = match delivery {
            Some(Ok(d)) => d,
            Some(Err(e)) => break Err(anyhow::Error::from(e)),
            None => break Err(anyhow::anyhow!("consumer closed by the broker")),
        };
        let permit = limit.clone().acquire_owned().await?;
        let (handler, amqp, ladder) = (handler.clone(), amqp.clone(), ladder.clone());
        let topology = topology.clone();
        tokio::spawn(async move {
            let mut outcome = handler.process(&delivery.data, retries_of(&delivery)).await;
            if let Outcome::Retry(why) = &outcome {
                if retries_of(&delivery) as usize >= ladder.len() {
                    // The last delay passed: the work fails for good, recorded.
                    outcome = handler.give_up(&delivery.data, why).await;
                }
            }
            if let Err(e) = settle(&amqp, &topology, &ladder, delivery, outcome).await {
                // The broker redelivers what was not acked; processing is idempotent.
                tracing::warn!(error = format!("{e:#}"), "worker: could not settle a delivery");
            }
            drop(permit);
        });
    };
    // Drain: wait until every delivery in flight has been settled before closing, so nothing
    // is acked early or abandoned half-way.
    let _all = limit.acquire_many(settings.worker.concurrency as u32).await?;
    let _ = conn.close(200, ShortString::from("shutdown")).await;
    result
}

/// Acks, retries or dead-letters one delivery according to its outcome.
async fn settle(
    amqp: &AmqpChannel,
    topology: &Topology,
    ladder: &[(String, u64)],
    delivery: Delivery,
    outcome: Outcome,
) -> anyhow::Result<()> {
    match outcome {
        Outcome::Done => {
            delivery.acker.ack(BasicAckOptions::default()).await?;
        }
        Outcome::Retry(why) => {
            let retries = retries_of(&delivery);
            let Some((queue_name, delay)) = ladder.get(retries as usize) else {
                // Only when even recording the failure failed: keep the message, dead-lettered.
                tracing::error!(why, retries, "worker: retries exhausted and failure not recorded, dead-lettering");
                delivery.acker.nack(BasicNackOptions { requeue: false, ..Default::default() }).await?;
                return Ok(());
            };
            tracing::warn!(why, retries, delay_ms = delay, "worker: will retry");
            let mut headers = delivery.properties.headers().clone().unwrap_or_default();
            headers
                .insert(ShortString::from(RETRY_HEADER), AMQPValue::LongString(LongString::from(queue_name.as_str())));
            headers.insert(ShortString::from(RETRIES_HEADER), AMQPValue::LongLongInt(retries as i64 + 1));
            let props: BasicProperties = delivery.properties.clone().with_headers(headers);
            let confirm = amqp
                .basic_publish(
                    ShortString::from(topology.name(RETRY_EXCHANGE)),
                    delivery.routing_key.clone(),
                    BasicPublishOptions { mandatory: true, ..Default::default() },
                    &delivery.data,
                    props,
                )
                .await?
                .await?;
            if confirm.is_ack() && confirm.take_message().is_none() {
                delivery.acker.ack(BasicAckOptions::default()).await?;
            } else {
                delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await?;
            }
        }
        Outcome::Dead(why) => {
            tracing::error!(why, "worker: dead-lettering a message");
            delivery.acker.nack(BasicNackOptions { requeue: false, ..Default::default() }).await?;
        }
    }
    Ok(())
}

fn retries_of(delivery: &Delivery) -> u32 {
    delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(RETRIES_HEADER).cloned())
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => Some(n as u32),
            AMQPValue::LongInt(n) => Some(n as u32),
            _ => None,
        })
        .unwrap_or(0)
}
