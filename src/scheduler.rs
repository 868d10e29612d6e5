//! Recurring jobs on `cron` schedules from configuration: escalations and deemed service (the
//! timers of [`crate::timers`]), checkpoint signing, the log monitor, unconfirmed letters,
//! retention and the outbox sweep.
//!
//! Each job's next run lives in PostgreSQL (`scheduler_job`). A scheduler claims a run by
//! moving `next_run_at` forward in one conditional UPDATE, so with several schedulers each run
//! happens once; a scheduler that was down finds the run overdue and does it (once) when it
//! returns. A job that is still running is not started again by the same scheduler.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use cron::Schedule;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::log;
use crate::timers::{self, Kind};

/// This process's name in `scheduler_job.last_claimed_by` and `timer.fired_by`.
pub fn who() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    format!("{host}:{}", std::process::id())
}

pub async fn run(pool: PgPool, settings: Settings, cancel: CancellationToken) -> anyhow::Result<()> {
    let mut jobs = Vec::new();
    for (name, expr) in settings.scheduler.jobs() {
        let schedule = Schedule::from_str(expr).map_err(|e| anyhow::anyhow!("scheduler.{name}: {e}"))?;
        // First run: the next tick of the schedule. An existing row keeps its (maybe overdue) time.
        let first = schedule.upcoming(Utc).next().unwrap_or_else(Utc::now);
        sqlx::query("insert into scheduler_job (name, next_run_at) values ($1, $2) on conflict do nothing")
            .bind(name)
            .bind(first)
            .execute(&pool)
            .await?;
        tracing::info!(job = name, schedule = %schedule, "scheduler: job registered");
        jobs.push((name, schedule));
    }
    warn_without_autovacuum(&pool).await;
    let me = who();
    let sequencer = tokio::spawn(run_sequencer(
        pool.clone(),
        Duration::from_millis(settings.log.sequence_interval_ms.max(10)),
        cancel.clone(),
    ));
    let running: Arc<Mutex<HashSet<&'static str>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    let tick = Duration::from_millis(settings.scheduler.tick_ms);
    loop {
        for (name, schedule) in &jobs {
            if running.lock().expect("not poisoned").contains(name) {
                continue;
            }
            match claim(&pool, name, schedule, &me).await {
                Ok(false) => {}
                Ok(true) => {
                    running.lock().expect("not poisoned").insert(name);
                    let (pool, settings, running, me, name) =
                        (pool.clone(), settings.clone(), running.clone(), me.clone(), *name);
                    tasks.spawn(async move {
                        // Marks the job as not running when this task ends, even by a panic.
                        let _running = Running(running, name);
                        let result = run_job(name, &pool, &settings, &me).await;
                        let error = result.as_ref().err().map(|e| format!("{e:#}"));
                        if let Some(e) = &error {
                            tracing::error!(job = name, error = e, "scheduler: job failed");
                        }
                        let _ = sqlx::query(
                            "update scheduler_job set last_finished_at = now(), last_error = $2 where name = $1",
                        )
                        .bind(name)
                        .bind(&error)
                        .execute(&pool)
                        .await;
                    });
                }
                Err(e) => tracing::warn!(job = name, error = %e, "scheduler: could not claim a run"),
            }
        }
        while tasks.try_join_next().is_some() {}
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(tick) => {}
        }
    }
    // Let running jobs finish their transaction.
    while tasks.join_next().await.is_some() {}
    let _ = sequencer.await;
    Ok(())
}

