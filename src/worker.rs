//! Delivery workers: one step function, one dumb loop.
//!
//! [`process`] loads the attempt a message names, skips it if it is already done, lets the
//! channel do its work and records the result, the evidence and the item's new status in one
//! transaction. It returns an [`Outcome`]; [`run`] only acks, publishes retries and
//! dead-letters according to it, always after the database commit.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel as AmqpChannel};
use secrecy::ExposeSecret;
use sqlx::{Connection, PgPool};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::channels::{self, Channel, ChannelError, Job, Sent};
use crate::config::Settings;
use crate::db::Kept;
use crate::domain::Lane;
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
    process_batch(&Kept::new(pool.clone(), 0), channel, &[body]).await.pop().expect("one outcome per message")
}

/// Processes several message bodies of `channel`'s queue together: their jobs are loaded in
/// one query, sent concurrently, and recorded in one transaction (see [`record_delivered`]).
/// One outcome per body, in order; each is what [`process`] would give for it alone. The
/// connections come from `conns`, which keeps them between batches.
pub async fn process_batch(conns: &Kept, channel: &dyn Channel, bodies: &[&[u8]]) -> Vec<Outcome> {
    let pool = conns.pool();
    let mut outcomes: Vec<Option<Outcome>> = vec![None; bodies.len()];
    let mut wanted: Vec<(usize, Uuid, Uuid)> = Vec::with_capacity(bodies.len());
    for (i, body) in bodies.iter().enumerate() {
        match serde_json::from_slice::<Envelope>(body) {
            Ok(Envelope::Deliver { attempt_id, .. }) if wanted.iter().any(|w| w.1 == attempt_id) => {
                // Two copies of one message in one batch (a redelivery): the first one does
                // the work, and its outcome (a retry included) carries on for both.
                tracing::info!(%attempt_id, "a second copy of a delivery in the same batch; skipped");
                outcomes[i] = Some(Outcome::Done);
            }
            Ok(Envelope::Deliver { attempt_id, trace_id, .. }) => wanted.push((i, attempt_id, trace_id)),
            Ok(other) => {
                outcomes[i] =
                    Some(Outcome::Dead(format!("not a delivery for the {} channel: {other:?}", channel.name())))
            }
            Err(e) => outcomes[i] = Some(Outcome::Dead(format!("malformed message: {e}"))),
        }
    }
    let ids: Vec<Uuid> = wanted.iter().map(|w| w.1).collect();
    let mut jobs = match load_jobs(conns, &ids).await {
        Ok(jobs) => jobs,
        Err(e) => {
            for (i, _, _) in &wanted {
                outcomes[*i] = Some(Outcome::Retry(format!("database: {e}")));
            }
            return outcomes.into_iter().map(|o| o.expect("decided")).collect();
        }
    };
    // Send every job that is still to do, concurrently.
    let mut sends = Vec::with_capacity(wanted.len());
    for (i, attempt_id, trace_id) in &wanted {
        let span = tracing::info_span!("deliver", %attempt_id, %trace_id, channel = channel.name());
        match jobs.remove(attempt_id) {
            None => outcomes[*i] = Some(Outcome::Dead(format!("no attempt {attempt_id}"))),
            Some((_, status)) if status != "queued" => {
                span.in_scope(|| tracing::info!(status, "attempt already finished; redelivery skipped"));
                outcomes[*i] = Some(Outcome::Done);
            }
            Some((job, _)) => sends.push(
                async move {
                    let sent = channel.send(&job).await;
                    (*i, job, sent)
                }
                .instrument(span),
            ),
        }
    }
    let mut delivered: Vec<(usize, Job, Sent)> = Vec::with_capacity(sends.len());
    for (i, job, sent) in futures_util::future::join_all(sends).await {
        match sent {
            Ok(sent) => delivered.push((i, job, sent)),
            Err(ChannelError::Transient(why)) => outcomes[i] = Some(Outcome::Retry(why)),
            Err(ChannelError::Permanent(why)) => {
                outcomes[i] = Some(match record_failure(pool, channel, job.attempt_id, &why).await {
                    Ok(()) => Outcome::Done,
                    Err(e) => Outcome::Retry(format!("recording failure: {e}")),
                })
            }
        }
    }
    if !delivered.is_empty() {
        let all: Vec<(&Job, &Sent)> = delivered.iter().map(|(_, j, s)| (j, s)).collect();
        match record_delivered(conns, channel, &all).await {
            Ok(()) => {
                for (i, _, _) in &delivered {
                    outcomes[*i] = Some(Outcome::Done);
                }
            }
            Err(e) if delivered.len() > 1 => {
                // One bad job must not hold back the others: record each alone (what was sent
                // is not sent again).
                tracing::warn!(error = %e, jobs = delivered.len(), "worker: batch not recorded, recording one by one");
                for (i, job, sent) in &delivered {
                    outcomes[*i] = Some(match record_delivered(conns, channel, &[(job, sent)]).await {
                        Ok(()) => Outcome::Done,
                        Err(ChannelError::Transient(why)) => Outcome::Retry(why),
                        Err(ChannelError::Permanent(why)) => Outcome::Dead(why),
                    });
                }
            }
            Err(ChannelError::Transient(why)) => outcomes[delivered[0].0] = Some(Outcome::Retry(why)),
            Err(ChannelError::Permanent(why)) => outcomes[delivered[0].0] = Some(Outcome::Dead(why)),
        }
    }
    outcomes.into_iter().map(|o| o.expect("every message has an outcome")).collect()
}

