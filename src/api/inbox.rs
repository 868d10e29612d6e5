//! The citizen's inbox API. A citizen sees only items deposited for their own PINFL; anything
//! else is a 404, whether it exists or not.
//!
//! Opening, downloading and acknowledging are evidence: the first open records
//! ContentAccessTracking (and serves the item where its policy says so), each attachment's
//! first download ContentHandover, and the acknowledgement ConsignmentAcceptance.

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, Postgres, Transaction};
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::Citizen;
use super::correspondence::{attachment_digests, AttachmentDigest};
use super::{ApiError, ApiResult, AppState};
use crate::evidence::{self, Actor, Event, ItemContext, NewEvidence};
use crate::policy::ServiceRule;

#[derive(Debug, Serialize, ToSchema)]
pub struct AgencyView {
    pub code: String,
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InboxEntry {
    pub id: Uuid,
    pub agency: AgencyView,
    pub kind: String,
    pub subject: String,
    pub reference: String,
    pub deposited_at: DateTime<Utc>,
    pub opened_at: Option<DateTime<Utc>>,
    pub acknowledged_at: Option<DateTime<Utc>>,
    pub respond_by: Option<DateTime<Utc>>,
    pub served_at: Option<DateTime<Utc>>,
    /// The sender withdrew the item: its content is no longer shown.
    pub withdrawn_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InboxPage {
    /// Unread first, then newest first.
    pub items: Vec<InboxEntry>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InboxItem {
    #[serde(flatten)]
    pub entry: InboxEntry,
    /// The content exactly as rendered at submission (HTML fragment).
    pub content_html: String,
    pub content_sha256: String,
    pub attachments: Vec<AttachmentDigest>,
}

#[derive(sqlx::FromRow)]
struct EntryRow {
    id: Uuid,
    agency_code: String,
    agency_name: String,
    kind: String,
    subject: String,
    reference: String,
    deposited_at: DateTime<Utc>,
    first_opened_at: Option<DateTime<Utc>>,
    acknowledged_at: Option<DateTime<Utc>>,
    respond_by: Option<DateTime<Utc>>,
    served_at: Option<DateTime<Utc>>,
    recalled_at: Option<DateTime<Utc>>,
    content_html: String,
    content_sha256: String,
}

impl EntryRow {
    fn entry(&self) -> InboxEntry {
        InboxEntry {
            id: self.id,
            agency: AgencyView { code: self.agency_code.clone(), name: self.agency_name.clone() },
            kind: self.kind.clone(),
            subject: self.subject.clone(),
            reference: self.reference.clone(),
            deposited_at: self.deposited_at,
            opened_at: self.first_opened_at,
            acknowledged_at: self.acknowledged_at,
            respond_by: self.respond_by,
            served_at: self.served_at,
            withdrawn_at: self.recalled_at,
        }
    }
}

const ENTRY_SELECT: &str = "select i.id, a.code as agency_code, a.name as agency_name, i.kind, i.subject, i.reference,
        e.deposited_at, e.first_opened_at, e.acknowledged_at, i.respond_by, i.served_at, i.recalled_at, i.content_html, i.content_sha256
    from inbox_entry e join item i on i.id = e.item_id join agency a on a.id = i.agency_id
    join recipient r on r.id = e.recipient_id";

#[utoipa::path(get, path = "/v1/inbox", tag = "citizen",
    responses((status = 200, body = InboxPage), (status = 401, body = super::error::Problem)),
    security(("citizen_token" = [])))]
pub async fn list(State(state): State<AppState>, citizen: Citizen) -> ApiResult<Json<InboxPage>> {
    let rows: Vec<EntryRow> = sqlx::query_as(&format!(
        "{ENTRY_SELECT} where r.pinfl = $1 order by (e.first_opened_at is null) desc, e.deposited_at desc limit 500"
    ))
    .bind(citizen.pinfl.as_str())
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(InboxPage { items: rows.iter().map(EntryRow::entry).collect() }))
}

