//! The agency's callback endpoints: register, list, remove; the log of calls made; replay.
//! See [`crate::callbacks`] for how calls are made and signed.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::auth::Agency;
use super::{ApiError, ApiResult, AppState, JsonBody};
use crate::callbacks::{self, Endpoint};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEndpoint {
    /// Where to POST events: https (http only where the deployment allows it).
    pub url: String,
    /// Event types to send: accepted, consigned, notified, opened, handed_over, refused,
    /// undeliverable, served, failed, recalled. Empty or absent: all of them.
    #[serde(default)]
    pub events: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedEndpoint {
    #[serde(flatten)]
    pub endpoint: Endpoint,
    /// The HMAC-SHA256 key of `Dalil-Signature`. Shown only now: keep it.
    pub secret: String,
}

#[utoipa::path(post, path = "/v1/callbacks", tag = "callbacks", request_body = NewEndpoint,
    responses((status = 201, body = CreatedEndpoint), (status = 422, body = super::error::Problem)),
    security(("agency_key" = [])))]
pub async fn create(
    State(state): State<AppState>,
    agency: Agency,
    body: JsonBody<NewEndpoint>,
) -> ApiResult<(StatusCode, Json<CreatedEndpoint>)> {
    let url = callbacks::check_url(&body.value.url, state.settings.callbacks.allow_http)
        .map_err(|why| ApiError::invalid("url", why))?;
    let events = callbacks::check_types(&body.value.events).map_err(|why| ApiError::invalid("events", why))?;
    let (endpoint, secret) = callbacks::register(&state.pool, agency.id, &url, &events).await?;
    tracing::info!(agency = agency.code, endpoint = %endpoint.id, url, "callback endpoint registered");
    Ok((StatusCode::CREATED, Json(CreatedEndpoint { endpoint, secret })))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Endpoints {
    pub endpoints: Vec<Endpoint>,
}

#[utoipa::path(get, path = "/v1/callbacks", tag = "callbacks",
    responses((status = 200, body = Endpoints)), security(("agency_key" = [])))]
pub async fn list(State(state): State<AppState>, agency: Agency) -> ApiResult<Json<Endpoints>> {
    Ok(Json(Endpoints { endpoints: callbacks::list(&state.pool, agency.id).await? }))
}

#[utoipa::path(delete, path = "/v1/callbacks/{id}", tag = "callbacks",
    params(("id" = Uuid, Path)),
    responses((status = 204, description = "Removed; pending calls to it are dropped"), (status = 404, body = super::error::Problem)),
    security(("agency_key" = [])))]