#[derive(sqlx::FromRow)]
struct JobRow {
    attempt_id: Uuid,
    step_id: Uuid,
    recipient_id: Uuid,
    status: String,
    lane: Lane,
    #[sqlx(flatten)]
    item: ItemContext,
    notice_address: Option<String>,
    notice_subject: Option<String>,
    notice_text: Option<String>,
    notice_html: Option<String>,
    notice_encoding: Option<String>,
    notice_segments: Option<i32>,
}

impl JobRow {
    fn job(self) -> (Job, String) {
        let notice = match (self.notice_address, self.notice_text) {
            (Some(address), Some(text)) => Some(crate::channels::Notice {
                address,
                subject: self.notice_subject,
                text,
                html: self.notice_html,
                encoding: self.notice_encoding,
                segments: self.notice_segments,
            }),
            _ => None,
        };
        let job = Job {
            attempt_id: self.attempt_id,
            step_id: self.step_id,
            recipient_id: self.recipient_id,
            item: self.item,
            lane: self.lane,
            notice,
        };
        (job, self.status)
    }
}

/// Each attempt is its own probe (a lateral subquery per id, kept apart by `offset 0`): one row
/// in, so every join is a probe of a unique index, and the plan PostgreSQL caches for the
/// prepared statement stays right as the tables grow (a join of the whole array, planned once
/// while they were small, scanned them whole for ever after: docs/performance.md, "Plans
/// cached on a new database"). The exception is a table analyzed while it held about a page,
/// which may be scanned per id until its next ANALYZE replans this. Planned once, not per batch.
const JOB_QUERY: &str = "select j.* from unnest($1::uuid[]) as x(id) cross join lateral (
     select a.id as attempt_id, a.step_id, i.recipient_id, a.status, i.lane,
        i.id as item_id, ag.id as agency_id, ag.code as agency_code, i.kind, i.reference,
        case when r.pinfl is not null then 'pinfl' else 'tin' end as recipient_scheme,
        coalesce(r.pinfl, r.tin) as recipient_value, i.policy_id, i.policy_version,
        n.address as notice_address, n.subject as notice_subject, n.body_text as notice_text,
        n.body_html as notice_html, n.encoding as notice_encoding, n.segments as notice_segments
     from attempt a join item i on i.id = a.item_id join agency ag on ag.id = i.agency_id
     join recipient r on r.id = i.recipient_id
     left join notice n on n.item_id = a.item_id and n.channel = a.channel
     where a.id = x.id offset 0) j";

