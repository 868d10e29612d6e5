//! The public face of the evidence log: checkpoints, proofs, keys; proof bundles for the
//! sender and the recipient of an item; and a verifier anyone may call.

use axum::extract::{Path, Query, State};
use axum::Json;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::auth::{Agency, Citizen};
use super::{ApiError, ApiResult, AppState, JsonBody};
use crate::log::{self, PublishedKey, Signer, StoredCheckpoint};
use crate::proof::{self, Bundle, Verdict};

async fn signer(state: &AppState) -> ApiResult<Signer> {
    // Read on each use, so a rotation takes effect in every process at once.
    log::signer(&state.pool, &state.settings.log).await?.ok_or_else(|| {
        ApiError::Unavailable("no checkpoint signing key is configured: `dalil admin signing-key generate`".into())
    })
}

#[utoipa::path(get, path = "/v1/log/checkpoint", tag = "log",
    responses((status = 200, description = "The newest signed checkpoint", body = StoredCheckpoint)))]
pub async fn latest(State(state): State<AppState>) -> ApiResult<Json<StoredCheckpoint>> {
    let mut conn = state.pool.acquire().await?;
    match log::latest_checkpoint(&mut conn).await? {
        Some(cp) => Ok(Json(cp)),
        None => Ok(Json(log::sign_checkpoint(&state.pool, &signer(&state).await?).await?)),
    }
}

#[utoipa::path(get, path = "/v1/log/checkpoints/{size}", tag = "log",
    params(("size" = i64, Path)),
    responses((status = 200, body = StoredCheckpoint), (status = 404, body = super::error::Problem)))]
pub async fn at_size(State(state): State<AppState>, Path(size): Path<String>) -> ApiResult<Json<StoredCheckpoint>> {
    let size: i64 = size.parse().map_err(|_| ApiError::NotFound)?;
    let mut conn = state.pool.acquire().await?;
    log::checkpoint_at(&mut conn, size).await?.map(Json).ok_or(ApiError::NotFound)
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct InclusionQuery {
    pub index: Option<String>,
    pub size: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InclusionProof {
    pub index: u64,
    pub size: u64,
    /// SHA-256(0x00 ‖ record), base64.
    pub leaf_hash: String,
    /// Audit path, base64 hashes (RFC 9162 §2.1.3).
    pub proof: Vec<String>,
}

fn number(field: &str, v: &Option<String>) -> ApiResult<u64> {
    v.as_deref()
        .ok_or_else(|| ApiError::invalid(field, "required"))?
        .parse()
        .map_err(|_| ApiError::invalid(field, "a whole number"))
}

async fn check_size(state: &AppState, field: &str, size: u64) -> ApiResult<()> {
    let integrated = log::integrated_size(&mut *state.pool.acquire().await?).await?;
    if size > integrated {
        return Err(ApiError::invalid(
            field,
            format!("the log is integrated up to size {integrated}; use a checkpoint's size"),
        ));
    }
    Ok(())
}

#[utoipa::path(get, path = "/v1/log/proof/inclusion", tag = "log", params(InclusionQuery),
    responses((status = 200, body = InclusionProof), (status = 422, body = super::error::Problem)))]
pub async fn inclusion(
    State(state): State<AppState>,
    Query(q): Query<InclusionQuery>,
) -> ApiResult<Json<InclusionProof>> {
    let (index, size) = (number("index", &q.index)?, number("size", &q.size)?);
    if index >= size {
        return Err(ApiError::invalid("index", "must be smaller than size"));
    }
    check_size(&state, "size", size).await?;
    let mut conn = state.pool.acquire().await?;
    let proof = log::inclusion_proof(&mut conn, index, size).await?;
    let leaf = log::leaf_hash(&mut conn, index).await?;
    Ok(Json(InclusionProof {
        index,
        size,
        leaf_hash: B64.encode(leaf),
        proof: proof.iter().map(|h| B64.encode(h)).collect(),
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ConsistencyQuery {
    pub from: Option<String>,
    pub to: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConsistencyProof {
    pub from: u64,
    pub to: u64,
    /// RFC 9162 §2.1.4, base64 hashes.
    pub proof: Vec<String>,
}

#[utoipa::path(get, path = "/v1/log/proof/consistency", tag = "log", params(ConsistencyQuery),
    responses((status = 200, body = ConsistencyProof), (status = 422, body = super::error::Problem)))]
pub async fn consistency(
    State(state): State<AppState>,
    Query(q): Query<ConsistencyQuery>,
) -> ApiResult<Json<ConsistencyProof>> {
    let (from, to) = (number("from", &q.from)?, number("to", &q.to)?);
    if from > to {
        return Err(ApiError::invalid("from", "must not exceed to"));
    }
    check_size(&state, "to", to).await?;
    let proof = log::consistency_proof(&mut *state.pool.acquire().await?, from, to).await?;
    Ok(Json(ConsistencyProof { from, to, proof: proof.iter().map(|h| B64.encode(h)).collect() }))
}

#[utoipa::path(get, path = "/v1/log/keys", tag = "log",
    responses((status = 200, description = "Every key that signed or signs checkpoints", body = Vec<PublishedKey>)))]
pub async fn keys(State(state): State<AppState>) -> ApiResult<Json<Vec<PublishedKey>>> {
    Ok(Json(log::published_keys(&mut *state.pool.acquire().await?).await?))
}

#[utoipa::path(get, path = "/v1/correspondence/{id}/proof", tag = "agency",
    params(("id" = Uuid, Path)),
    responses((status = 200, body = Bundle), (status = 404, body = super::error::Problem)),
    security(("agency_key" = [])))]
