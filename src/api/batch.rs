//! Many submissions in one request: `POST /v1/correspondence/batch`.
//!
//! An agency with thousands of items sends them in requests of up to [`MAX_BATCH_ITEMS`]. Each
//! item is the body `POST /v1/correspondence` takes, plus its own `idempotency_key`: the same
//! key space, so an item sent alone and then in a batch (or the other way round) with the same
//! body is one item, and a retry of a batch returns the items it already wrote.
//!
//! A batch is checked whole before anything is written: a key used before for another body
//! answers `409`, a bad item `422`, each naming every item at fault (`items[3].recipient.pinfl`),
//! and nothing is written. A batch that passes is written through the same group commit as
//! single submissions ([`super::intake`]), each item with its own claim, rows and evidence, and
//! answered `202` once every item is committed, one answer per item in the order sent.
//!
//! The items of a batch travel in the bulk lane (DESIGN invariant 5): their delivery queues are
//! not the ones items sent on their own travel in, so a batch of thousands never stands ahead
//! of another agency's summons.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::{stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::auth::Agency;
use super::correspondence::{self, Seen, SubmitRequest, SubmitResponse};
use super::error::ItemProblem;
use super::{ApiError, ApiResult, AppState, JsonBody};
use crate::domain::Lane;

/// Items in one batch, at most.
pub const MAX_BATCH_ITEMS: usize = 1000;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// 1 to 1,000 items, each a `POST /v1/correspondence` body with an `idempotency_key`. They
    /// travel in the bulk lane: `lane` may be left out or be `bulk`, not `standard`.
    #[schema(value_type = Vec<BatchItem>)]
    pub items: Vec<Value>,
}

/// One item of a batch: a `POST /v1/correspondence` body with its `idempotency_key`.
// For the OpenAPI document only: items are read one by one, so that an error names the item.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct BatchItem {
    /// Unique per item among the agency's submissions, single or batched; reused on retries.
    pub idempotency_key: String,
    #[serde(flatten)]
    pub submission: SubmitRequest,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchResponse {
    /// One answer per item, in the order sent: what `POST /v1/correspondence` answers for it.
    pub items: Vec<SubmitResponse>,
}

/// An item as read from the batch: its key, and the digest its replays compare.
struct Item {
    key: String,
    request_sha256: String,
}

#[utoipa::path(post, path = "/v1/correspondence/batch", tag = "agency",
    request_body = BatchRequest,
    responses(
        (status = 202, description = "Every item accepted and committed; one answer per item, in order", body = BatchResponse),
        (status = 400, description = "Malformed JSON", body = super::error::Problem),
        (status = 401, description = "Missing or invalid API key", body = super::error::Problem),
        (status = 409, description = "Keys used before for other bodies, each in `errors`; nothing written", body = super::error::Problem),
        (status = 413, description = "Body too large", body = super::error::Problem),
        (status = 422, description = "Invalid items, each in `errors` with its field (`items[3].reference`); nothing written", body = super::error::Problem),
        (status = 503, description = "Writing failed part way (`detail` names the item): other items may be committed; send the same batch again", body = super::error::Problem)),
    security(("agency_key" = [])))]
