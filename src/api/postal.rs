//! The postal operator's API: claim letters to print, fetch their PDFs, report what happened.
//! An operator sees only the letters of its own regions that it claimed; another operator's
//! letter is a 404. Every event carries the operator's own event id, so a repeated upload
//! changes nothing, and impossible sequences are refused with the reason.

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::Operator;
use super::{ApiError, ApiResult, AppState, JsonBody};
use crate::evidence::{self, Actor, Event, ItemContext, NewEvidence};
use crate::policy::ServiceRule;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    /// The operator's own key for this batch: claiming again with it returns the same batch.
    pub batch_key: String,
    /// Letters to claim at most (1–1000).
    pub limit: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ManifestLetter {
    pub item_id: Uuid,
    pub address_lines: Vec<String>,
    pub pdf_url: String,
    pub pdf_sha256: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Manifest {
    pub batch_id: Uuid,
    pub batch_key: String,
    pub letters: Vec<ManifestLetter>,
}

async fn manifest(conn: &mut PgConnection, batch_id: Uuid, batch_key: String) -> sqlx::Result<Manifest> {
    let rows: Vec<(Uuid, Vec<String>, String)> = sqlx::query_as(
        "select item_id, address_lines, pdf_sha256 from letter where batch_id = $1 order by claimed_at, item_id",
    )
    .bind(batch_id)
    .fetch_all(conn)
    .await?;
    Ok(Manifest {
        batch_id,
        batch_key,
        letters: rows
            .into_iter()
            .map(|(item_id, address_lines, pdf_sha256)| ManifestLetter {
                item_id,
                address_lines,
                pdf_url: format!("/v1/postal/letters/{item_id}.pdf"),
                pdf_sha256,
            })
            .collect(),
    })
}

#[utoipa::path(post, path = "/v1/postal/batches", tag = "postal", request_body = ClaimRequest,
    responses((status = 200, body = Manifest), (status = 422, body = super::error::Problem)),
    security(("operator_key" = [])))]
pub async fn claim(
    State(state): State<AppState>,
    op: Operator,
    body: JsonBody<ClaimRequest>,
) -> ApiResult<Json<Manifest>> {
    let req = body.value;
    let key = req.batch_key.trim().to_string();
    if key.is_empty() || key.len() > 200 {
        return Err(ApiError::invalid("batch_key", "1 to 200 characters"));
    }
    if !(1..=1000).contains(&req.limit) {
        return Err(ApiError::invalid("limit", "from 1 to 1000"));
    }
    let mut tx = state.pool.begin().await?;
    let batch_id = Uuid::now_v7();
    let created =
        sqlx::query("insert into postal_batch (id, operator_id, batch_key) values ($1, $2, $3) on conflict do nothing")
            .bind(batch_id)
            .bind(op.id)
            .bind(&key)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
    if !created {
        // The same batch key again: the same batch, nothing more claimed.
        drop(tx);
        let existing: Uuid =
            sqlx::query_scalar("select id from postal_batch where operator_id = $1 and batch_key = $2")
                .bind(op.id)
                .bind(&key)
                .fetch_one(&state.pool)
                .await?;
        return Ok(Json(manifest(&mut *state.pool.acquire().await?, existing, key).await?));
    }
    // Two operators, or two claims of one, never get the same letter. The standard lane's
    // letters first, then the bulk lane's, each oldest first (the order of `letter_ready`).
    let claimed: Vec<(Uuid, String)> = sqlx::query_as(
        "update letter set status = 'claimed', batch_id = $2, claimed_at = now(), updated_at = now()
         where item_id in (select l.item_id from letter l join item i on i.id = l.item_id
                           where l.operator_id = $1 and l.status = 'ready'
                           order by l.lane = 'bulk', l.created_at limit $3
                           for no key update of i, l skip locked)
         returning item_id, pdf_sha256",
    )
    .bind(op.id)
    .bind(batch_id)
    .bind(req.limit)
    .fetch_all(&mut *tx)
    .await?;
    for (item_id, sha256) in &claimed {
        // The item rows are locked with their letters above (a recall locks item, then letter).
        let ctx = ItemContext::load(&mut tx, *item_id).await?;
        evidence::append(
            &mut tx,
            &ctx,
            vec![NewEvidence {
                event: Event::RelayToNonERDS,
                at: evidence::now(),
                actor: Actor::Platform(format!("operator:{}", op.code)),
                channel: Some("postal".into()),
                details: serde_json::json!({ "operator": op.code, "batch_id": batch_id, "batch_key": key }),
                digests: Some(serde_json::json!({ "letter_pdf": { "sha256": sha256 } })),
            }],
        )
        .await?;
    }
    let m = manifest(&mut tx, batch_id, key).await?;
    tx.commit().await?;
    Ok(Json(m))
}

