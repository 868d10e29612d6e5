//! The agency API: submit correspondence, follow it.
//!
//! A submission is written in one transaction: idempotency claim, item, attachments, steps,
//! attempts, outbox rows and the SubmissionAcceptance evidence — all or nothing, committed
//! before the `202`. Submissions that arrive together share that transaction ([`super::intake`]),
//! each with its own claim, rows and error.

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sqlx::PgConnection;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::auth::Agency;
use super::lookup::Recipient;
use super::{intake, ApiError, ApiResult, AppState, JsonBody};
use crate::domain::{Kind, Lane, Language, RecipientId};
use crate::evidence::{self, Actor, Event, ItemContext, NewEvidence, StoredEvidence};
use crate::policy::ServiceRule;
use crate::queue::{Envelope, DELIVERY_EXCHANGE};
use crate::templates::{self, RenderError};

/// Attachments may add up to this many bytes (decoded).
pub const MAX_ATTACHMENT_BYTES: usize = 10 * 1024 * 1024;
const MAX_ATTACHMENTS: usize = 20;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    pub kind: Kind,
    pub recipient: RecipientRef,
    /// A template name from `GET /v1/templates`.
    pub template: String,
    pub language: Language,
    /// The template's variables; every one it declares is required.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub personalisation: Map<String, Value>,
    /// The agency's own reference (case number, letter number), 1–100 characters.
    pub reference: String,
    #[serde(default)]
    pub attachments: Vec<AttachmentIn>,
    /// When the recipient must respond by (RFC 3339); must be in the future.
    #[serde(default)]
    pub respond_by: Option<DateTime<Utc>>,
    /// Which delivery queues the item travels in. `standard` (the default of a single
    /// submission) or `bulk` (every item of a batch): each channel has a queue per lane, served
    /// side by side, so items sent in bulk never stand ahead of those sent one by one. Send a
    /// campaign of single submissions as `bulk` so that it does not stand ahead of others'.
    #[serde(default)]
    pub lane: Option<Lane>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecipientRef {
    /// A person's PINFL (14 digits).
    pub pinfl: Option<String>,
    /// A legal entity's TIN (9 digits).
    pub tin: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachmentIn {
    pub name: String,
    pub content_type: String,
    /// The file, base64 (standard alphabet, padded).
    pub content: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AttachmentDigest {
    pub n: i32,
    pub name: String,
    pub content_type: String,
    pub size: i32,
    pub sha256: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SubmitResponse {
    pub id: Uuid,
    pub status: String,
    pub reference: String,
    /// Set when `respond_by` leaves too little time for the policy's steps to reach the
    /// recipient (a letter after an unopened deposit, say): the agency should set a later date.
    pub respond_by_warning: Option<String>,
    /// The SubmissionAcceptance record, which fixes the digests of the content and attachments.
    pub evidence: StoredEvidence,
}

struct Prepared {
    kind: Kind,
    recipient: RecipientId,
    template: String,
    language: Language,
    personalisation: Map<String, Value>,
    reference: String,
    respond_by: Option<DateTime<Utc>>,
    attachments: Vec<(AttachmentDigest, Vec<u8>)>,
}

/// Everything that can be checked without the database.
fn prepare(req: SubmitRequest) -> Result<Prepared, ApiError> {
    let recipient = RecipientId::from_parts(req.recipient.pinfl.as_deref(), req.recipient.tin.as_deref())
        .map_err(|e| e.under("recipient"))?;
    let reference = req.reference.trim().to_string();
    if reference.is_empty() || reference.chars().count() > 100 || reference.chars().any(char::is_control) {
        return Err(ApiError::invalid("reference", "1 to 100 characters, no control characters"));
    }
    if let Some(t) = req.respond_by {
        if t <= Utc::now() {
            return Err(ApiError::invalid("respond_by", "must be in the future"));
        }
    }
    if req.attachments.len() > MAX_ATTACHMENTS {
        return Err(ApiError::invalid("attachments", format!("at most {MAX_ATTACHMENTS} attachments")));
    }
    let mut attachments = Vec::new();
    let mut total = 0usize;
    for (i, a) in req.attachments.into_iter().enumerate() {
        let field = |f: &str| format!("attachments[{i}].{f}");
        let name = a.name.trim().to_string();
        if name.is_empty()
            || name.chars().count() > 200
            || name.contains(['/', '\\'])
            || name.chars().any(char::is_control)
        {
            return Err(ApiError::invalid(field("name"), "a file name of 1 to 200 characters, without / or \\"));
        }
        let ct = a.content_type.trim().to_ascii_lowercase();
        let valid_ct = ct.split_once('/').is_some_and(|(t, s)| {
            !t.is_empty()
                && !s.is_empty()
                && ct.len() <= 100
                && ct.chars().all(|c| c.is_ascii_alphanumeric() || "/.+-".contains(c))
        });
        if !valid_ct {
            return Err(ApiError::invalid(field("content_type"), "a media type such as application/pdf"));
        }
        let data = base64::engine::general_purpose::STANDARD
            .decode(a.content.trim())
            .map_err(|_| ApiError::invalid(field("content"), "not valid base64"))?;
        if data.is_empty() {
            return Err(ApiError::invalid(field("content"), "the file is empty"));
        }
        total += data.len();
        if total > MAX_ATTACHMENT_BYTES {
            return Err(ApiError::TooLarge(format!("attachments add up to more than {MAX_ATTACHMENT_BYTES} bytes")));
        }
        // A PDF may be printed and enclosed with a paper letter: it must be one.
        if ct == "application/pdf" && crate::letter::load_pdf(&data).is_err() {
            return Err(ApiError::invalid(field("content"), "not a readable PDF"));
        }
        let digest = AttachmentDigest {
            n: i as i32,
            name,
            content_type: ct,
            size: data.len() as i32,
            sha256: evidence::sha256_hex(&data),
        };
        attachments.push((digest, data));
    }
    Ok(Prepared {
        kind: req.kind,
        recipient,
        template: req.template,
        language: req.language,
        personalisation: req.personalisation,
        reference,
        respond_by: req.respond_by,
        attachments,
    })
}

/// The agency's `Idempotency-Key` header, checked before the body is read.
pub struct IdempotencyKey(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let field = "Idempotency-Key";
        let value = parts.headers.get("idempotency-key").ok_or_else(|| {
            ApiError::bad_request(
                field,
                "the Idempotency-Key header is required: a unique value per item, reused on retries",
            )
        })?;
        let key = value.to_str().map_err(|_| ApiError::bad_request(field, "must be visible ASCII"))?;
        let key = check_key(key).map_err(|e| ApiError::bad_request(field, e))?;
        Ok(IdempotencyKey(key.to_string()))
    }
}

/// An idempotency key, trimmed: 1 to 200 visible ASCII characters.
pub(super) fn check_key(key: &str) -> Result<&str, &'static str> {
    let key = key.trim();
    if key.is_empty() || key.len() > 200 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("1 to 200 visible ASCII characters");
    }
    Ok(key)
}

