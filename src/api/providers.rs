//! Callbacks from providers: SMS delivery reports. A report is authenticated by the
//! provider's shared secret; each (message, status) is taken once, so duplicates are harmless,
//! and only the first final status counts, so out-of-order reports are harmless too.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use secrecy::ExposeSecret;
use serde::Deserialize;
use sqlx::{PgPool, Row};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::{ApiError, ApiResult, AppState, JsonBody};
use crate::evidence::{self, Actor, Event, ItemContext, NewEvidence};
use crate::group::{Group, Pending};

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

/// A final report for a message still awaiting one, ready to be written.
pub struct Settlement {
    provider: String,
    provider_id: String,
    provider_status: String,
    attempt_id: Uuid,
    final_status: &'static str,
    item: ItemContext,
    record: NewEvidence,
}

impl crate::group::Job for Settlement {
    /// One report per item in a statement, so that what settles is what the evidence says.
    fn conflicts(&self, other: &Self) -> bool {
        self.item.item_id == other.item.item_id
    }
}

/// Whether the report settled its message (`false`: another report did first).
type Settled = sqlx::Result<bool>;

/// Where delivery reports are written: those that arrive together, in one statement.
#[derive(Clone)]
pub struct Reports(Group<Settlement, Settled>);

impl Reports {
    pub fn start(pool: PgPool, limits: crate::group::Limits) -> Reports {
        Reports(Group::start(limits, move |batch| settle_batch(pool.clone(), batch)))
    }

    async fn settle(&self, s: Settlement) -> Settled {
        self.0.run(s).await.unwrap_or(Err(sqlx::Error::PoolClosed))
    }
}

async fn settle_batch(pool: PgPool, mut batch: Vec<Pending<Settlement, Settled>>) {
    let all: Vec<&Settlement> = batch.iter().map(|p| &p.job).collect();
    match settle(&pool, &all).await {
        Ok(settled) => {
            for p in batch {
                let s = settled.contains(&p.job.attempt_id);
                p.answer(Ok(s));
            }
        }
        Err(e) if batch.len() == 1 => batch.pop().expect("one report").answer(Err(e)),
        Err(e) => {
            tracing::warn!(reports = batch.len(), error = %e, "a batch of SMS reports failed; writing each alone");
            for p in batch {
                let settled = settle(&pool, &[&p.job]).await.map(|s| s.contains(&p.job.attempt_id));
                p.answer(settled);
            }
        }
    }
}

/// Writes reports in one statement; returns the attempts whose messages they settled.
async fn settle(pool: &PgPool, reports: &[&Settlement]) -> sqlx::Result<Vec<Uuid>> {
    let batch: Vec<(&ItemContext, Vec<NewEvidence>)> =
        reports.iter().map(|r| (&r.item, vec![r.record.clone()])).collect();
    let records = evidence::prepare(&batch);
    let q = sqlx::query(&REPORT_SQL)
        .bind(reports.iter().map(|r| r.provider.as_str()).collect::<Vec<_>>())
        .bind(reports.iter().map(|r| r.provider_id.as_str()).collect::<Vec<_>>())
        .bind(reports.iter().map(|r| r.provider_status.as_str()).collect::<Vec<_>>())
        .bind(reports.iter().map(|r| r.attempt_id).collect::<Vec<_>>())
        .bind(reports.iter().map(|r| r.final_status).collect::<Vec<_>>());
    records.bind(q).fetch_all(pool).await?.iter().map(|row| row.try_get(0)).collect()
}

/// One statement: each report is kept once; the first one for a message still awaiting it
/// settles the message and writes the evidence. A repeated or late report changes nothing
/// else, however many arrive at once (the unique report and the status condition decide).
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
            where m.attempt_id = x.attempt_id and m.status = 'accepted'
              and (x.provider, x.provider_id, x.status) in (select provider, provider_id, status from report)
            returning m.attempt_id, m.item_id
         ), {}
         select attempt_id from settled",
        evidence::ctes(5, "item_id in (select item_id from settled)")
    )
});

#[derive(sqlx::FromRow)]
struct ReportedMessage {
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
    // The message, with what its evidence names.
    let message: Option<ReportedMessage> = sqlx::query_as(
        "select m.attempt_id, m.status, i.id as item_id, a.id as agency_id, a.code as agency_code, i.kind,
                i.reference, case when r.pinfl is not null then 'pinfl' else 'tin' end as recipient_scheme,
                coalesce(r.pinfl, r.tin) as recipient_value, i.policy_id, i.policy_version
         from sms_message m join item i on i.id = m.item_id join agency a on a.id = i.agency_id
         join recipient r on r.id = i.recipient_id
         where m.provider = $1 and m.provider_id = $2",
    )
    .bind(&provider)
    .bind(&report.id)
    .fetch_optional(&state.pool)
    .await?;
    // A report can outrun our own commit of the send: the provider retries a 404.
    let Some(ReportedMessage { attempt_id, status, item: ctx }) = message else {
        // A sign-in code of the web inbox: taken, nothing to record.
        let otp: bool = sqlx::query_scalar("select exists (select 1 from otp_challenge where provider_ref = $1)")
            .bind(&report.id)
            .fetch_one(&state.pool)
            .await?;
        if otp {
            return Ok(Json(serde_json::json!({ "taken": true, "reason": "a sign-in code" })));
        }
        return Err(ApiError::NotFound);
    };
    if status != "accepted" {
        return Ok(Json(serde_json::json!({ "taken": false, "reason": "already reported" })));
    }
    let final_status = if event == Event::NotificationDelivered { "delivered" } else { "failed" };
    let record = NewEvidence {
        event,
        at: evidence::now(),
        actor: Actor::Platform(format!("provider:{provider}")),
        channel: Some("sms".into()),
        details: serde_json::json!({
            "attempt_id": attempt_id,
            "provider_message_id": report.id,
            "provider_status": report.status,
            "provider_time": report.at,
            "error": report.error,
        }),
        digests: None,
    };
    let settled = state
        .reports
        .settle(Settlement {
            provider,
            provider_id: report.id,
            provider_status: report.status,
            attempt_id,
            final_status,
            item: ctx,
            record,
        })
        .await?;
    if !settled {
        return Ok(Json(serde_json::json!({ "taken": false, "reason": "already reported" })));
    }
    Ok(Json(serde_json::json!({ "taken": true })))
}