/// The jobs of these attempts and their statuses, in one query.
async fn load_jobs(conns: &Kept, attempt_ids: &[Uuid]) -> sqlx::Result<HashMap<Uuid, (Job, String)>> {
    let mut conn = conns.acquire().await?;
    let rows: Vec<JobRow> = sqlx::query_as(JOB_QUERY).bind(attempt_ids).fetch_all(&mut *conn).await?;
    conn.keep();
    Ok(rows.into_iter().map(|r| (r.attempt_id, r.job())).collect())
}

async fn load_job(conn: &mut sqlx::PgConnection, attempt_id: Uuid) -> Result<Option<(Job, String)>, sqlx::Error> {
    let row: Option<JobRow> = sqlx::query_as(JOB_QUERY).bind([attempt_id]).fetch_optional(conn).await?;
    Ok(row.map(JobRow::job))
}

/// Records what the channel did for these jobs, in one transaction and about ten statements
/// whatever their number: the channel's rows, the attempts and steps done, the items
/// consigned, their deemed-service timers and the evidence. A job whose attempt was finished
/// meanwhile (a redelivered copy won) is left as it is.
async fn record_delivered(conns: &Kept, channel: &dyn Channel, batch: &[(&Job, &Sent)]) -> Result<(), ChannelError> {
    let mut conn = conns.acquire().await?;
    let mut tx = conn.begin().await?;
    // Lock order everywhere: item, step, attempt (a recall, an escalation and a recorded failure
    // take them in that order; two copies of one message racing each other finish once, on the
    // attempt's lock). Sorted, so batches never deadlock. A delivery that consigns the item
    // changes it, so it locks the item first, as a recall does. A notice (SMS, email) leaves
    // the item as it is and starts at its steps: it does not wait for the inbox batch of the
    // same items, which used to cost as much waiting as all other statements together
    // (docs/performance.md).
    if batch.iter().any(|(_, sent)| sent.event == Some(Event::ContentConsignment)) {
        let mut items: Vec<Uuid> = batch.iter().map(|(j, _)| j.item.item_id).collect();
        items.sort();
        items.dedup();
        sqlx::query("select 1 from item where id = any($1) order by id for no key update")
            .bind(&items)
            .execute(&mut *tx)
            .await?;
    }
    let mut steps: Vec<Uuid> = batch.iter().map(|(j, _)| j.step_id).collect();
    steps.sort();
    steps.dedup();
    // The locks and updates by an array of ids are planned for their values each time
    // (`persistent(false)`): a plan cached while the tables were small would scan them whole
    // for ever after (docs/performance.md, "Plans cached on a new database").
    sqlx::query("select 1 from step where id = any($1) order by id for no key update")
        .bind(&steps)
        .persistent(false)
        .execute(&mut *tx)
        .await?;
    let mut attempts: Vec<Uuid> = batch.iter().map(|(j, _)| j.attempt_id).collect();
    attempts.sort();
    let queued: Vec<Uuid> =
        sqlx::query_scalar("select id from attempt where id = any($1) and status = 'queued' order by id for update")
            .bind(&attempts)
            .persistent(false)
            .fetch_all(&mut *tx)
            .await?;
    let todo: Vec<(&Job, &Sent)> = batch.iter().copied().filter(|(j, _)| queued.contains(&j.attempt_id)).collect();
    if todo.is_empty() {
        return Ok(());
    }
    let fresh = channel.record_many(&mut tx, &todo).await?;
    let ids: Vec<Uuid> = todo.iter().map(|(j, _)| j.attempt_id).collect();
    let refs: Vec<Option<&str>> = todo.iter().map(|(_, s)| s.provider_ref.as_deref()).collect();
    let segments: Vec<Option<i32>> = todo.iter().map(|(_, s)| s.segments).collect();
    sqlx::query(
        "update attempt a set status = 'done', tries = tries + 1, finished_at = now(), provider_ref = x.p, segments = x.s
         from unnest($1::uuid[], $2::text[], $3::int[]) as x(id, p, s) where a.id = x.id",
    )
    .bind(&ids)
    .bind(&refs)
    .bind(&segments)
    .persistent(false)
    .execute(&mut *tx)
    .await?;
    let steps: Vec<Uuid> = todo.iter().map(|(j, _)| j.step_id).collect();
    sqlx::query("update step set status = 'done', updated_at = now() where id = any($1)")
        .bind(&steps)
        .persistent(false)
        .execute(&mut *tx)
        .await?;
    let mut consigned: Vec<Uuid> = Vec::new();
    let mut records: Vec<(&ItemContext, Vec<NewEvidence>)> = Vec::new();
    for ((job, sent), fresh) in todo.iter().zip(&fresh) {
        let (true, Some(event)) = (*fresh, sent.event) else { continue };
        if event == Event::ContentConsignment {
            consigned.push(job.item.item_id);
        }
        let mut details = sent.details.clone();
        details["attempt_id"] = serde_json::json!(job.attempt_id);
        records.push((
            &job.item,
            vec![NewEvidence {
                event,
                at: evidence::now(),
                actor: Actor::Platform(format!("channel:{}", channel.name())),
                channel: Some(channel.name().into()),
                details,
                digests: None,
            }],
        ));
    }
    if !consigned.is_empty() {
        sqlx::query(
            "update item set status = 'consigned', updated_at = now() where id = any($1) and status = 'accepted'",
        )
        .bind(&consigned)
        .execute(&mut *tx)
        .await?;
        // A confirmed deposit starts the deemed-service clock, where the policy has one.
        sqlx::query(
            "insert into timer (id, kind, item_id, due_at)
             select gen_random_uuid(), 'deemed', id, now() + deemed_after from item
             where id = any($1) and deemed_after is not null
             on conflict do nothing",
        )
        .bind(&consigned)
        .execute(&mut *tx)
        .await?;
    }
    evidence::append_many(&mut tx, &records).await?;
    tx.commit().await?;
    conn.keep();
    for ((job, sent), fresh) in todo.iter().zip(&fresh) {
        tracing::debug!(item_id = %job.item.item_id, attempt_id = %job.attempt_id, event = ?sent.event, fresh, "delivered");
    }
    Ok(())
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
    // The same lock order as a batch: item, step, attempt.
    sqlx::query("select 1 from item where id = $1 for no key update").bind(job.item.item_id).execute(&mut *tx).await?;
    sqlx::query("select 1 from step where id = $1 for no key update").bind(job.step_id).execute(&mut *tx).await?;
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
    /// Whether [`Handler::process_batch`] does a batch's work together, so that a bigger batch
    /// costs less per message (and a batch on an idle queue is worth waiting for).
    fn batches(&self) -> bool {
        false
    }
    /// Several messages at once, one outcome each, in order. By default one at a time.
    fn process_batch<'a>(&'a self, messages: &'a [(&'a [u8], u32)]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(async move {
            futures_util::future::join_all(messages.iter().map(|(body, retries)| self.process(body, *retries))).await
        })
    }
}