#[utoipa::path(post, path = "/v1/correspondence", tag = "agency",
    request_body = SubmitRequest,
    params(("Idempotency-Key" = String, Header, description = "Unique per item; a retry with the same key and body returns the first answer")),
    responses(
        (status = 202, description = "Accepted and committed", body = SubmitResponse),
        (status = 400, description = "Malformed JSON or missing header", body = super::error::Problem),
        (status = 401, description = "Missing or invalid API key", body = super::error::Problem),
        (status = 409, description = "The Idempotency-Key was used for another request", body = super::error::Problem),
        (status = 413, description = "Body or attachments too large", body = super::error::Problem),
        (status = 422, description = "A field is invalid; `field` names it", body = super::error::Problem)),
    security(("agency_key" = [])))]
pub async fn submit(
    State(state): State<AppState>,
    agency: Agency,
    IdempotencyKey(key): IdempotencyKey,
    body: JsonBody<SubmitRequest>,
) -> ApiResult<Response> {
    let JsonBody { value, mut raw } = body;
    let request_sha256 = request_digest(&mut raw);
    drop(raw);
    match accept(&state, &agency, &key, &request_sha256, value).await {
        Ok(Some(response)) => Ok(response),
        // Another request holds the key: answer as it did, once it has.
        Ok(None) => {
            replay(&mut *state.pool.acquire().await?, agency.id, &key, &request_sha256).await?.ok_or_else(|| {
                ApiError::Conflict {
                    field: Some("Idempotency-Key".into()),
                    detail: "a request with this key is in progress".into(),
                }
            })
        }
        // A retry of a finished request answers as the first time, even if it would no
        // longer pass (its recipient gone, a template changed, the database failing now); a
        // key used for another body is a conflict before it is anything else. When the
        // replay cannot be read either, the first error stands.
        Err(e) => match state.pool.acquire().await {
            Ok(mut conn) => match replay(&mut conn, agency.id, &key, &request_sha256).await {
                Ok(Some(response)) => Ok(response),
                Err(conflict @ ApiError::Conflict { .. }) => Err(conflict),
                Ok(None) | Err(_) => Err(e),
            },
            Err(_) => Err(e),
        },
    }
}

/// What a retry's body is compared by: the SHA-256 of its canonical JSON (RFC 8785), without
/// its idempotency key (a batch item's) and without `lane`. The lane is where the item is sent,
/// not what it is: the first request for a key decides it, and a retry that names the lane or
/// leaves it to its endpoint's default is the same item. `body` is given back as it came.
pub(super) fn request_digest(body: &mut Value) -> String {
    let Some(object) = body.as_object_mut() else {
        return evidence::sha256_hex(&crate::jcs::to_vec(body));
    };
    let lane = object.remove("lane");
    let digest = evidence::sha256_hex(&crate::jcs::to_vec(body));
    if let (Some(lane), Some(object)) = (lane, body.as_object_mut()) {
        object.insert("lane".into(), lane);
    }
    digest
}

/// Validates, renders and writes a new submission; `None` when its key was claimed first.
async fn accept(
    state: &AppState,
    agency: &Agency,
    key: &str,
    request_sha256: &str,
    body: SubmitRequest,
) -> ApiResult<Option<Response>> {
    let planned = plan(state, agency, key, request_sha256, body, Lane::Standard).await?;
    Ok(write(state, planned).await?.map(accepted))
}

/// A submission checked, rendered and decided: its rows, ready to be written.
pub(super) struct Planned {
    row: intake::Row,
    trace_id: Uuid,
}

