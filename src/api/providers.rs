//! Callbacks from providers: SMS delivery reports. A report is authenticated by the
//! provider's shared secret; each (message, status) is taken once, so duplicates are harmless,
//! and only the first final status counts, so out-of-order reports are harmless too.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use secrecy::ExposeSecret;
use serde::Deserialize;
use sqlx::{Connection, PgPool, Row};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::{ApiError, ApiResult, AppState, JsonBody};
use crate::db::Kept;
use crate::evidence::{self, Actor, Event, ItemContext, NewEvidence};
use crate::group::{self, Group, Pending};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct SmsReport {
    /// The provider's message id, as it answered our send.
    pub id: String,
    /// delivered, undelivered, expired, rejected (or an intermediate state, which is ignored).
    pub status: String,
    #[serde(default)]
    pub client_ref: Option<String>,
    #[serde(default)]
    pub at: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

/// A final delivery report, to be taken.
pub struct Report {
    provider: String,
    report: SmsReport,
    event: Event,
}

impl crate::group::Job for Report {}

/// What became of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    /// It settled its message: the evidence is written.
    Settled,
    /// Another report settled the message first.
    AlreadyReported,
    /// No message of ours has this id (yet, or it is a sign-in code's).
    Unknown,
}

type Outcome = sqlx::Result<Taken>;

/// Where delivery reports are taken: those that arrive together are looked up in one query
/// and settled in one statement.
#[derive(Clone)]
pub struct Reports(Group<Report, Outcome>);

impl Reports {
    pub fn start(pool: PgPool, limits: crate::group::Limits) -> Reports {
        let conns = Kept::new(pool, limits.concurrency);
        Reports(Group::start(limits, move |batch| take_batch(conns.clone(), batch)))
    }

    async fn take(&self, r: Report) -> Outcome {
        self.0.run(r).await.unwrap_or(Err(sqlx::Error::PoolClosed))
    }
}

async fn take_batch(conns: Kept, mut batch: Vec<Pending<Report, Outcome>>) {
    // Rows locked in one order, so two batches with the same messages wait, not deadlock.
    batch.sort_by(|a, b| {
        (&a.job.provider, &a.job.report.id, &a.job.report.status).cmp(&(
            &b.job.provider,
            &b.job.report.id,
            &b.job.report.status,
        ))
    });
    group::together_or_alone(&conns, batch, "SMS reports", |conns, reports| Box::pin(take_all(conns, reports))).await
}

/// A report for a message still awaiting one, ready to be written.
struct Settlement<'a> {
    report: &'a Report,
    attempt_id: Uuid,
    item: ItemContext,
    record: NewEvidence,
}