struct ChannelHandler {
    pool: PgPool,
    /// The connections its batches keep between them, one per batch in flight.
    conns: Kept,
    /// Shared by the lanes' consumers: one provider, one rate limit, one SMTP pool.
    channel: Arc<dyn Channel>,
}

impl Handler for ChannelHandler {
    fn name(&self) -> &str {
        self.channel.name()
    }

    fn batches(&self) -> bool {
        true
    }

    fn process<'a>(&'a self, body: &'a [u8], _retries: u32) -> BoxFuture<'a, Outcome> {
        Box::pin(process(&self.pool, self.channel.as_ref(), body))
    }

    fn give_up<'a>(&'a self, body: &'a [u8], why: &'a str) -> BoxFuture<'a, Outcome> {
        Box::pin(give_up(&self.pool, self.channel.as_ref(), body, why))
    }

    fn process_batch<'a>(&'a self, messages: &'a [(&'a [u8], u32)]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(async move {
            let bodies: Vec<&[u8]> = messages.iter().map(|(b, _)| *b).collect();
            process_batch(&self.conns, self.channel.as_ref(), &bodies).await
        })
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

/// How many batches of a queue a worker handles at once.
fn batches_at_once(settings: &Settings, queue: &str) -> usize {
    match queue {
        "inbox" => settings.worker.inbox_concurrency,
        _ => settings.worker.concurrency,
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
    let mut consumers = Vec::new();
    for name in channel_names {
        let queues = topology.channel_queues(&name);
        anyhow::ensure!(!queues.is_empty(), "no queue for {name} in the topology");
        if name == queue::CALLBACKS {
            let timeout = Duration::from_millis(settings.callbacks.timeout_ms);
            let caller: Arc<dyn Handler> = Arc::new(crate::callbacks::Caller::new(pool.clone(), timeout)?);
            consumers.extend(queues.into_iter().map(|(queue, _)| (queue, caller.clone())));
            continue;
        }
        // A consumer per lane, each with its own prefetch, batches and connections: the bulk
        // lane's backlog never stands ahead of the standard lane's work (DESIGN invariant 5).
        let channel: Arc<dyn Channel> = Arc::from(channels::build(&name, &settings, &pool)?);
        for (queue, _lane) in queues {
            let handler = ChannelHandler {
                pool: pool.clone(),
                conns: Kept::new(pool.clone(), batches_at_once(&settings, &name)),
                channel: channel.clone(),
            };
            consumers.push((queue, Arc::new(handler) as Arc<dyn Handler>));
        }
    }
    let mut tasks = Vec::new();
    for (queue, handler) in consumers {
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
    let conn = queue::connect(settings.amqp_url.expose_secret(), &format!("dalil-worker-{queue_name}")).await?;
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
    let concurrency = batches_at_once(settings, handler.name());
    let limit = Arc::new(Semaphore::new(concurrency));
    let acks: Arc<Mutex<Acks>> = Arc::default();
    let ladder = topology.retry_ladder();
    // More than `prefetch` unacked deliveries never come, so a batch never waits for more.
    let batch_size = settings.worker.batch_size.clamp(1, settings.worker.prefetch.max(1) as usize);
    let wait = Duration::from_millis(if handler.batches() { settings.worker.batch_wait_ms } else { 0 });
    let result = loop {
        // A free slot first: while every slot is busy, deliveries pile up and make the next
        // batch bigger.
        let permit = tokio::select! {
            biased;
            _ = cancel.cancelled() => break Ok(()),
            p = limit.clone().acquire_owned() => p?,
        };
        // A delivery that is already here means work is waiting: take what has come and go.
        // One that had to be waited for means the queue was idle (light load): then wait
        // `batch_wait_ms` more for others, so that a few deliveries share a batch's dozen
        // statements instead of each paying them alone.
        let (delivery, idle) = match consumer.next().now_or_never() {
            Some(d) => (d, false),
            None => tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                d = consumer.next() => (d, true),
            },
        };
        let mut batch = match delivery {
            Some(Ok(d)) => vec![d],
            Some(Err(e)) => break Err(anyhow::Error::from(e)),
            None => break Err(anyhow::anyhow!("consumer closed by the broker")),
        };
        let until = (idle && !wait.is_zero()).then(|| tokio::time::Instant::now() + wait);
        let mut ended = None;
        while batch.len() < batch_size {
            let next = match until {
                None => consumer.next().now_or_never(),
                Some(until) => tokio::select! {
                    // Shutting down: record what came, and stop before the next batch.
                    _ = cancel.cancelled() => None,
                    _ = tokio::time::sleep_until(until) => None,
                    d = consumer.next() => Some(d),
                },
            };
            match next {
                Some(Some(Ok(d))) => batch.push(d),
                Some(Some(Err(e))) => {
                    ended = Some(anyhow::Error::from(e));
                    break;
                }
                Some(None) => {
                    ended = Some(anyhow::anyhow!("consumer closed by the broker"));
                    break;
                }
                None => break,
            }
        }
        {
            let mut acks = acks.lock().await;
            for d in &batch {
                acks.delivered(d.delivery_tag);
            }
        }
        let (handler, amqp, ladder, acks) = (handler.clone(), amqp.clone(), ladder.clone(), acks.clone());
        let topology = topology.clone();
        tokio::spawn(async move {
            // A batch that ends without settling its deliveries (a panic) would keep every
            // later ack of the channel waiting: then the channel is closed, and the broker
            // delivers again whatever was not acked.
            let unfinished = CloseUnlessFinished(Some(amqp.clone()));
            let messages: Vec<(&[u8], u32)> = batch.iter().map(|d| (d.data.as_slice(), retries_of(d))).collect();
            let outcomes = handler.process_batch(&messages).await;
            drop(messages);
            let mut done = Vec::with_capacity(batch.len());
            for (delivery, mut outcome) in batch.into_iter().zip(outcomes) {
                if let Outcome::Retry(why) = &outcome {
                    if retries_of(&delivery) as usize >= ladder.len() {
                        // The last delay passed: the work fails for good, recorded.
                        outcome = handler.give_up(&delivery.data, why).await;
                    }
                }
                if matches!(outcome, Outcome::Done) {
                    done.push(delivery.delivery_tag);
                    continue;
                }
                let tag = delivery.delivery_tag;
                if let Err(e) = settle(&amqp, &topology, &ladder, delivery, outcome).await {
                    // The broker redelivers what was not settled once the channel closes, and
                    // processing is idempotent. Closing it also keeps a later `multiple` ack
                    // from covering this delivery.
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "worker: could not settle a delivery; closing the channel"
                    );
                    let _ = amqp.close(500, ShortString::from("a delivery could not be settled")).await;
                }
                acks.lock().await.settled(tag);
            }
            // Acks under the lock, so in order: one for every delivery up to where all are
            // settled, and this batch's others one by one, so that a slow earlier batch (a
            // provider timing out) does not hold them, nor the queue behind them.
            let mut acks = acks.lock().await;
            let (upto, alone) = acks.done(&done);
            let mut sent = Ok(());
            if let Some(upto) = upto {
                sent = amqp.basic_ack(upto, BasicAckOptions { multiple: true }).await;
            }
            for tag in alone {
                if sent.is_ok() {
                    sent = amqp.basic_ack(tag, BasicAckOptions { multiple: false }).await;
                }
            }
            if let Err(e) = sent {
                tracing::warn!(error = %e, "worker: could not ack; the broker will redeliver");
            }
            drop(acks);
            unfinished.finished();
            drop(permit);
        });
        if let Some(e) = ended {
            break Err(e);
        }
    };
    // Drain: wait until every delivery in flight has been settled before closing, so nothing
    // is acked early or abandoned half-way.
    let _all = limit.acquire_many(concurrency as u32).await?;
    let _ = conn.close(200, ShortString::from("shutdown")).await;
    result
}