#[utoipa::path(get, path = "/v1/postal/letters/{file}", tag = "postal",
    params(("file" = String, Path, description = "`{item id}.pdf`")),
    responses((status = 200, description = "The letter, application/pdf"), (status = 404, body = super::error::Problem)),
    security(("operator_key" = [])))]
pub async fn pdf(State(state): State<AppState>, op: Operator, Path(file): Path<String>) -> ApiResult<Response> {
    let id = file.strip_suffix(".pdf").and_then(|s| Uuid::parse_str(s).ok()).ok_or(ApiError::NotFound)?;
    let pdf: Option<Vec<u8>> =
        sqlx::query_scalar("select pdf from letter where item_id = $1 and operator_id = $2 and status <> 'ready'")
            .bind(id)
            .bind(op.id)
            .fetch_optional(&state.pool)
            .await?;
    let pdf = pdf.ok_or(ApiError::NotFound)?;
    let mut response = pdf.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/pdf"));
    Ok(response)
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReceivedBy {
    pub name: String,
    /// addressee, family member, representative, …
    pub relation: String,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PostalEvent {
    /// The operator's id for this event: the same id again changes nothing.
    pub event_id: String,
    /// printed, out_for_delivery, held_at_office, delivered, refused, undeliverable
    pub event: String,
    pub at: DateTime<Utc>,
    #[serde(default)]
    pub received_by: Option<ReceivedBy>,
    #[serde(default)]
    pub courier_id: Option<String>,
    /// SHA-256 (hex) of the signature image, when the addressee signed.
    #[serde(default)]
    pub signature_sha256: Option<String>,
    /// Why it could not be delivered (undeliverable).
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkEvents {
    pub events: Vec<PostalEventFor>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct PostalEventFor {
    pub item_id: String,
    #[serde(flatten)]
    pub event: PostalEvent,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventResult {
    pub item_id: String,
    pub event_id: String,
    /// applied, duplicate, or refused
    pub result: String,
    pub status: u16,
    pub detail: Option<String>,
}

const EVENTS: [&str; 6] = ["printed", "out_for_delivery", "held_at_office", "delivered", "refused", "undeliverable"];
const FINAL: [&str; 3] = ["delivered", "refused", "undeliverable"];

/// Applies one event in its own transaction; an error says why it was refused, and nothing
/// changed.
async fn apply(state: &AppState, op: &Operator, item_id: &str, ev: &PostalEvent) -> ApiResult<&'static str> {
    let item_id = Uuid::parse_str(item_id).map_err(|_| ApiError::NotFound)?;
    if ev.event_id.trim().is_empty() || ev.event_id.len() > 200 {
        return Err(ApiError::invalid("event_id", "1 to 200 characters"));
    }
    if !EVENTS.contains(&ev.event.as_str()) {
        return Err(ApiError::invalid("event", format!("one of {}", EVENTS.join(", "))));
    }
    if ev.at > Utc::now() + chrono::Duration::minutes(5) {
        return Err(ApiError::invalid("at", "is in the future"));
    }
    let received = ev.received_by.as_ref().filter(|r| !r.name.trim().is_empty() && !r.relation.trim().is_empty());
    if ev.event == "delivered" && received.is_none() {
        return Err(ApiError::invalid("received_by", "who took the letter: name and relation to the addressee"));
    }
    if ev.event == "undeliverable" && ev.reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
        return Err(ApiError::invalid("reason", "why the letter could not be delivered"));
    }
    if let Some(sig) = &ev.signature_sha256 {
        if sig.len() != 64 || !sig.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ApiError::invalid("signature_sha256", "a SHA-256 in hex"));
        }
    }
    let mut tx = state.pool.begin().await?;
    // Lock order: item row, then the letter.
    sqlx::query("select 1 from item where id = $1 for no key update").bind(item_id).execute(&mut *tx).await?;
    let letter: Option<(String, Uuid, String)> =
        sqlx::query_as("select status, operator_id, pdf_sha256 from letter where item_id = $1 for update")
            .bind(item_id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((status, owner, pdf_sha256)) = letter else { return Err(ApiError::NotFound) };
    if owner != op.id {
        return Err(ApiError::NotFound);
    }
    let seen: Option<(String,)> =
        sqlx::query_as("select event from postal_event where operator_id = $1 and event_id = $2")
            .bind(op.id)
            .bind(&ev.event_id)
            .fetch_optional(&mut *tx)
            .await?;
    if let Some((event,)) = seen {
        return if event == ev.event {
            Ok("duplicate")
        } else {
            Err(ApiError::Conflict {
                field: Some("event_id".into()),
                detail: format!("event id {} was used for a {event} event", ev.event_id),
            })
        };
    }
    if status == "ready" {
        return Err(ApiError::Conflict { field: Some("event".into()), detail: "this letter was never claimed".into() });
    }
    if FINAL.contains(&status.as_str()) {
        return Err(ApiError::Conflict {
            field: Some("event".into()),
            detail: format!("impossible sequence: {} after {status}", ev.event),
        });
    }
    let detail = serde_json::json!({
        "received_by": ev.received_by.as_ref().map(|r| serde_json::json!({ "name": r.name, "relation": r.relation })),
        "courier_id": ev.courier_id,
        "signature_sha256": ev.signature_sha256,
        "reason": ev.reason,
    });
    sqlx::query(
        "insert into postal_event (operator_id, event_id, item_id, event, at, detail) values ($1, $2, $3, $4, $5, $6)",
    )
    .bind(op.id)
    .bind(&ev.event_id)
    .bind(item_id)
    .bind(&ev.event)
    .bind(ev.at)
    .bind(&detail)
    .execute(&mut *tx)
    .await?;
    sqlx::query("update letter set status = $2, updated_at = now() where item_id = $1")
        .bind(item_id)
        .bind(&ev.event)
        .execute(&mut *tx)
        .await?;
    let (event, rule) = match ev.event.as_str() {
        "delivered" => (Event::ContentHandover, Some(ServiceRule::PostalHandover)),
        "refused" => (Event::ConsignmentRejection, Some(ServiceRule::Refused)),
        "undeliverable" => (Event::Undeliverable, None),
        _ => {
            tx.commit().await?;
            return Ok("applied");
        }
    };
    let ctx = ItemContext::load(&mut tx, item_id).await?;
    let serves = rule.filter(|r| state.policies.by_id(&ctx.policy_id).is_some_and(|p| p.served_on.contains(r)));
    // A recalled item is never served afterwards; the event is still recorded.
    let served_already: bool =
        sqlx::query_scalar("select served_at is not null or recalled_at is not null from item where id = $1")
            .bind(item_id)
            .fetch_one(&mut *tx)
            .await?;
    let serve_now = serves.filter(|_| !served_already);
    let mut details = detail.clone();
    details["operator"] = op.code.clone().into();
    details["event_id"] = ev.event_id.clone().into();
    details["reported_at"] = evidence::format_time(evidence::truncate(ev.at)).into();
    if let Some(r) = serve_now {
        details["served"] = serde_json::json!({ "rule": r.as_str() });
    }
    let appended = evidence::append(
        &mut tx,
        &ctx,
        vec![NewEvidence {
            event,
            at: evidence::now(),
            actor: Actor::Platform(format!("operator:{}", op.code)),
            channel: Some("postal".into()),
            details,
            digests: Some(serde_json::json!({ "letter_pdf": { "sha256": pdf_sha256 } })),
        }],
    )
    .await?;
    let new_status = match (serve_now, ev.event.as_str()) {
        (Some(_), _) => "served",
        (None, "undeliverable") => "undeliverable",
        (None, "refused") => "refused",
        _ => "delivered",
    };
    sqlx::query(
        "update item set status = case when served_at is null and recalled_at is null then $2 else status end, updated_at = now(),
                served_at = coalesce(served_at, $3), served_rule = coalesce(served_rule, $4),
                served_evidence = coalesce(served_evidence, $5)
         where id = $1",
    )
    .bind(item_id)
    .bind(new_status)
    .bind(serve_now.map(|_| ev.at))
    .bind(serve_now.map(|r| r.as_str()))
    .bind(serve_now.map(|_| appended[0].evidence_id))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    if let Some(r) = serve_now {
        tracing::info!(%item_id, rule = r.as_str(), operator = op.code, "served");
    }
    Ok("applied")
}

#[utoipa::path(post, path = "/v1/postal/letters/{id}/events", tag = "postal", request_body = PostalEvent,
    params(("id" = Uuid, Path)),
    responses((status = 200, body = EventResult), (status = 404, body = super::error::Problem),
              (status = 409, description = "Impossible sequence", body = super::error::Problem)),
    security(("operator_key" = [])))]