/// Takes reports: looks their messages up in one query, then settles them in one statement,
/// or a few when two are about one item (each statement settles one report per item, so what
/// it settles is what its evidence says).
async fn take_all(conns: &Kept, reports: &[&Report]) -> sqlx::Result<Vec<Taken>> {
    let mut conn = conns.acquire().await?;
    // Each report is its own probe of the provider's unique index (a lateral subquery per
    // report, kept apart by `offset 0`), so the plan cached for this prepared statement stays
    // right as sms_message grows (unless a table was analyzed while it held about a page: then
    // until its next ANALYZE); a join of the whole array, planned while the table was small,
    // scanned it whole for ever after (docs/performance.md, "Plans cached on a new database").
    let found: Vec<ReportedMessage> = sqlx::query_as(
        "select f.* from unnest($1::text[], $2::text[]) as x(provider, provider_id) cross join lateral (
            select m.provider, m.provider_id, m.attempt_id, m.status, i.id as item_id, a.id as agency_id,
                   a.code as agency_code, i.kind, i.reference,
                   case when r.pinfl is not null then 'pinfl' else 'tin' end as recipient_scheme,
                   coalesce(r.pinfl, r.tin) as recipient_value, i.policy_id, i.policy_version
            from sms_message m join item i on i.id = m.item_id join agency a on a.id = i.agency_id
            join recipient r on r.id = i.recipient_id
            where m.provider = x.provider and m.provider_id = x.provider_id offset 0) f",
    )
    .bind(reports.iter().map(|r| r.provider.as_str()).collect::<Vec<_>>())
    .bind(reports.iter().map(|r| r.report.id.as_str()).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    let mut taken = vec![Taken::Unknown; reports.len()];
    let mut waiting: Vec<(usize, Settlement)> = Vec::new();
    for (n, r) in reports.iter().enumerate() {
        let Some(m) = found.iter().find(|m| m.provider == r.provider && m.provider_id == r.report.id) else {
            continue;
        };
        if m.status != "accepted" {
            taken[n] = Taken::AlreadyReported;
            continue;
        }
        let record = NewEvidence {
            event: r.event,
            at: evidence::now(),
            actor: Actor::Platform(format!("provider:{}", r.provider)),
            channel: Some("sms".into()),
            details: serde_json::json!({
                "attempt_id": m.attempt_id,
                "provider_message_id": r.report.id,
                "provider_status": r.report.status,
                "provider_time": r.report.at,
                "error": r.report.error,
            }),
            digests: None,
        };
        waiting.push((n, Settlement { report: r, attempt_id: m.attempt_id, item: m.item.clone(), record }));
    }
    // The k-th report about an item goes in the k-th round, one statement each.
    let mut rounds: Vec<Vec<(usize, Settlement)>> = Vec::new();
    for w in waiting {
        match rounds.iter_mut().find(|round| round.iter().all(|(_, s)| s.item.item_id != w.1.item.item_id)) {
            Some(round) => round.push(w),
            None => rounds.push(vec![w]),
        }
    }
    match &rounds[..] {
        [] => {}
        // One statement is atomic by itself: no BEGIN and COMMIT around it (most batches).
        [round] => settle_round(&mut conn, round, &mut taken).await?,
        // All rounds in one transaction: if one fails, none is kept, and each report is then
        // taken again alone with the right answer.
        _ => {
            let mut tx = conn.begin().await?;
            for round in &rounds {
                settle_round(&mut tx, round, &mut taken).await?;
            }
            tx.commit().await?;
        }
    }
    conn.keep();
    Ok(taken)
}

async fn settle_round(
    conn: &mut sqlx::PgConnection,
    round: &[(usize, Settlement<'_>)],
    taken: &mut [Taken],
) -> sqlx::Result<()> {
    let settled = settle(conn, round).await?;
    for (n, s) in round {
        taken[*n] = if settled.contains(&s.attempt_id) { Taken::Settled } else { Taken::AlreadyReported };
    }
    Ok(())
}

/// Writes reports in one statement; returns the attempts whose messages they settled.
async fn settle(conn: &mut sqlx::PgConnection, round: &[(usize, Settlement<'_>)]) -> sqlx::Result<Vec<Uuid>> {
    let batch: Vec<(&ItemContext, Vec<NewEvidence>)> =
        round.iter().map(|(_, s)| (&s.item, vec![s.record.clone()])).collect();
    let records = evidence::prepare(&batch);
    let q = sqlx::query(&REPORT_SQL)
        .bind(round.iter().map(|(_, s)| s.report.provider.as_str()).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, s)| s.report.report.id.as_str()).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, s)| s.report.report.status.as_str()).collect::<Vec<_>>())
        .bind(round.iter().map(|(_, s)| s.attempt_id).collect::<Vec<_>>())
        .bind(
            round
                .iter()
                .map(|(_, s)| if s.report.event == Event::NotificationDelivered { "delivered" } else { "failed" })
                .collect::<Vec<_>>(),
        );
    records.bind(q).fetch_all(&mut *conn).await?.iter().map(|row| row.try_get(0)).collect()
}