/// Locks the citizen's entry (and its item) for the rest of the transaction, or 404.
async fn lock_entry(tx: &mut PgConnection, citizen: &Citizen, id: &str) -> ApiResult<EntryRow> {
    let id = Uuid::parse_str(id).map_err(|_| ApiError::NotFound)?;
    // Lock order everywhere: item row first.
    let row: Option<EntryRow> =
        sqlx::query_as(&format!("{ENTRY_SELECT} where e.item_id = $1 and r.pinfl = $2 for no key update of e, i"))
            .bind(id)
            .bind(citizen.pinfl.as_str())
            .fetch_optional(&mut *tx)
            .await?;
    let row = row.ok_or(ApiError::NotFound)?;
    if let Some(at) = row.recalled_at {
        return Err(ApiError::Gone(format!(
            "{} withdrew this item on {} (Tashkent time); it is no longer valid",
            row.agency_name,
            crate::templates::local_time(at)
        )));
    }
    Ok(row)
}

/// The first open, recorded with where it happened (`api` or `web`).
async fn record_open_via(
    tx: &mut Transaction<'_, Postgres>,
    state: &AppState,
    row: &mut EntryRow,
    citizen: &Citizen,
    via: &str,
) -> ApiResult<()> {
    if row.first_opened_at.is_some() {
        return Ok(());
    }
    let now = evidence::now();
    tracing::info!(item_id = %row.id, "opened by the recipient");
    sqlx::query("update inbox_entry set first_opened_at = $2 where item_id = $1")
        .bind(row.id)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    row.first_opened_at = Some(now);
    let ctx = ItemContext::load(tx, row.id).await?;
    let serves = state.policies.by_id(&ctx.policy_id).is_some_and(|p| p.served_on.contains(&ServiceRule::Accessed));
    // A deemed-service time that has passed decided service already, even if no scheduler has
    // recorded it yet: the open is recorded, and the timer serves the item at its own time.
    let deemed_due: bool = sqlx::query_scalar(
        "select exists (select 1 from timer where item_id = $1 and kind = 'deemed' and fired_at is null
                        and due_at <= now())",
    )
    .bind(row.id)
    .fetch_one(&mut **tx)
    .await?;
    let serve_now = serves && row.served_at.is_none() && !deemed_due;
    let mut details = serde_json::json!({ "via": via });
    if serve_now {
        details["served"] = serde_json::json!({ "rule": ServiceRule::Accessed.as_str() });
    }
    // We hold the item's row lock (lock_entry), so taking the log head now keeps the lock
    // order (item, then head) and the item can be updated with the record's index.
    let appended = evidence::append(
        tx,
        &ctx,
        vec![NewEvidence {
            event: Event::ContentAccessTracking,
            at: now,
            actor: Actor::Citizen(citizen.pinfl.to_string()),
            channel: Some("inbox".into()),
            details,
            digests: Some(serde_json::json!({ "content": { "sha256": row.content_sha256 } })),
        }],
    )
    .await?;
    if serve_now {
        sqlx::query(
            "update item set served_at = $2, served_rule = 'accessed', status = 'served', served_evidence = $3,
                    updated_at = now()
             where id = $1 and served_at is null",
        )
        .bind(row.id)
        .bind(now)
        .bind(appended[0].evidence_id)
        .execute(&mut **tx)
        .await?;
        row.served_at = Some(now);
        tracing::info!(item_id = %row.id, rule = "accessed", "served");
    } else {
        sqlx::query("update item set status = 'opened', updated_at = now() where id = $1 and status in ('accepted', 'consigned')")
            .bind(row.id)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

#[utoipa::path(get, path = "/v1/inbox/{id}", tag = "citizen",
    params(("id" = Uuid, Path)),
    responses((status = 200, body = InboxItem), (status = 404, body = super::error::Problem),
        (status = 410, description = "The sender withdrew the item", body = super::error::Problem)),
    security(("citizen_token" = [])))]
pub async fn open(
    State(state): State<AppState>,
    citizen: Citizen,
    Path(id): Path<String>,
) -> ApiResult<Json<InboxItem>> {
    open_via(&state, &citizen, &id, "api").await.map(Json)
}

/// Opens an item for its recipient, recording the first open (and service) as evidence.
pub(crate) async fn open_via(state: &AppState, citizen: &Citizen, id: &str, via: &str) -> ApiResult<InboxItem> {
    let mut tx = state.pool.begin().await?;
    let mut row = lock_entry(&mut tx, citizen, id).await?;
    record_open_via(&mut tx, state, &mut row, citizen, via).await?;
    let attachments = attachment_digests(&mut tx, row.id).await?;
    tx.commit().await?;
    Ok(InboxItem {
        entry: row.entry(),
        content_html: row.content_html.clone(),
        content_sha256: row.content_sha256.clone(),
        attachments,
    })
}