/// Closes the channel when dropped before [`CloseUnlessFinished::finished`] (a batch's task
/// that panicked).
struct CloseUnlessFinished(Option<AmqpChannel>);

impl CloseUnlessFinished {
    fn finished(mut self) {
        self.0 = None;
    }
}

impl Drop for CloseUnlessFinished {
    fn drop(&mut self) {
        if let Some(channel) = self.0.take() {
            tracing::error!("worker: a batch ended without settling its deliveries; closing the channel");
            tokio::spawn(async move {
                let _ = channel.close(500, ShortString::from("a batch ended without settling")).await;
            });
        }
    }
}

/// The deliveries of one channel that are not settled yet. Work that is done is acked with one
/// `multiple` ack per batch instead of one ack per message (RabbitMQ settles them as one
/// command). Such an ack covers every unsettled delivery up to its tag, those of other batches
/// still in flight included, so it goes out only up to the first delivery that is not done;
/// the rest of a batch is acked one by one.
#[derive(Debug, Default)]
struct Acks {
    /// Delivered and not settled: tag → done (processed, waiting for the ack that covers it).
    open: BTreeMap<u64, bool>,
}

impl Acks {
    fn delivered(&mut self, tag: u64) {
        self.open.insert(tag, false);
    }

    /// Settled on its own (retried, dead-lettered): nothing to wait for.
    fn settled(&mut self, tag: u64) {
        self.open.remove(&tag);
    }