/// Everything a submission needs before it is written: the checks, the recipient, the
/// rendering, the notices, the steps and the SubmissionAcceptance record. `lane` is where the
/// item travels unless its body names a lane.
pub(super) async fn plan(
    state: &AppState,
    agency: &Agency,
    key: &str,
    request_sha256: &str,
    body: SubmitRequest,
    lane: Lane,
) -> ApiResult<Planned> {
    let lane = body.lane.unwrap_or(lane);
    let p = prepare(body)?;
    // Read with the recipients of submissions made alongside (`super::lookup`).
    let recipient = state.lookups.recipient(p.recipient.clone()).await?;
    let Some(Recipient { id: recipient_id, name: recipient_name, phone, email, digital_consent }) = recipient else {
        return Err(ApiError::invalid(
            format!("recipient.{}", p.recipient.scheme()),
            "no recipient is registered with this identifier",
        ));
    };

    let item_id = Uuid::now_v7();
    let policy = state.policies.for_kind(p.kind);
    let ctx = templates::Context {
        agency: templates::AgencyCtx { name: agency.name.clone(), code: agency.code.clone() },
        recipient: templates::RecipientCtx { name: recipient_name },
        item: templates::ItemCtx {
            id: item_id.to_string(),
            kind: p.kind.as_str().into(),
            reference: p.reference.clone(),
            inbox_url: format!("{}/inbox/{item_id}", state.settings.public_url.trim_end_matches('/')),
            respond_by: p.respond_by.map(templates::local_time),
        },
    };
    let rendered =
        state.templates.render(&p.template, p.language, p.kind, &p.personalisation, &ctx).map_err(|e| match e {
            RenderError::Input(f) => ApiError::Invalid(f),
            RenderError::Template(file, why) => ApiError::Internal(anyhow::anyhow!("template {file}: {why}")),
        })?;
    // Which notices go out, decided now and fixed in the evidence: a channel of the policy
    // without a contact point on record is skipped, and the reason kept.
    let mut notices: Vec<Notice> = Vec::new();
    let mut skipped = serde_json::Map::new();
    for step in policy.steps.iter().filter(|s| s.applies(digital_consent)) {
        match step.channel.as_str() {
            "sms" => match (&phone, &rendered.sms) {
                (Some(phone), Some(text)) => {
                    let encoded = crate::sms::encode(text);
                    let cap = state.settings.sms.max_segments;
                    if encoded.segments > cap {
                        return Err(ApiError::invalid(
                            "personalisation",
                            format!(
                                "the SMS notice would take {} segments ({}); the limit is {cap}: shorten the values",
                                encoded.segments,
                                encoded.encoding.as_str()
                            ),
                        ));
                    }
                    notices.push(Notice::sms(phone, encoded));
                }
                (None, _) => {
                    skipped.insert("sms".into(), "no phone number on record".into());
                }
                (_, None) => {
                    skipped.insert("sms".into(), "the template has no SMS text".into());
                }
            },
            "email" => match (&email, &rendered.email) {
                (Some(address), Some(e)) => notices.push(Notice::email(address, e)),
                (None, _) => {
                    skipped.insert("email".into(), "no email address on record".into());
                }
                (_, None) => {
                    skipped.insert("email".into(), "no email layout for this language".into());
                }
            },
            _ => {}
        }
    }
    let now = evidence::now();
    let deemed = policy.deemed_for(digital_consent);
    let deemed_rule = deemed.map(|d| {
        serde_json::json!({ "rule": ServiceRule::Deemed.as_str(), "after": d.after.text(), "from": "ContentConsignment" })
    });
    let respond_by_warning = p.respond_by.and_then(|t| policy.respond_by_warning(digital_consent, now, t));
    let content_sha256 = evidence::sha256_hex(rendered.html.as_bytes());
    let subject_sha256 = evidence::sha256_hex(rendered.subject.as_bytes());

    let trace_id = Uuid::new_v4();
    let mut plan = Vec::new();
    let mut steps = Vec::new();
    let mut attempts = Vec::new();
    for (seq, step) in policy.steps_for(digital_consent) {
        if matches!(step.channel.as_str(), "sms" | "email") && !notices.iter().any(|n| n.channel == step.channel) {
            continue; // skipped above, with the reason in the evidence
        }
        let step_id = Uuid::now_v7();
        let due_at = step.after.map(|a| now + a.0);
        steps.push(intake::Step {
            id: step_id,
            seq: seq as i32,
            channel: step.channel.clone(),
            due_at,
            unless: step.unless.map(|u| u.as_str()),
        });
        let mut planned = serde_json::json!({ "channel": step.channel });
        if let Some(due_at) = due_at {
            // A timed step waits for the scheduler (its timer is written with the step).
            planned["after"] = step.after.map(|a| a.text()).into();
            planned["due_at"] = evidence::format_time(due_at).into();
            if let Some(u) = step.unless {
                planned["unless"] = u.as_str().into();
            }
        } else {
            let attempt_id = Uuid::now_v7();
            attempts.push(intake::Attempt {
                id: attempt_id,
                step_id,
                channel: step.channel.clone(),
                envelope: Envelope::Deliver { version: 1, item_id, step_id, attempt_id, trace_id },
            });
        }
        plan.push(planned);
    }

    let item_ctx = ItemContext {
        item_id,
        agency_id: agency.id,
        agency_code: agency.code.clone(),
        kind: p.kind.as_str().into(),
        reference: p.reference.clone(),
        recipient_scheme: p.recipient.scheme().into(),
        recipient_value: p.recipient.value().into(),
        policy_id: policy.id.clone(),
        policy_version: policy.version,
    };
    let mut details = serde_json::json!({
        "kind": p.kind.as_str(),
        "template": p.template,
        "language": p.language.as_str(),
        "reference": p.reference,
        "subject": rendered.subject,
        "idempotency_key": key,
        "trace_id": trace_id,
        "digital_consent": digital_consent,
        "plan": plan,
    });
    if let Some(rule) = &deemed_rule {
        details["deemed"] = rule.clone();
    }
    if let Some(w) = &respond_by_warning {
        details["respond_by_warning"] = w.clone().into();
    }
    if let Some(t) = p.respond_by {
        details["respond_by"] = Value::String(evidence::format_time(t));
    }
    if !skipped.is_empty() {
        details["notices_skipped"] = Value::Object(skipped);
    }
    let acceptance = NewEvidence {
        event: Event::SubmissionAcceptance,
        at: now,
        actor: Actor::Agency(agency.code.clone()),
        channel: None,
        details,
        digests: Some(serde_json::json!({
            "subject": { "sha256": subject_sha256 },
            "content": { "sha256": content_sha256, "media_type": "text/html; charset=utf-8" },
            "attachments": p.attachments.iter().map(|(d, _)| d).collect::<Vec<_>>(),
            "notices": notices.iter().map(|n| (n.channel.to_string(), n.digest())).collect::<serde_json::Map<_, _>>(),
        })),
    };

    let row = intake::Row {
        key: key.to_string(),
        request_sha256: request_sha256.to_string(),
        item: item_ctx,
        recipient_id,
        template: p.template,
        language: p.language.as_str(),
        personalisation: Value::Object(p.personalisation),
        subject: rendered.subject,
        content_html: rendered.html,
        content_sha256,
        respond_by: p.respond_by,
        digital_consent,
        deemed_after: deemed.map(|d| d.after.interval()),
        deemed_rule,
        respond_by_warning,
        lane,
        attachments: p.attachments,
        notices,
        steps,
        attempts,
        acceptance,
    };
    Ok(Planned { row, trace_id })
}