pub async fn agency_bundle(
    State(state): State<AppState>,
    agency: Agency,
    Path(id): Path<String>,
) -> ApiResult<Json<Bundle>> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    let mine: bool = sqlx::query_scalar("select exists (select 1 from item where id = $1 and agency_id = $2)")
        .bind(id)
        .bind(agency.id)
        .fetch_one(&state.pool)
        .await?;
    if !mine {
        return Err(ApiError::NotFound);
    }
    Ok(Json(proof::build(&state.pool, &signer(&state).await?, id).await?))
}

#[utoipa::path(get, path = "/v1/inbox/{id}/proof", tag = "citizen",
    params(("id" = Uuid, Path)),
    responses((status = 200, body = Bundle), (status = 404, body = super::error::Problem)),
    security(("citizen_token" = [])))]
pub async fn citizen_bundle(
    State(state): State<AppState>,
    citizen: Citizen,
    Path(id): Path<String>,
) -> ApiResult<Json<Bundle>> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    let mine: bool = sqlx::query_scalar(
        "select exists (select 1 from inbox_entry e join recipient r on r.id = e.recipient_id where e.item_id = $1 and r.pinfl = $2)",
    )
    .bind(id)
    .bind(citizen.pinfl.as_str())
    .fetch_one(&state.pool)
    .await?;
    if !mine {
        return Err(ApiError::NotFound);
    }
    Ok(Json(proof::build(&state.pool, &signer(&state).await?, id).await?))
}

#[utoipa::path(post, path = "/v1/verify", tag = "log", request_body = Bundle,
    responses((status = 200, description = "The verdict; `valid` says whether the bundle holds", body = Verdict),
              (status = 400, body = super::error::Problem)))]
pub async fn verify(State(state): State<AppState>, body: JsonBody<Bundle>) -> ApiResult<Json<Verdict>> {
    // The platform's own published keys are the trusted ones, not whatever the bundle carries.
    let keys = log::verifier_keys(&log::published_keys(&mut *state.pool.acquire().await?).await?);
    Ok(Json(proof::verify(&body.value, &keys)))
}

/// Prometheus text format: the log's size, its checkpoints and the monitor's alarms.
pub async fn metrics(
    State(state): State<AppState>,
) -> ApiResult<([(axum::http::HeaderName, &'static str); 1], String)> {
    let row: (i64, i64, i64, Option<i64>, i64, i64, i64) = sqlx::query_as(
        "select (select size from evidence_log_head), (select integrated_size from log_state),
                (select monitored_size from log_state), (select max(size) from checkpoint),
                (select count(*) from log_alarm), (select count(*) from outbox where published_at is null),
                (select count(*) from letter where unconfirmed_flagged_at is not null
                   and status in ('claimed', 'printed', 'out_for_delivery', 'held_at_office'))",
    )
    .fetch_one(&state.pool)
    .await?;
    let text = format!(
        "# HELP dalil_log_size Evidence records appended.\n# TYPE dalil_log_size gauge\ndalil_log_size {}\n\
         # HELP dalil_log_integrated_size Records integrated into the stored Merkle tree.\n# TYPE dalil_log_integrated_size gauge\ndalil_log_integrated_size {}\n\
         # HELP dalil_log_monitored_size Largest checkpoint re-verified by the monitor.\n# TYPE dalil_log_monitored_size gauge\ndalil_log_monitored_size {}\n\
         # HELP dalil_log_checkpoint_size Size of the newest signed checkpoint.\n# TYPE dalil_log_checkpoint_size gauge\ndalil_log_checkpoint_size {}\n\
         # HELP dalil_log_consistency_alarms_total Inconsistencies the log monitor found.\n# TYPE dalil_log_consistency_alarms_total counter\ndalil_log_consistency_alarms_total {}\n\
         # HELP dalil_outbox_unpublished Outbox rows not yet confirmed by RabbitMQ.\n# TYPE dalil_outbox_unpublished gauge\ndalil_outbox_unpublished {}\n\
         # HELP dalil_postal_unconfirmed_letters Letters claimed by an operator and not confirmed in time.\n# TYPE dalil_postal_unconfirmed_letters gauge\ndalil_postal_unconfirmed_letters {}\n",
        row.0,
        row.1,
        row.2,
        row.3.unwrap_or(0),
        row.4,
        row.5,
        row.6
    );
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text))
}
