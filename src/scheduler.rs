//! Recurring jobs on `cron` schedules from configuration: signing checkpoints and monitoring
//! the evidence log. Every job is safe to run from several schedulers at once (each takes the
//! log's advisory lock), so running more than one is harmless.

use std::str::FromStr;
use std::time::Duration;

use chrono::Utc;
use cron::Schedule;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::log;

#[derive(Debug, Clone, Copy)]
enum Job {
    Checkpoint,
    LogMonitor,
    UnconfirmedLetters,
}

pub async fn run(pool: PgPool, settings: Settings, cancel: CancellationToken) -> anyhow::Result<()> {
    let jobs = [
        (Job::Checkpoint, &settings.scheduler.checkpoint),
        (Job::LogMonitor, &settings.scheduler.log_monitor),
        (Job::UnconfirmedLetters, &settings.scheduler.unconfirmed_letters),
    ];
    let mut tasks = tokio::task::JoinSet::new();
    for (job, expr) in jobs {
        let schedule = Schedule::from_str(expr).map_err(|e| anyhow::anyhow!("scheduler: {job:?}: {e}"))?;
        let (pool, settings, cancel) = (pool.clone(), settings.clone(), cancel.clone());
        tasks.spawn(async move {
            tracing::info!(?job, schedule = %schedule, "scheduler: job registered");
            for next in schedule.upcoming(Utc) {
                let wait = (next - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                if let Err(e) = run_job(job, &pool, &settings).await {
                    tracing::error!(?job, error = format!("{e:#}"), "scheduler: job failed");
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn run_job(job: Job, pool: &PgPool, settings: &Settings) -> anyhow::Result<()> {
    match job {
        Job::Checkpoint => {
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
        Job::UnconfirmedLetters => {
            let n = crate::api::postal::flag_unconfirmed(pool, settings.postal.unconfirmed_after_days).await?;
            if n > 0 {
                tracing::warn!(
                    letters = n,
                    days = settings.postal.unconfirmed_after_days,
                    "letters not confirmed by their operator"
                );
            }
        }
        Job::LogMonitor => {
            let (checked, alarms) = log::monitor(pool).await?;
            if checked > 0 {
                tracing::info!(checked, alarms, "log monitor: checkpoints re-verified");
            }
        }
    }
    Ok(())
}