/// Writes a planned submission and returns its answer once it is committed (with whatever
/// other submissions were written alongside); `None` when its key was claimed first.
pub(super) async fn write(state: &AppState, planned: Planned) -> ApiResult<Option<SubmitResponse>> {
    let Planned { row, trace_id } = planned;
    let item = row.item.clone();
    let respond_by_warning = row.respond_by_warning.clone();
    let Some(appended) = state.intake.write(row).await? else { return Ok(None) };

    state.relay_wake.wake();
    tracing::info!(item_id = %item.item_id, %trace_id, agency = item.agency_code, kind = item.kind, "accepted");
    // The same answer a replay of this request gets, from what is in hand.
    Ok(Some(SubmitResponse {
        id: item.item_id,
        status: "accepted".into(),
        reference: item.reference,
        respond_by_warning,
        evidence: appended.stored(),
    }))
}

fn accepted(body: SubmitResponse) -> Response {
    let item_id = body.id;
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/correspondence/{item_id}")) {
        response.headers_mut().insert(axum::http::header::LOCATION, v);
    }
    response
}

/// The first attempts of steps (step id, channel) that start now, and the messages that make
/// workers take them.
fn first_attempts(
    item_id: Uuid,
    steps: &[(Uuid, &str)],
    trace_id: Uuid,
) -> (Vec<Uuid>, Vec<sqlx::types::Json<Envelope>>) {
    let attempt_ids: Vec<Uuid> = steps.iter().map(|_| Uuid::now_v7()).collect();
    let envelopes = steps
        .iter()
        .zip(&attempt_ids)
        .map(|((step_id, _), attempt_id)| {
            sqlx::types::Json(Envelope::Deliver {
                version: 1,
                item_id,
                step_id: *step_id,
                attempt_id: *attempt_id,
                trace_id,
            })
        })
        .collect();
    (attempt_ids, envelopes)
}

/// Starts a step now: its first attempt, and the message that makes a worker take it.
pub async fn start_step(
    conn: &mut PgConnection,
    item_id: Uuid,
    step_id: Uuid,
    channel: &str,
    trace_id: Uuid,
) -> sqlx::Result<Uuid> {
    Ok(start_steps(conn, item_id, &[(step_id, channel)], trace_id).await?[0])
}

/// Starts steps of one item now, in one statement: their first attempts, and the messages
/// (through the outbox) that make workers take them, in the item's lane. Returns the attempt
/// ids. The routing key is the lane's, as [`crate::domain::Lane::routing_key`] makes it.
pub async fn start_steps(
    conn: &mut PgConnection,
    item_id: Uuid,
    steps: &[(Uuid, &str)],
    trace_id: Uuid,
) -> sqlx::Result<Vec<Uuid>> {
    if steps.is_empty() {
        return Ok(Vec::new());
    }
    let (attempt_ids, payloads) = first_attempts(item_id, steps, trace_id);
    let (step_ids, channels): (Vec<Uuid>, Vec<&str>) = steps.iter().copied().unzip();
    sqlx::query(
        "with a as (
            insert into attempt (id, step_id, item_id, channel, status)
            select id, step_id, $1, channel, 'queued'
            from unnest($2::uuid[], $3::uuid[], $4::text[]) as x(id, step_id, channel)
         )
         insert into outbox (exchange, routing_key, message_id, payload)
         select $5, case i.lane when 'bulk' then y.channel || '.bulk' else y.channel end, y.id, y.payload
         from unnest($2::uuid[], $4::text[], $6::jsonb[]) as y(id, channel, payload), item i
         where i.id = $1",
    )
    .bind(item_id)
    .bind(&attempt_ids)
    .bind(&step_ids)
    .bind(&channels)
    .bind(DELIVERY_EXCHANGE)
    .bind(&payloads)
    .execute(&mut *conn)
    .await?;
    Ok(attempt_ids)
}