pub async fn event(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    body: JsonBody<PostalEvent>,
) -> ApiResult<Json<EventResult>> {
    let result = apply(&state, &op, &id, &body.value).await?;
    Ok(Json(EventResult {
        item_id: id,
        event_id: body.value.event_id,
        result: result.into(),
        status: 200,
        detail: None,
    }))
}

#[utoipa::path(post, path = "/v1/postal/events", tag = "postal", request_body = BulkEvents,
    responses((status = 200, description = "One result per row, in order", body = Vec<EventResult>),
              (status = 413, body = super::error::Problem)),
    security(("operator_key" = [])))]
pub async fn bulk(State(state): State<AppState>, op: Operator, body: JsonBody<BulkEvents>) -> ApiResult<Response> {
    if body.value.events.len() > 1000 {
        return Err(ApiError::TooLarge("at most 1000 events per upload".into()));
    }
    let mut results = Vec::with_capacity(body.value.events.len());
    for row in &body.value.events {
        // One bad row does not reject the others: each is its own transaction.
        let r = match apply(&state, &op, &row.item_id, &row.event).await {
            Ok(result) => EventResult {
                item_id: row.item_id.clone(),
                event_id: row.event.event_id.clone(),
                result: result.into(),
                status: 200,
                detail: None,
            },
            Err(e) => {
                if let ApiError::Internal(cause) = &e {
                    tracing::error!(error = format!("{cause:#}"), "postal event failed");
                }
                let status = e.status();
                EventResult {
                    item_id: row.item_id.clone(),
                    event_id: row.event.event_id.clone(),
                    result: "refused".into(),
                    status: status.as_u16(),
                    detail: Some(e.detail()),
                }
            }
        };
        results.push(r);
    }
    Ok((StatusCode::OK, Json(results)).into_response())
}

/// Flags letters claimed but not confirmed within `days`; returns how many were flagged now.
pub async fn flag_unconfirmed(pool: &sqlx::PgPool, days: i32) -> sqlx::Result<u64> {
    Ok(sqlx::query(
        "update letter set unconfirmed_flagged_at = now()
         where status in ('claimed', 'printed', 'out_for_delivery', 'held_at_office')
           and unconfirmed_flagged_at is null and claimed_at < now() - make_interval(days => $1)",
    )
    .bind(days)
    .execute(pool)
    .await?
    .rows_affected())
}