pub async fn remove(State(state): State<AppState>, agency: Agency, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    let removed = sqlx::query(
        "update callback_endpoint set disabled_at = now() where id = $1 and agency_id = $2 and disabled_at is null",
    )
    .bind(id)
    .bind(agency.id)
    .execute(&state.pool)
    .await?
    .rows_affected();
    if removed == 0 {
        return Err(ApiError::NotFound);
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeliveryQuery {
    pub endpoint_id: Option<String>,
    /// pending, delivered, failed
    pub status: Option<String>,
    pub item_id: Option<String>,
    /// 1–200, default 50
    pub limit: Option<String>,
    /// `next_cursor` of the previous page
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct AttemptLog {
    #[serde(skip)]
    pub delivery_id: Uuid,
    pub n: i32,
    pub at: DateTime<Utc>,
    /// The HTTP status the endpoint answered, if it answered.
    pub status_code: Option<i32>,
    pub error: Option<String>,
    pub duration_ms: i32,
}

#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct DeliveryLog {
    pub id: Uuid,
    pub endpoint_id: Uuid,
    pub url: String,
    pub event_id: Uuid,
    pub event_type: String,
    pub item_id: Uuid,
    /// pending (being tried), delivered, failed (after the last retry)
    pub status: String,
    /// Queued by a replay.
    pub replay: bool,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    #[sqlx(skip)]
    pub attempts: Vec<AttemptLog>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryPage {
    pub deliveries: Vec<DeliveryLog>,
    pub next_cursor: Option<String>,
}

fn parse_uuid(field: &str, v: &Option<String>) -> ApiResult<Option<Uuid>> {
    v.as_deref().map(|s| Uuid::parse_str(s).map_err(|_| ApiError::invalid(field, "not an id"))).transpose()
}

#[utoipa::path(get, path = "/v1/callbacks/deliveries", tag = "callbacks", params(DeliveryQuery),
    responses((status = 200, body = DeliveryPage), (status = 422, body = super::error::Problem)),
    security(("agency_key" = [])))]
pub async fn deliveries(
    State(state): State<AppState>,
    agency: Agency,
    query: Result<Query<DeliveryQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<DeliveryPage>> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest { field: None, detail: e.body_text() })?;
    let endpoint = parse_uuid("endpoint_id", &q.endpoint_id)?;
    let item = parse_uuid("item_id", &q.item_id)?;
    let cursor = parse_uuid("cursor", &q.cursor)?;
    if let Some(s) = &q.status {
        if !["pending", "delivered", "failed"].contains(&s.as_str()) {
            return Err(ApiError::invalid("status", "one of pending, delivered, failed"));
        }
    }
    let max = state.settings.api.max_page_size;
    let limit = super::page_limit(q.limit.as_deref(), max)?;
    let mut b = sqlx::QueryBuilder::new(
        "select d.id, d.endpoint_id, ep.url, d.event_id, ev.type as event_type, ev.item_id, d.status, d.replay,
                d.created_at, d.finished_at
         from callback_delivery d join callback_endpoint ep on ep.id = d.endpoint_id
         join callback_event ev on ev.id = d.event_id where ep.agency_id = ",
    );
    b.push_bind(agency.id);
    if let Some(e) = endpoint {
        b.push(" and d.endpoint_id = ").push_bind(e);
    }
    if let Some(i) = item {
        b.push(" and ev.item_id = ").push_bind(i);
    }
    if let Some(s) = &q.status {
        b.push(" and d.status = ").push_bind(s);
    }
    if let Some(c) = cursor {
        // Newest first; v4 ids do not sort by time, so page on (created_at, id).
        b.push(" and (d.created_at, d.id) < (select created_at, id from callback_delivery where id = ")
            .push_bind(c)
            .push(")");
    }
    b.push(" order by d.created_at desc, d.id desc limit ").push_bind(limit + 1);
    let mut rows: Vec<DeliveryLog> = b.build_query_as().fetch_all(&state.pool).await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let attempts: Vec<AttemptLog> = sqlx::query_as(
        "select delivery_id, n, at, status_code, error, duration_ms from callback_attempt
         where delivery_id = any($1) order by delivery_id, n",
    )
    .bind(&ids)
    .fetch_all(&state.pool)
    .await?;
    for a in attempts {
        if let Some(r) = rows.iter_mut().find(|r| r.id == a.delivery_id) {
            r.attempts.push(a);
        }
    }
    let next_cursor = if more { rows.last().map(|r| r.id.to_string()) } else { None };
    Ok(Json(DeliveryPage { deliveries: rows, next_cursor }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// Re-send events that happened at or after this time (RFC 3339).
    pub since: DateTime<Utc>,
    /// …and before this time (default: now).
    #[serde(default)]
    pub until: Option<DateTime<Utc>>,
    /// Only to this endpoint (default: every endpoint subscribed to the event).
    #[serde(default)]
    pub endpoint_id: Option<Uuid>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReplayResponse {
    /// Calls queued. Each carries the event's original id, so receivers can drop duplicates.
    pub queued: i64,
}

#[utoipa::path(post, path = "/v1/callbacks/replay", tag = "callbacks", request_body = ReplayRequest,
    responses((status = 202, body = ReplayResponse), (status = 422, body = super::error::Problem)),
    security(("agency_key" = [])))]
pub async fn replay(
    State(state): State<AppState>,
    agency: Agency,
    body: JsonBody<ReplayRequest>,
) -> ApiResult<(StatusCode, Json<ReplayResponse>)> {
    let r = body.value;
    if r.since > Utc::now() {
        return Err(ApiError::invalid("since", "is in the future"));
    }
    if r.until.is_some_and(|u| u <= r.since) {
        return Err(ApiError::invalid("until", "must be after since"));
    }
    if let Some(e) = r.endpoint_id {
        let ours: bool = sqlx::query_scalar(
            "select exists (select 1 from callback_endpoint where id = $1 and agency_id = $2 and disabled_at is null)",
        )
        .bind(e)
        .bind(agency.id)
        .fetch_one(&state.pool)
        .await?;
        if !ours {
            return Err(ApiError::invalid("endpoint_id", "no such endpoint of this agency"));
        }
    }
    let limit = state.settings.callbacks.replay_limit;
    let mut tx = state.pool.begin().await?;
    match callbacks::replay(&mut tx, agency.id, r.since, r.until, r.endpoint_id, limit).await? {
        Ok(queued) => {
            tx.commit().await?;
            tracing::info!(agency = agency.code, queued, since = %r.since, "callbacks replayed");
            Ok((StatusCode::ACCEPTED, Json(ReplayResponse { queued })))
        }
        Err(matching) => Err(ApiError::invalid(
            "since",
            format!("{matching} calls match; at most {limit} per replay: narrow the window with until"),
        )),
    }
}