/// The answer to a request whose key was seen: the first answer for the same body, a conflict
/// for another body, `None` for a new key.
async fn replay(
    conn: &mut PgConnection,
    agency_id: Uuid,
    key: &str,
    request_sha256: &str,
) -> ApiResult<Option<Response>> {
    match seen(conn, agency_id, &[(key, request_sha256)]).await?.pop() {
        Some(Seen::Answer(answer)) => Ok(Some(accepted(*answer))),
        Some(Seen::OtherBody) => Err(ApiError::Conflict {
            field: Some("Idempotency-Key".into()),
            detail: "this Idempotency-Key was used with a different request body".into(),
        }),
        Some(Seen::New | Seen::InFlight) | None => Ok(None),
    }
}

/// What is on record for a submission's key.
pub(super) enum Seen {
    /// Not seen.
    New,
    /// Claimed by a request still being written.
    InFlight,
    /// Used for another body.
    OtherBody,
    /// Used for the same body: its first answer.
    Answer(Box<SubmitResponse>),
}

/// What is on record for each of these (key, request digest) pairs, in the order given: two
/// statements however many there are.
pub(super) async fn seen(conn: &mut PgConnection, agency_id: Uuid, asked: &[(&str, &str)]) -> ApiResult<Vec<Seen>> {
    let keys: Vec<&str> = asked.iter().map(|(key, _)| *key).collect();
    type Claim = (String, String, Option<Uuid>, Option<String>, Option<String>, Option<String>);
    let claims: Vec<Claim> = sqlx::query_as(
        "select c.key, c.request_sha256, i.id, i.status, i.reference, i.respond_by_warning
         from idempotency c left join item i on i.id = c.item_id
         where c.agency_id = $1 and c.key = any($2)",
    )
    .bind(agency_id)
    .bind(&keys)
    .fetch_all(&mut *conn)
    .await?;
    let written: Vec<Uuid> = claims.iter().filter_map(|c| c.2).collect();
    let mut acceptances: HashMap<Uuid, StoredEvidence> = if written.is_empty() {
        HashMap::new()
    } else {
        evidence::acceptances(conn, &written).await?.into_iter().collect()
    };
    let mut claims: HashMap<String, Claim> = claims.into_iter().map(|c| (c.0.clone(), c)).collect();
    asked
        .iter()
        .map(|(key, request_sha256)| {
            let Some((_, stored_sha256, item, status, reference, warning)) = claims.remove(*key) else {
                return Ok(Seen::New);
            };
            if stored_sha256 != *request_sha256 {
                return Ok(Seen::OtherBody);
            }
            let (Some(id), Some(status), Some(reference)) = (item, status, reference) else {
                return Ok(Seen::InFlight);
            };
            let evidence = acceptances
                .remove(&id)
                .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("item {id} has no SubmissionAcceptance")))?;
            Ok(Seen::Answer(Box::new(SubmitResponse { id, status, reference, respond_by_warning: warning, evidence })))
        })
        .collect()
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Served {
    pub at: DateTime<Utc>,
    /// The rule of the policy that made the item served, e.g. `accessed`.
    pub rule: String,
    /// The `evidence_id` of the record that decided it (one of `evidence`).
    pub evidence: Option<Uuid>,
}

#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct AttemptView {
    pub id: Uuid,
    #[serde(skip)]
    pub step_id: Uuid,
    pub status: String,
    pub tries: i32,
    pub detail: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StepView {
    pub id: Uuid,
    /// The step's place in the policy.
    pub seq: i32,
    pub channel: String,
    /// scheduled (waiting for its timer), queued, done, failed, skipped, cancelled (recall)
    pub status: String,
    /// When a timed step is (or was) due.
    pub due_at: Option<DateTime<Utc>>,
    /// A timed step is skipped if this holds when it is due: opened, served.
    pub unless: Option<String>,
    /// Why a step was skipped or cancelled.
    pub note: Option<String>,
    pub attempts: Vec<AttemptView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Recalled {
    pub at: DateTime<Utc>,
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ItemView {
    pub id: Uuid,
    pub kind: String,
    pub template: String,
    pub language: String,
    pub reference: String,
    pub subject: String,
    /// accepted → consigned → opened → served; or failed, undeliverable, recalled.
    pub status: String,
    /// The delivery queues it travels in.
    pub lane: Lane,
    #[schema(value_type = Object)]
    pub recipient: Value,
    pub respond_by: Option<DateTime<Utc>>,
    /// Set at submission when `respond_by` leaves the recipient too little time.
    pub respond_by_warning: Option<String>,
    pub created_at: DateTime<Utc>,
    pub content_sha256: String,
    pub attachments: Vec<AttachmentDigest>,
    pub policy: PolicyRef,
    /// Whether the recipient had consented to digital delivery at submission (it decides the
    /// steps and deemed service).
    pub digital_consent: bool,
    /// Deemed service for this item, when its policy has it: `{rule, after, from}`.
    #[schema(value_type = Option<Object>)]
    pub deemed: Option<Value>,
    /// Set once, never changed: when and by which rule the item became legally served.
    pub served: Option<Served>,
    pub recalled: Option<Recalled>,
    pub steps: Vec<StepView>,
    /// The paper letter, when the policy sent one.
    pub letter: Option<LetterView>,
    pub evidence: Vec<StoredEvidence>,
}

#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct LetterView {
    pub operator: String,
    /// ready, claimed, printed, out_for_delivery, held_at_office, delivered, refused, undeliverable
    pub status: String,
    pub pdf_sha256: String,
    pub claimed_at: Option<DateTime<Utc>>,
    /// Set when the operator has not confirmed the letter in time.
    pub unconfirmed_flagged_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PolicyRef {
    pub id: String,
    pub version: i32,
}

#[derive(sqlx::FromRow)]
struct ItemRow {
    id: Uuid,
    kind: String,
    template: String,
    language: String,
    reference: String,
    subject: String,
    status: String,
    lane: Lane,
    pinfl: Option<String>,
    tin: Option<String>,
    respond_by: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    content_sha256: String,
    policy_id: String,
    policy_version: i32,
    served_at: Option<DateTime<Utc>>,
    served_rule: Option<String>,
    served_evidence: Option<Uuid>,
    respond_by_warning: Option<String>,
    digital_consent: bool,
    deemed_rule: Option<sqlx::types::Json<Value>>,
    recalled_at: Option<DateTime<Utc>>,
    recall_reason: Option<String>,
}

#[utoipa::path(get, path = "/v1/correspondence/{id}", tag = "agency",
    params(("id" = Uuid, Path, description = "Item id")),
    responses((status = 200, body = ItemView), (status = 404, description = "No such item of this agency", body = super::error::Problem)),
    security(("agency_key" = [])))]