    /// Marks these done (a batch's). Returns the tag a `multiple` ack may now be sent for, when
    /// there is one (every open delivery up to it is done), and those of these tags it does not
    /// cover, to be acked one by one. All of them are forgotten.
    fn done(&mut self, tags: &[u64]) -> (Option<u64>, Vec<u64>) {
        for tag in tags {
            if let Some(done) = self.open.get_mut(tag) {
                *done = true;
            }
        }
        let mut upto = None;
        while let Some((&tag, true)) = self.open.first_key_value() {
            self.open.pop_first();
            upto = Some(tag);
        }
        let alone: Vec<u64> = tags.iter().copied().filter(|tag| self.open.remove(tag).is_some()).collect();
        (upto, alone)
    }
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

#[cfg(test)]
mod tests {
    use super::Acks;

    #[test]
    fn a_batch_is_acked_with_one_multiple_ack_when_every_earlier_delivery_is_settled() {
        let mut acks = Acks::default();
        for tag in 1..=6 {
            acks.delivered(tag);
        }
        assert_eq!(acks.done(&[1, 2, 3]), (Some(3), vec![]));
        assert_eq!(acks.done(&[4, 5, 6]), (Some(6), vec![]));
        assert_eq!(acks.done(&[]), (None, vec![]));
    }