pub async fn submit(
    State(state): State<AppState>,
    agency: Agency,
    body: JsonBody<BatchRequest>,
) -> ApiResult<Response> {
    // The parsed body as sent is not needed past here: only the items, read one by one.
    let JsonBody { value: BatchRequest { items: raw }, .. } = body;
    if raw.is_empty() || raw.len() > MAX_BATCH_ITEMS {
        return Err(ApiError::invalid("items", format!("1 to {MAX_BATCH_ITEMS} items")));
    }
    let n = raw.len();
    let (items, bodies, invalid) = read(raw);
    if !invalid.is_empty() {
        return Err(invalid_items(n, invalid));
    }

    // Keys seen before: the same body is a replay of that item, another body a conflict.
    let asked: Vec<(&str, &str)> = items.iter().map(|i| (i.key.as_str(), i.request_sha256.as_str())).collect();
    let before = correspondence::seen(&mut *state.pool.acquire().await?, agency.id, &asked).await?;
    let conflicts: Vec<ItemProblem> = before
        .iter()
        .enumerate()
        .filter(|(_, seen)| matches!(seen, Seen::OtherBody))
        .map(|(i, _)| ItemProblem::new(format!("items[{i}].idempotency_key"), used_elsewhere()))
        .collect();
    if !conflicts.is_empty() {
        return Err(ApiError::Items {
            status: StatusCode::CONFLICT,
            detail: format!(
                "{} of {n} items have a key used before with another body; nothing was written",
                conflicts.len()
            ),
            errors: conflicts,
        });
    }
    let mut answers: Vec<Option<SubmitResponse>> = Vec::with_capacity(n);
    let mut new_bodies = Vec::with_capacity(n);
    for (body, seen) in bodies.into_iter().zip(before) {
        match seen {
            Seen::Answer(answer) => answers.push(Some(*answer)),
            Seen::New | Seen::InFlight | Seen::OtherBody => {
                answers.push(None);
                new_bodies.push(body);
            }
        }
    }

    // A batch shares the grouped reads and writes with everyone else's requests, so it never
    // has more in their queues than they take at once: a request made meanwhile waits for at
    // most that much of the batch, not for all of it.
    let at_once = state.settings.api.group_items.max(1) * state.settings.api.group_concurrency.max(1);

    // Every new item checked, its recipient read and its content rendered, before any is written.
    let positions: Vec<usize> = (0..n).filter(|&i| answers[i].is_none()).collect();
    let (state, agency, items) = (&state, &agency, &items);
    let planned: Vec<_> = stream::iter(positions.iter().copied().zip(new_bodies))
        .map(|(i, body)| correspondence::plan(state, agency, &items[i].key, &items[i].request_sha256, body, Lane::Bulk))
        .buffered(at_once)
        .collect()
        .await;
    let mut plans = Vec::with_capacity(planned.len());
    let mut invalid = Vec::new();
    for (&i, p) in positions.iter().zip(planned) {
        match p {
            Ok(p) => plans.push(p),
            Err(ApiError::Invalid(e)) => invalid.push(ItemProblem::new(under(i, &e.field), e.message)),
            Err(ApiError::TooLarge(detail)) => return Err(ApiError::TooLarge(format!("items[{i}]: {detail}"))),
            Err(e) => return Err(e),
        }
    }
    if !invalid.is_empty() {
        return Err(invalid_items(n, invalid));
    }

    // Written together with whatever else is being submitted; answered once all are committed.
    let written: Vec<_> =
        stream::iter(plans).map(|p| correspondence::write(state, p)).buffered(at_once).collect().await;
    let mut claimed_alongside = Vec::new();
    for (&i, w) in positions.iter().zip(written) {
        match w {
            Ok(Some(answer)) => answers[i] = Some(answer),
            Ok(None) => claimed_alongside.push(i),
            // Items are committed in groups: those before the failure stay, and the retry of the
            // same batch answers them and writes the rest.
            Err(e) => {
                let why = match &e {
                    ApiError::Internal(cause) => {
                        tracing::error!(error = format!("{cause:#}"), item = i, "writing a batch failed");
                        "an internal error".to_string()
                    }
                    other => other.detail(),
                };
                return Err(ApiError::Unavailable(format!(
                    "writing items[{i}] failed ({why}); other items may be committed: send the same batch again, \
                     and each item is written once"
                )));
            }
        }
    }
    // Keys a request made alongside claimed first: its answer, if it was for the same body.
    if !claimed_alongside.is_empty() {
        let asked: Vec<(&str, &str)> = claimed_alongside.iter().map(|&i| asked[i]).collect();
        let now = correspondence::seen(&mut *state.pool.acquire().await?, agency.id, &asked).await?;
        for (&i, seen) in claimed_alongside.iter().zip(now) {
            match seen {
                Seen::Answer(answer) => answers[i] = Some(*answer),
                Seen::OtherBody => {
                    return Err(ApiError::Items {
                        status: StatusCode::CONFLICT,
                        detail: format!(
                            "items[{i}]'s key was just used by another request with another body; \
                             the other items are committed, and a retry of this batch without it returns them"
                        ),
                        errors: vec![ItemProblem::new(format!("items[{i}].idempotency_key"), used_elsewhere())],
                    })
                }
                Seen::New | Seen::InFlight => return Err(in_progress(i)),
            }
        }
    }
    let answers: Vec<SubmitResponse> = answers
        .into_iter()
        .collect::<Option<_>>()
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("a batch item was left without an answer")))?;
    tracing::info!(agency = agency.code, items = n, "batch accepted");
    Ok((StatusCode::ACCEPTED, Json(BatchResponse { items: answers })).into_response())
}