pub async fn get_one(
    State(state): State<AppState>,
    agency: Agency,
    Path(id): Path<String>,
) -> ApiResult<Json<ItemView>> {
    // Another agency's item and a missing one look the same: 404.
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    let mut conn = state.pool.acquire().await?;
    let row: Option<ItemRow> = sqlx::query_as(
        "select i.id, i.kind, i.template, i.language, i.reference, i.subject, i.status, i.lane, r.pinfl, r.tin,
                i.respond_by, i.created_at, i.content_sha256, i.policy_id, i.policy_version,
                i.served_at, i.served_rule, i.served_evidence, i.respond_by_warning, i.digital_consent,
                i.deemed_rule, i.recalled_at, i.recall_reason
         from item i join recipient r on r.id = i.recipient_id where i.id = $1 and i.agency_id = $2",
    )
    .bind(id)
    .bind(agency.id)
    .fetch_optional(&mut *conn)
    .await?;
    let row = row.ok_or(ApiError::NotFound)?;
    let attachments = attachment_digests(&mut conn, id).await?;
    #[allow(clippy::type_complexity)]
    let steps: Vec<(Uuid, i32, String, String, Option<DateTime<Utc>>, Option<String>, Option<String>)> =
        sqlx::query_as(
            "select id, seq, channel, status, due_at, unless_condition, note from step where item_id = $1
             order by seq, created_at",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;
    let attempts: Vec<AttemptView> = sqlx::query_as(
        "select id, step_id, status, tries, detail, created_at, finished_at from attempt where item_id = $1 order by created_at",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    let steps = steps
        .into_iter()
        .map(|(step_id, seq, channel, status, due_at, unless, note)| StepView {
            id: step_id,
            seq,
            channel,
            status,
            due_at,
            unless,
            note,
            attempts: attempts.iter().filter(|a| a.step_id == step_id).cloned().collect(),
        })
        .collect();
    let letter: Option<LetterView> = sqlx::query_as(
        "select o.code as operator, l.status, l.pdf_sha256, l.claimed_at, l.unconfirmed_flagged_at
         from letter l join postal_operator o on o.id = l.operator_id where l.item_id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let evidence = evidence::for_item(&mut conn, id).await?;
    let recipient = crate::domain::recipient_json(row.pinfl.as_deref(), row.tin.as_deref());
    Ok(Json(ItemView {
        id: row.id,
        kind: row.kind,
        template: row.template,
        language: row.language,
        reference: row.reference,
        subject: row.subject,
        status: row.status,
        lane: row.lane,
        recipient,
        respond_by: row.respond_by,
        respond_by_warning: row.respond_by_warning,
        created_at: row.created_at,
        content_sha256: row.content_sha256,
        attachments,
        policy: PolicyRef { id: row.policy_id, version: row.policy_version },
        digital_consent: row.digital_consent,
        deemed: row.deemed_rule.map(|j| j.0),
        recalled: row.recalled_at.map(|at| Recalled { at, reason: row.recall_reason }),
        served: row.served_at.map(|at| Served {
            at,
            rule: row.served_rule.unwrap_or_default(),
            evidence: row.served_evidence,
        }),
        steps,
        letter,
        evidence,
    }))
}

pub async fn attachment_digests(conn: &mut PgConnection, item_id: Uuid) -> sqlx::Result<Vec<AttachmentDigest>> {
    let rows: Vec<(i32, String, String, i32, String)> =
        sqlx::query_as("select n, name, content_type, size, sha256 from attachment where item_id = $1 order by n")
            .bind(item_id)
            .fetch_all(conn)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(n, name, content_type, size, sha256)| AttachmentDigest { n, name, content_type, size, sha256 })
        .collect())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// accepted, consigned, opened, served, failed
    pub status: Option<String>,
    pub kind: Option<String>,
    pub reference: Option<String>,
    /// RFC 3339
    pub created_after: Option<String>,
    /// RFC 3339
    pub created_before: Option<String>,
    /// 1–200, default 50
    pub limit: Option<String>,
    /// `next_cursor` of the previous page
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct ListEntry {
    pub id: Uuid,
    pub kind: String,
    pub reference: String,
    pub status: String,
    pub lane: Lane,
    pub created_at: DateTime<Utc>,
    pub served_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ListPage {
    pub items: Vec<ListEntry>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

const STATUSES: [&str; 9] =
    ["accepted", "consigned", "opened", "served", "failed", "delivered", "refused", "undeliverable", "recalled"];

fn parse_time(field: &str, v: &Option<String>) -> ApiResult<Option<DateTime<Utc>>> {
    v.as_deref()
        .map(|s| {
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| ApiError::invalid(field, "an RFC 3339 time, e.g. 2026-11-28T09:00:00Z"))
        })
        .transpose()
}

#[utoipa::path(get, path = "/v1/correspondence", tag = "agency", params(ListQuery),
    responses((status = 200, body = ListPage), (status = 422, body = super::error::Problem)),
    security(("agency_key" = [])))]
pub async fn list(
    State(state): State<AppState>,
    agency: Agency,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<ListPage>> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest { field: None, detail: e.body_text() })?;
    if let Some(s) = &q.status {
        if !STATUSES.contains(&s.as_str()) {
            return Err(ApiError::invalid("status", format!("one of {}", STATUSES.join(", "))));
        }
    }
    if let Some(k) = &q.kind {
        Kind::parse(k)?;
    }
    let after = parse_time("created_after", &q.created_after)?;
    let before = parse_time("created_before", &q.created_before)?;
    let max = state.settings.api.max_page_size;
    let limit = super::page_limit(q.limit.as_deref(), max)?;
    let cursor = q
        .cursor
        .as_deref()
        .map(|c| Uuid::parse_str(c).map_err(|_| ApiError::invalid("cursor", "not a cursor this API gave")))
        .transpose()?;

    let mut b = sqlx::QueryBuilder::new(
        "select id, kind, reference, status, lane, created_at, served_at from item where agency_id = ",
    );
    b.push_bind(agency.id);
    if let Some(s) = &q.status {
        b.push(" and status = ").push_bind(s);
    }
    if let Some(k) = &q.kind {
        b.push(" and kind = ").push_bind(k);
    }
    if let Some(r) = &q.reference {
        b.push(" and reference = ").push_bind(r);
    }
    if let Some(t) = after {
        b.push(" and created_at > ").push_bind(t);
    }
    if let Some(t) = before {
        b.push(" and created_at < ").push_bind(t);
    }
    if let Some(c) = cursor {
        b.push(" and id < ").push_bind(c);
    }
    b.push(" order by id desc limit ").push_bind(limit + 1);
    let mut items: Vec<ListEntry> = b.build_query_as().fetch_all(&state.pool).await?;
    let more = items.len() as i64 > limit;
    items.truncate(limit as usize);
    let next_cursor = if more { items.last().map(|r| r.id.to_string()) } else { None };
    Ok(Json(ListPage { items, next_cursor }))
}