/// Gives committed evidence records their log indexes every `interval` (see
/// [`log::sequence`]). Several schedulers may run it: one sequences, the others skip the pass.
async fn run_sequencer(pool: PgPool, interval: Duration, cancel: CancellationToken) {
    let mut failing = false;
    loop {
        match log::sequence(&pool, false).await {
            Ok(n) => {
                if failing {
                    tracing::info!("sequencer: working again");
                    failing = false;
                }
                if n > 0 {
                    tracing::debug!(records = n, "sequencer: records indexed");
                }
            }
            Err(e) => {
                if !failing {
                    tracing::error!(error = format!("{e:#}"), "sequencer: could not index new evidence records");
                }
                failing = true;
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

struct Running(Arc<Mutex<HashSet<&'static str>>>, &'static str);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(mut set) = self.0.lock() {
            set.remove(self.1);
        }
    }
}

/// Claims the job's run if it is due: moves `next_run_at` to the schedule's next time after
/// now. True when this scheduler won the run.
pub async fn claim(pool: &PgPool, name: &str, schedule: &Schedule, me: &str) -> sqlx::Result<bool> {
    // The database's clock decides what is due, so the next run is counted from it too.
    let now: DateTime<Utc> = sqlx::query_scalar("select now()").fetch_one(pool).await?;
    let next: DateTime<Utc> = schedule.after(&now).next().unwrap_or_else(|| now + chrono::Duration::days(365));
    let claimed = sqlx::query(
        "update scheduler_job set next_run_at = $2, last_started_at = now(), last_claimed_by = $3, runs = runs + 1
         where name = $1 and next_run_at <= now()",
    )
    .bind(name)
    .bind(next)
    .bind(me)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(claimed == 1)
}

/// Without autovacuum, nothing removes dead rows (every delivery updates rows) and nothing
/// analyzes the tables as they grow, so plans made while they were small stay in use
/// (docs/performance.md measured both). Said once, at start.
async fn warn_without_autovacuum(pool: &PgPool) {
    let on: Result<bool, _> =
        sqlx::query_scalar("select current_setting('autovacuum') = 'on' and current_setting('track_counts') = 'on'")
            .fetch_one(pool)
            .await;
    if let Ok(false) = on {
        tracing::warn!(
            "PostgreSQL runs without autovacuum (autovacuum or track_counts is off): dead rows pile up \
             and table statistics go stale; turn it on in postgresql.conf"
        );
    }
}

pub async fn run_job(name: &str, pool: &PgPool, settings: &Settings, me: &str) -> anyhow::Result<()> {
    match name {
        "escalation" => {
            let f = timers::fire_due(pool, Kind::Escalate, me).await?;
            if f.fired > 0 {
                tracing::info!(fired = f.fired, started = f.acted, "escalation timers fired");
            }
        }
        "deemed_delivery" => {
            let f = timers::fire_due(pool, Kind::Deemed, me).await?;
            if f.fired > 0 {
                tracing::info!(fired = f.fired, served = f.acted, "deemed-service timers fired");
            }
        }
        "checkpoint" => {
            let Some(signer) = log::signer(pool, &settings.log).await? else {
                tracing::warn!("scheduler: no signing key, no checkpoint (dalil admin signing-key generate)");
                return Ok(());
            };
            let head: i64 = sqlx::query_scalar("select size from evidence_log_head").fetch_one(pool).await?;
            let latest = log::latest_checkpoint(&mut *pool.acquire().await?).await?;
            if latest.is_none_or(|cp| cp.size < head || cp.key_id != signer.key_id) {
                log::sign_checkpoint(pool, &signer).await?;
            }
        }
        "unconfirmed_letters" => {
            let n = crate::api::postal::flag_unconfirmed(pool, settings.postal.unconfirmed_after_days).await?;
            if n > 0 {
                tracing::warn!(
                    letters = n,
                    days = settings.postal.unconfirmed_after_days,
                    "letters not confirmed by their operator"
                );
            }
        }
        "log_monitor" => {
            let (checked, alarms) = log::monitor(pool).await?;
            if checked > 0 {
                tracing::info!(checked, alarms, "log monitor: checkpoints re-verified");
            }
        }
        "retention" => {
            let r = retention(pool, settings).await?;
            tracing::info!(
                outbox = r.0,
                callback_deliveries = r.1,
                timers = r.2,
                "retention: old rows removed (evidence is never removed)"
            );
        }
        "outbox_sweep" => {
            let (waiting, oldest): (i64, Option<f64>) = sqlx::query_as(
                "select count(*), extract(epoch from now() - min(created_at))::float8
                 from outbox where published_at is null",
            )
            .fetch_one(pool)
            .await?;
            if oldest.is_some_and(|s| s > 60.0) {
                tracing::warn!(
                    waiting,
                    oldest_seconds = oldest.unwrap_or_default() as i64,
                    "outbox rows wait unpublished: is `dalil relay` running and RabbitMQ reachable?"
                );
            }
            let (unsequenced, oldest) = log::sequencing_lag(pool).await?;
            if oldest > 60.0 {
                tracing::warn!(
                    unsequenced,
                    oldest_seconds = oldest as i64,
                    "evidence records wait for their log index: is a scheduler's sequencer failing?"
                );
            }
        }
        other => anyhow::bail!("unknown job {other}"),
    }
    Ok(())
}

/// Removes outbox rows marked published (by versions before the relay deleted them), finished
/// callback deliveries and fired timers past their retention period. Returns how many of each.
pub async fn retention(pool: &PgPool, settings: &Settings) -> sqlx::Result<(u64, u64, u64)> {
    let r = &settings.retention;
    let outbox = sqlx::query(
        "delete from outbox where published_at is not null and published_at < now() - make_interval(days => $1)",
    )
    .bind(r.outbox_days)
    .execute(pool)
    .await?
    .rows_affected();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "delete from callback_attempt where delivery_id in (select id from callback_delivery
           where status <> 'pending' and finished_at < now() - make_interval(days => $1))",
    )
    .bind(r.callback_days)
    .execute(&mut *tx)
    .await?;
    let deliveries = sqlx::query(
        "delete from callback_delivery where status <> 'pending' and finished_at < now() - make_interval(days => $1)",
    )
    .bind(r.callback_days)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    let timers =
        sqlx::query("delete from timer where fired_at is not null and fired_at < now() - make_interval(days => $1)")
            .bind(r.timer_days)
            .execute(pool)
            .await?
            .rows_affected();
    Ok((outbox, deliveries, timers))
}