/// Reads each item: its key (1 to 200 visible ASCII characters, unique in the batch) and its
/// body, with the failing field of each bad one.
fn read(raw: Vec<Value>) -> (Vec<Item>, Vec<SubmitRequest>, Vec<ItemProblem>) {
    let mut items = Vec::with_capacity(raw.len());
    let mut bodies = Vec::with_capacity(raw.len());
    let mut invalid = Vec::new();
    let mut first_of: HashMap<String, usize> = HashMap::new();
    for (i, mut value) in raw.into_iter().enumerate() {
        let Some(object) = value.as_object_mut() else {
            invalid.push(ItemProblem::new(format!("items[{i}]"), "an item is a JSON object"));
            continue;
        };
        let key = match object.remove("idempotency_key") {
            None => Err("required: a unique value per item, reused on retries".to_string()),
            Some(Value::String(k)) => correspondence::check_key(&k).map(str::to_string).map_err(str::to_string),
            Some(_) => Err("a string".to_string()),
        };
        let key = match key {
            Ok(k) => match first_of.get(&k) {
                Some(first) => Err(format!("the same key as items[{first}]: each item needs its own")),
                None => {
                    first_of.insert(k.clone(), i);
                    Ok(k)
                }
            },
            Err(e) => Err(e),
        };
        // What a replay compares: the item without its key, as `POST /v1/correspondence` would
        // have had it.
        let request_sha256 = correspondence::request_digest(&mut value);
        let body = serde_path_to_error::deserialize::<_, SubmitRequest>(&value)
            .map_err(|e| {
                let path = e.path().to_string();
                (if path == "." { String::new() } else { path }, e.into_inner().to_string())
            })
            .and_then(|body| match body.lane {
                // A batch is the flood the bulk lane keeps away from items sent on their own.
                Some(Lane::Standard) => Err((
                    "lane".to_string(),
                    "the items of a batch travel in the bulk lane: send an item that must not wait behind \
                     bulk sends on its own, with POST /v1/correspondence"
                        .to_string(),
                )),
                _ => Ok(body),
            });
        match (key, body) {
            (Ok(key), Ok(body)) => {
                items.push(Item { key, request_sha256 });
                bodies.push(body);
            }
            (key, body) => {
                if let Err(e) = key {
                    invalid.push(ItemProblem::new(format!("items[{i}].idempotency_key"), e));
                }
                if let Err((field, e)) = body {
                    invalid.push(ItemProblem::new(under(i, &field), e));
                }
            }
        }
    }
    (items, bodies, invalid)
}

/// A field of item `i`: `items[3].recipient.pinfl`, or `items[3]` for the item as a whole.
fn under(i: usize, field: &str) -> String {
    if field.is_empty() {
        format!("items[{i}]")
    } else {
        format!("items[{i}].{field}")
    }
}

fn invalid_items(n: usize, errors: Vec<ItemProblem>) -> ApiError {
    let bad =
        errors.iter().map(|e| e.field.split('.').next().unwrap_or_default()).collect::<std::collections::HashSet<_>>();
    ApiError::Items {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        detail: format!("{} of {n} items are invalid; nothing was written", bad.len()),
        errors,
    }
}

fn used_elsewhere() -> String {
    "this key was used with a different request body".into()
}

fn in_progress(i: usize) -> ApiError {
    ApiError::Items {
        status: StatusCode::CONFLICT,
        detail: format!(
            "items[{i}]'s key is held by a request in progress; the batch's other new items are committed, \
             and a retry of the batch returns them"
        ),
        errors: vec![ItemProblem::new(format!("items[{i}].idempotency_key"), "a request with this key is in progress")],
    }
}