#[utoipa::path(get, path = "/v1/templates", tag = "agency",
    responses((status = 200, description = "Templates by name", body = BTreeMap<String, templates::Manifest>)),
    security(("agency_key" = [])))]
pub async fn templates(State(state): State<AppState>, _agency: Agency) -> Json<BTreeMap<String, templates::Manifest>> {
    Json(state.templates.manifests().clone())
}

/// A notice fixed at submission: its channel, and what workers will send.
pub struct Notice {
    pub channel: &'static str,
    pub fixed: crate::channels::Notice,
}

impl Notice {
    fn sms(phone: &str, e: crate::sms::Encoded) -> Notice {
        Notice {
            channel: "sms",
            fixed: crate::channels::Notice {
                address: phone.to_string(),
                subject: None,
                text: e.text,
                html: None,
                encoding: Some(e.encoding.as_str().into()),
                segments: Some(e.segments as i32),
            },
        }
    }

    fn email(address: &str, e: &crate::templates::EmailNotice) -> Notice {
        Notice {
            channel: "email",
            fixed: crate::channels::Notice {
                address: address.to_string(),
                subject: Some(e.subject.clone()),
                text: e.text.clone(),
                html: Some(e.html.clone()),
                encoding: None,
                segments: None,
            },
        }
    }

    /// What SubmissionAcceptance fixes about it.
    fn digest(&self) -> Value {
        let mut d = serde_json::json!({ "to": self.fixed.address, "text_sha256": evidence::sha256_hex(self.fixed.text.as_bytes()) });
        if let Some(h) = &self.fixed.html {
            d["html_sha256"] = evidence::sha256_hex(h.as_bytes()).into();
        }
        if let Some(n) = self.fixed.segments {
            d["segments"] = n.into();
            d["encoding"] = self.fixed.encoding.clone().into();
        }
        d
    }
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecallRequest {
    /// Why the agency withdraws the item (recorded in the evidence; 1–500 characters).
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RecallResponse {
    pub id: Uuid,
    pub status: String,
    pub recalled: Recalled,
    /// Steps stopped by the recall.
    pub cancelled_steps: Vec<String>,
    /// The Recall record (absent when the item was recalled before: a repeated recall changes
    /// nothing).
    pub evidence: Option<crate::evidence::Appended>,
}

#[utoipa::path(post, path = "/v1/correspondence/{id}/recall", tag = "agency",
    params(("id" = Uuid, Path, description = "Item id")),
    request_body(content = RecallRequest, description = "Optional: the reason"),
    responses(
        (status = 200, description = "Recalled (or recalled before)", body = RecallResponse),
        (status = 404, description = "No such item of this agency", body = super::error::Problem),
        (status = 409, description = "The item is already served and cannot be recalled", body = super::error::Problem)),
    security(("agency_key" = [])))]