    #[test]
    fn a_batch_that_finishes_before_an_earlier_one_is_acked_one_by_one() {
        let mut acks = Acks::default();
        for tag in 1..=6 {
            acks.delivered(tag);
        }
        // The second batch (4–6) finishes first: 1–3 are still being worked on, and an ack
        // with `multiple` for 6 would cover them. It does not wait for them either.
        assert_eq!(acks.done(&[4, 5, 6]), (None, vec![4, 5, 6]));
        // Then the first: its ack with `multiple` covers only itself (4–6 are acked already).
        assert_eq!(acks.done(&[1, 2, 3]), (Some(3), vec![]));
        assert!(acks.open.is_empty());
    }

    #[test]
    fn a_delivery_settled_on_its_own_is_never_covered_by_a_multiple_ack() {
        let mut acks = Acks::default();
        for tag in 1..=4 {
            acks.delivered(tag);
        }
        // 2 is retried: acked on its own after its copy is published, while 1, 3 and 4 are done.
        acks.settled(2);
        assert_eq!(acks.done(&[1, 3, 4]), (Some(4), vec![]));
    }

    #[test]
    fn the_multiple_ack_stops_at_the_first_delivery_still_in_flight() {
        let mut acks = Acks::default();
        for tag in 10..=15 {
            acks.delivered(tag);
        }
        // 12 belongs to a batch still being worked on.
        assert_eq!(acks.done(&[10, 11, 13, 14]), (Some(11), vec![13, 14]));
        assert_eq!(acks.done(&[15]), (None, vec![15]));
        assert_eq!(acks.done(&[12]), (Some(12), vec![]));
        assert!(acks.open.is_empty());
    }
}