#[utoipa::path(get, path = "/v1/inbox/{id}/attachments/{n}", tag = "citizen",
    params(("id" = Uuid, Path), ("n" = i32, Path, description = "Attachment number, from 0")),
    responses((status = 200, description = "The file"), (status = 404, body = super::error::Problem)),
    security(("citizen_token" = [])))]
pub async fn attachment(
    State(state): State<AppState>,
    citizen: Citizen,
    Path((id, n)): Path<(String, String)>,
) -> ApiResult<Response> {
    attachment_via(&state, &citizen, &id, &n, "api").await
}

/// Sends an attachment to its recipient, recording the first open and download (with where).
pub(crate) async fn attachment_via(
    state: &AppState,
    citizen: &Citizen,
    id: &str,
    n: &str,
    via: &str,
) -> ApiResult<Response> {
    let n: i32 = n.parse().map_err(|_| ApiError::NotFound)?;
    let mut tx = state.pool.begin().await?;
    let mut row = lock_entry(&mut tx, citizen, id).await?;
    let file: Option<(String, String, String, Vec<u8>)> =
        sqlx::query_as("select name, content_type, sha256, data from attachment where item_id = $1 and n = $2")
            .bind(row.id)
            .bind(n)
            .fetch_optional(&mut *tx)
            .await?;
    let (name, content_type, sha256, data) = file.ok_or(ApiError::NotFound)?;
    // Downloading implies opening.
    record_open_via(&mut tx, state, &mut row, citizen, via).await?;
    let first = sqlx::query(
        "insert into attachment_access (item_id, n, first_at) values ($1, $2, now()) on conflict do nothing",
    )
    .bind(row.id)
    .bind(n)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if first {
        let ctx = ItemContext::load(&mut tx, row.id).await?;
        evidence::append(
            &mut tx,
            &ctx,
            vec![NewEvidence {
                event: Event::ContentHandover,
                at: evidence::now(),
                actor: Actor::Citizen(citizen.pinfl.to_string()),
                channel: Some("inbox".into()),
                details: serde_json::json!({ "attachment": n, "name": name, "via": via }),
                digests: Some(serde_json::json!({ "attachment": { "n": n, "sha256": sha256 } })),
            }],
        )
        .await?;
    }
    tx.commit().await?;
    let safe_name: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || ".-_".contains(c) { c } else { '_' }).collect();
    let mut response = data.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&content_type).unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{safe_name}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    Ok(response)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Acknowledged {
    pub id: Uuid,
    pub acknowledged_at: DateTime<Utc>,
}

#[utoipa::path(post, path = "/v1/inbox/{id}/acknowledge", tag = "citizen",
    params(("id" = Uuid, Path)),
    responses((status = 200, body = Acknowledged), (status = 404, body = super::error::Problem)),
    security(("citizen_token" = [])))]
pub async fn acknowledge(
    State(state): State<AppState>,
    citizen: Citizen,
    Path(id): Path<String>,
) -> ApiResult<Json<Acknowledged>> {
    acknowledge_via(&state, &citizen, &id, "api").await.map(Json)
}

/// Records the recipient's acknowledgement (once), with where it happened.
pub(crate) async fn acknowledge_via(
    state: &AppState,
    citizen: &Citizen,
    id: &str,
    via: &str,
) -> ApiResult<Acknowledged> {
    let mut tx = state.pool.begin().await?;
    let mut row = lock_entry(&mut tx, citizen, id).await?;
    record_open_via(&mut tx, state, &mut row, citizen, via).await?;
    let at = match row.acknowledged_at {
        Some(at) => at, // acknowledging twice changes nothing
        None => {
            let at = evidence::now();
            sqlx::query("update inbox_entry set acknowledged_at = $2 where item_id = $1")
                .bind(row.id)
                .bind(at)
                .execute(&mut *tx)
                .await?;
            let ctx = ItemContext::load(&mut tx, row.id).await?;
            evidence::append(
                &mut tx,
                &ctx,
                vec![NewEvidence {
                    event: Event::ConsignmentAcceptance,
                    at,
                    actor: Actor::Citizen(citizen.pinfl.to_string()),
                    channel: Some("inbox".into()),
                    details: serde_json::json!({ "via": via }),
                    digests: Some(serde_json::json!({ "content": { "sha256": row.content_sha256 } })),
                }],
            )
            .await?;
            at
        }
    };
    tx.commit().await?;
    Ok(Acknowledged { id: row.id, acknowledged_at: at })
}