pub async fn recall(
    State(state): State<AppState>,
    agency: Agency,
    Path(id): Path<String>,
    body: Option<JsonBody<RecallRequest>>,
) -> ApiResult<Json<RecallResponse>> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    let reason = body.and_then(|b| b.value.reason).map(|r| r.trim().to_string()).filter(|r| !r.is_empty());
    if let Some(r) = &reason {
        if r.chars().count() > 500 || r.chars().any(|c| c.is_control() && c != '\n') {
            return Err(ApiError::invalid("reason", "at most 500 characters, no control characters"));
        }
    }
    let mut tx = state.pool.begin().await?;
    // Lock order everywhere: item row, then attempts and letter.
    #[allow(clippy::type_complexity)]
    let row: Option<(Option<DateTime<Utc>>, Option<String>, Option<DateTime<Utc>>, Option<String>, String)> =
        sqlx::query_as(
            "select served_at, served_rule, recalled_at, recall_reason, status from item
             where id = $1 and agency_id = $2 for no key update",
        )
        .bind(id)
        .bind(agency.id)
        .fetch_optional(&mut *tx)
        .await?;
    let (served_at, served_rule, recalled_at, recall_reason, status) = row.ok_or(ApiError::NotFound)?;
    if let Some(at) = recalled_at {
        return Ok(Json(RecallResponse {
            id,
            status,
            recalled: Recalled { at, reason: recall_reason },
            cancelled_steps: Vec::new(),
            evidence: None,
        }));
    }
    if let Some(served_at) = served_at {
        return Err(ApiError::Conflict {
            field: None,
            detail: format!(
                "the item was served at {} by rule {:?}: a served item cannot be recalled; send a new item to \
                 correct or annul it",
                evidence::format_time(served_at),
                served_rule.unwrap_or_default()
            ),
        });
    }
    // A deemed-service time that has passed served the item, even before a scheduler records it.
    let deemed_due: Option<DateTime<Utc>> = sqlx::query_scalar(
        "select due_at from timer where item_id = $1 and kind = 'deemed' and fired_at is null and due_at <= now()",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(due) = deemed_due {
        return Err(ApiError::Conflict {
            field: None,
            detail: format!(
                "the item was deemed served at {} (rule \"deemed\"): a served item cannot be recalled",
                evidence::format_time(due)
            ),
        });
    }
    let at = evidence::now();
    // Steps in id order, as the workers lock them (item, step, attempt everywhere).
    sqlx::query(
        "select 1 from step where item_id = $1 and status in ('scheduled', 'queued') order by id for no key update",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    let cancelled: Vec<(String, String)> = sqlx::query_as(
        "update step s set status = 'cancelled', note = 'recalled by the sender', updated_at = now()
         from step old where s.id = old.id and s.item_id = $1 and s.status in ('scheduled', 'queued')
         returning s.channel, old.status",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    sqlx::query(
        "update attempt set status = 'cancelled', detail = 'recalled by the sender', finished_at = now()
         where item_id = $1 and status = 'queued'",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    let letter: Option<(String, String)> = sqlx::query_as(
        "with old as (select item_id, status from letter where item_id = $1 for update)
         update letter l set status = case when old.status = 'ready' then 'recalled' else l.status end,
                updated_at = now()
         from old, postal_operator o where l.item_id = old.item_id and o.id = l.operator_id
         returning old.status, o.code",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    sqlx::query(
        "update item set status = 'recalled', recalled_at = $2, recall_reason = $3, updated_at = now() where id = $1",
    )
    .bind(id)
    .bind(at)
    .bind(&reason)
    .execute(&mut *tx)
    .await?;
    let mut details = serde_json::json!({
        "reason": reason,
        "cancelled_steps": cancelled.iter().map(|(c, s)| serde_json::json!({ "channel": c, "was": s })).collect::<Vec<_>>(),
    });
    if let Some((was, operator)) = &letter {
        details["letter"] = if was == "ready" {
            serde_json::json!({ "operator": operator, "withdrawn": true })
        } else {
            // Already with the operator: the paper cannot be called back from here.
            serde_json::json!({ "operator": operator, "withdrawn": false, "letter_status": was })
        };
    }
    let ctx = ItemContext::load(&mut tx, id).await?;
    let appended = evidence::append(
        &mut tx,
        &ctx,
        vec![NewEvidence {
            event: Event::Recall,
            at,
            actor: Actor::Agency(agency.code.clone()),
            channel: None,
            details,
            digests: None,
        }],
    )
    .await?;
    tx.commit().await?;
    tracing::info!(item_id = %id, agency = agency.code, cancelled = cancelled.len(), "recalled");
    Ok(Json(RecallResponse {
        id,
        status: "recalled".into(),
        recalled: Recalled { at, reason },
        cancelled_steps: cancelled.into_iter().map(|(c, _)| c).collect(),
        evidence: appended.into_iter().next(),
    }))
}