/// One statement: each report is kept once; the first one for a message still awaiting it
/// settles the message and writes the evidence. A repeated or late report changes nothing
/// else, however many arrive at once (the unique report and the status condition decide).
///
/// Prepared once, not planned per batch (which took 0.7 ms a batch, more than the rest of the
/// statement for the batches of one to a few reports that moderate load makes): each message
/// is reached by a probe of its primary key, a lateral subquery per report kept apart by
/// `offset 0`, and updated by its row's address, so the cached plan cannot become a scan of
/// the table, whatever its size when it was planned ("Plans cached on a new database",
/// docs/performance.md). A concurrent report that settled the message first moved it to a new
/// address, so this one finds nothing to update, as its status condition would have decided.
static REPORT_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "with report as (
            insert into sms_report (provider, provider_id, status)
            select * from unnest($1::text[], $2::text[], $3::text[])
            on conflict do nothing returning provider, provider_id, status
         ), settled as (
            update sms_message m set status = x.final, reported_at = now()
            from unnest($1::text[], $2::text[], $3::text[], $4::uuid[], $5::text[])
                 as x(provider, provider_id, status, attempt_id, final)
                 cross join lateral (select s.ctid as at from sms_message s
                                     where s.attempt_id = x.attempt_id offset 0) found
            where m.ctid = found.at and m.status = 'accepted'
              and (x.provider, x.provider_id, x.status) in (select provider, provider_id, status from report)
            returning m.attempt_id, m.item_id
         ), {}
         select attempt_id from settled",
        evidence::ctes(5, "x.item_id in (select s.item_id from settled s)")
    )
});

#[derive(sqlx::FromRow)]
struct ReportedMessage {
    provider: String,
    provider_id: String,
    attempt_id: Uuid,
    status: String,
    #[sqlx(flatten)]
    item: ItemContext,
}

#[utoipa::path(post, path = "/v1/providers/sms/{provider}/reports", tag = "providers", request_body = SmsReport,
    params(("provider" = String, Path)),
    responses((status = 200, description = "Taken (or already taken)"),
              (status = 401, body = super::error::Problem),
              (status = 404, description = "Unknown message: retry later", body = super::error::Problem)))]
pub async fn sms_report(
    State(state): State<AppState>,
    Path(provider): Path<String>,
    headers: HeaderMap,
    body: JsonBody<SmsReport>,
) -> ApiResult<Json<serde_json::Value>> {
    let settings = &state.settings.sms;
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let expected = settings.report_secret.expose_secret();
    if provider != settings.provider || !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        return Err(ApiError::Unauthorized("unknown provider or wrong report secret".into()));
    }
    let report = body.value;
    let event = match report.status.as_str() {
        "delivered" | "DELIVRD" => Event::NotificationDelivered,
        "undelivered" | "expired" | "rejected" | "UNDELIV" | "EXPIRED" | "REJECTD" => {
            Event::ConsignmentNotificationFailure
        }
        _ => return Ok(Json(serde_json::json!({ "taken": false, "reason": "not a final status" }))),
    };
    let id = report.id.clone();
    match state.reports.take(Report { provider, report, event }).await? {
        Taken::Settled => Ok(Json(serde_json::json!({ "taken": true }))),
        Taken::AlreadyReported => Ok(Json(serde_json::json!({ "taken": false, "reason": "already reported" }))),
        Taken::Unknown => {
            // A sign-in code of the web inbox: taken, nothing to record.
            let otp: bool = sqlx::query_scalar("select exists (select 1 from otp_challenge where provider_ref = $1)")
                .bind(&id)
                .fetch_one(&state.pool)
                .await?;
            if otp {
                return Ok(Json(serde_json::json!({ "taken": true, "reason": "a sign-in code" })));
            }
            // A report can outrun our own commit of the send: the provider retries a 404.
            Err(ApiError::NotFound)
        }
    }
}
