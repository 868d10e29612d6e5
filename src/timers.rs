//! Timed work whose due times live in PostgreSQL: escalations (a policy step that waits, e.g.
//! a letter when an item is not opened within 72 hours) and deemed service.
//!
//! Each due timer is claimed with `FOR UPDATE SKIP LOCKED` and fired in its own transaction
//! with its `fired_at`, so any number of schedulers can sweep at once and a timer fires once.
//! A scheduler that was down finds its timers still due and fires them when it returns.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::evidence::{self, Actor, Event, ItemContext, NewEvidence};
use crate::policy::{ServiceRule, Unless};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Escalate,
    Deemed,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Escalate => "escalate",
            Kind::Deemed => "deemed",
        }
    }
}

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fired {
    pub fired: usize,
    /// Of those: steps started, items deemed served.
    pub acted: usize,
}

/// Fires every timer of `kind` due by now, one transaction each. `who` names the scheduler in
/// the timer row.
pub async fn fire_due(pool: &PgPool, kind: Kind, who: &str) -> anyhow::Result<Fired> {
    let mut done = Fired::default();
    loop {
        let mut tx = pool.begin().await?;
        // Skip timers another scheduler holds; the item lock comes after the timer's, and no
        // other path locks timers, so this order cannot deadlock.
        let due: Option<(Uuid, Uuid, Option<Uuid>, DateTime<Utc>)> = sqlx::query_as(
            "select id, item_id, step_id, due_at from timer
             where fired_at is null and kind = $1 and due_at <= now()
             order by due_at limit 1 for update skip locked",
        )
        .bind(kind.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some((timer_id, item_id, step_id, due_at)) = due else { break };
        let fired = async {
            let outcome = match kind {
                Kind::Escalate => escalate(&mut tx, item_id, step_id).await?,
                Kind::Deemed => deem(&mut tx, item_id, due_at).await?,
            };
            sqlx::query("update timer set fired_at = now(), outcome = $2, fired_by = $3 where id = $1")
                .bind(timer_id)
                .bind(&outcome.0)
                .bind(who)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<_, anyhow::Error>(outcome)
        }
        .await;
        let outcome = match fired {
            Ok(o) => o,
            Err(e) => {
                // One timer that fails must not hold up the others: it is tried again in a
                // minute, with the error on its row, and the sweep goes on.
                tracing::error!(%item_id, timer = kind.as_str(), error = format!("{e:#}"), "timer failed; retried in a minute");
                sqlx::query(
                    "update timer set due_at = now() + interval '1 minute', outcome = $2 where id = $1 and fired_at is null",
                )
                .bind(timer_id)
                .bind(format!("failed, retried: {e:#}"))
                .execute(pool)
                .await?;
                continue;
            }
        };
        tracing::info!(%item_id, timer = kind.as_str(), outcome = outcome.0, "timer fired");
        done.fired += 1;
        done.acted += outcome.1 as usize;
    }
    Ok(done)
}

/// The item's state as a timer sees it, under the item's row lock.
#[derive(sqlx::FromRow)]
struct ItemState {
    served_at: Option<DateTime<Utc>>,
    served_rule: Option<String>,
    recalled_at: Option<DateTime<Utc>>,
    deemed_rule: Option<sqlx::types::Json<Value>>,
    opened_at: Option<DateTime<Utc>>,
}

async fn lock_item(tx: &mut Transaction<'_, Postgres>, item_id: Uuid) -> sqlx::Result<ItemState> {
    sqlx::query_as(
        "select i.served_at, i.served_rule, i.recalled_at, i.deemed_rule, e.first_opened_at as opened_at
         from item i left join inbox_entry e on e.item_id = i.id where i.id = $1 for no key update of i",
    )
    .bind(item_id)
    .fetch_one(&mut **tx)
    .await
}

/// Starts a timed step, or skips it when its condition no longer calls for it.
async fn escalate(
    tx: &mut Transaction<'_, Postgres>,
    item_id: Uuid,
    step_id: Option<Uuid>,
) -> anyhow::Result<(String, bool)> {
    let step_id = step_id.ok_or_else(|| anyhow::anyhow!("escalation timer without a step"))?;
    let item = lock_item(tx, item_id).await?;
    let (channel, status, unless): (String, String, Option<String>) =
        sqlx::query_as("select channel, status, unless_condition from step where id = $1 for update")
            .bind(step_id)
            .fetch_one(&mut **tx)
            .await?;
    if status != "scheduled" {
        return Ok((format!("nothing to do: the step is {status}"), false));
    }
    let skip = if item.recalled_at.is_some() {
        Some("the item was recalled".to_string())
    } else if let Some(at) = item.served_at {
        Some(format!("served at {} by rule {}", evidence::format_time(at), item.served_rule.unwrap_or_default()))
    } else {
        match (unless.as_deref().and_then(Unless::parse), item.opened_at) {
            (Some(Unless::Opened), Some(at)) => Some(format!("opened at {}", evidence::format_time(at))),
            _ => None,
        }
    };
    if let Some(why) = skip {
        sqlx::query("update step set status = 'skipped', note = $2, updated_at = now() where id = $1")
            .bind(step_id)
            .bind(&why)
            .execute(&mut **tx)
            .await?;
        return Ok((format!("skipped: {why}"), false));
    }
    let note = match unless {
        Some(u) => format!("started by its timer: not {u} in time"),
        None => "started by its timer".to_string(),
    };
    sqlx::query("update step set status = 'queued', note = $2, updated_at = now() where id = $1")
        .bind(step_id)
        .bind(&note)
        .execute(&mut **tx)
        .await?;
    crate::api::correspondence::start_step(tx, item_id, step_id, &channel, Uuid::new_v4()).await?;
    tracing::info!(%item_id, channel, "escalated");
    Ok((format!("queued {channel}"), true))
}

/// Deems the item served, unless something served it first or it was recalled.
async fn deem(
    tx: &mut Transaction<'_, Postgres>,
    item_id: Uuid,
    due_at: DateTime<Utc>,
) -> anyhow::Result<(String, bool)> {
    let item = lock_item(tx, item_id).await?;
    if item.recalled_at.is_some() {
        return Ok(("nothing to do: the item was recalled".into(), false));
    }
    if let Some(at) = item.served_at {
        let rule = item.served_rule.unwrap_or_default();
        return Ok((format!("nothing to do: served at {} by rule {rule}", evidence::format_time(at)), false));
    }
    let Some(rule) = item.deemed_rule else {
        return Ok(("nothing to do: the item has no deemed-service rule".into(), false));
    };
    // The deposit that started the clock, named in the record.
    let deposit: (Uuid, DateTime<Utc>) = sqlx::query_as(
        "select evidence_id, at from evidence where item_id = $1 and event = 'ContentConsignment' order by seq limit 1",
    )
    .bind(item_id)
    .fetch_one(&mut **tx)
    .await?;
    // Served at the time the rule names, not whenever a scheduler got round to it.
    let served_at = evidence::truncate(due_at);
    let ctx = ItemContext::load(tx, item_id).await?;
    let mut rule = rule.0;
    rule["deposit"] = serde_json::json!({ "evidence_id": deposit.0, "at": evidence::format_time(deposit.1) });
    let appended = evidence::append(
        tx,
        &ctx,
        vec![NewEvidence {
            event: Event::DeemedDelivery,
            at: served_at,
            actor: Actor::Platform("scheduler".into()),
            channel: Some("inbox".into()),
            details: serde_json::json!({
                "served": { "rule": ServiceRule::Deemed.as_str() },
                "rule": rule,
                "recorded_at": evidence::format_time(evidence::now()),
            }),
            digests: None,
        }],
    )
    .await?;
    sqlx::query(
        "update item set served_at = $2, served_rule = 'deemed', served_evidence = $3, status = 'served',
                updated_at = now()
         where id = $1 and served_at is null",
    )
    .bind(item_id)
    .bind(served_at)
    .bind(appended[0].evidence_id)
    .execute(&mut **tx)
    .await?;
    tracing::info!(%item_id, rule = "deemed", "served");
    Ok(("served: deemed".into(), true))
}
