//! The HTTP API (axum): agencies send and follow correspondence, citizens read their inbox.
//! Every error is `application/problem+json` (see [`error`]).

pub mod auth;
pub mod batch;
pub mod callbacks;
pub mod correspondence;
pub mod error;
pub mod health;
pub mod inbox;
pub mod intake;
pub mod log;
pub mod lookup;
pub mod openapi;
pub mod postal;
pub mod providers;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequest, Request};
use axum::http::header;
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use sqlx::PgPool;
use tower_http::trace::TraceLayer;

use crate::config::Settings;
use crate::identity::Verifier;
use crate::policy::Policies;
use crate::templates::Templates;
pub use error::{ApiError, ApiResult};

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub settings: Arc<Settings>,
    pub templates: Arc<Templates>,
    pub policies: Arc<Policies>,
    pub identity: Arc<Verifier>,
    pub broker: Arc<health::BrokerProbe>,
    pub pages: Arc<crate::web::Pages>,
    /// Where submissions are written, together with those that arrive alongside.
    pub intake: intake::Intake,
    /// Where SMS delivery reports are written, likewise.
    pub reports: providers::Reports,
    /// Where agencies (by key) and recipients are read, together with reads made alongside.
    pub lookups: lookup::Lookups,
    /// Wakes this process's relay after a commit that wrote outbox rows.
    pub relay_wake: crate::outbox::Wake,
}

pub fn router(state: AppState) -> Router {
    let max_body = state.settings.api.max_body_bytes;
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/openapi.json", get(openapi::document))
        .route("/v1/correspondence", post(correspondence::submit).get(correspondence::list))
        .route("/v1/correspondence/batch", post(batch::submit))
        .route("/v1/correspondence/{id}", get(correspondence::get_one))
        .route("/v1/correspondence/{id}/recall", post(correspondence::recall))
        .route("/v1/callbacks", post(callbacks::create).get(callbacks::list))
        .route("/v1/callbacks/deliveries", get(callbacks::deliveries))
        .route("/v1/callbacks/replay", post(callbacks::replay))
        .route("/v1/callbacks/{id}", axum::routing::delete(callbacks::remove))
        .route("/v1/correspondence/{id}/proof", get(log::agency_bundle))
        .route("/v1/inbox/{id}/proof", get(log::citizen_bundle))
        .route("/v1/log/checkpoint", get(log::latest))
        .route("/v1/log/checkpoints/{size}", get(log::at_size))
        .route("/v1/log/proof/inclusion", get(log::inclusion))
        .route("/v1/log/proof/consistency", get(log::consistency))
        .route("/v1/log/keys", get(log::keys))
        .route("/v1/verify", post(log::verify))
        .route("/v1/providers/sms/{provider}/reports", post(providers::sms_report))
        .route("/v1/postal/batches", post(postal::claim))
        .route("/v1/postal/letters/{file}", get(postal::pdf))
        .route("/v1/postal/letters/{id}/events", post(postal::event))
        .route("/v1/postal/events", post(postal::bulk))
        .route("/metrics", get(log::metrics))
        .route("/v1/templates", get(correspondence::templates))
        .route("/v1/inbox", get(inbox::list))
        .route("/v1/inbox/{id}", get(inbox::open))
        .route("/v1/inbox/{id}/attachments/{n}", get(inbox::attachment))
        .route("/v1/inbox/{id}/acknowledge", post(inbox::acknowledge))
        .merge(crate::web::router())
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(max_body, refuse_declared_oversize))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// A body that says it is over the limit (`Content-Length`) gets its 413 at once, before a
/// byte of it is read; a body without a length is cut off at the limit as it is read.
async fn refuse_declared_oversize(
    axum::extract::State(max): axum::extract::State<usize>,
    req: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return axum::response::IntoResponse::into_response(ApiError::TooLarge(
            "the request body is larger than this server accepts".into(),
        ));
    }
    next.run(req).await
}

/// The `limit` of a list endpoint: 1 to `max`, 50 (or `max`) when absent.
pub fn page_limit(limit: Option<&str>, max: i64) -> ApiResult<i64> {
    match limit {
        None => Ok(50.min(max)),
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=max).contains(l))
            .ok_or_else(|| ApiError::invalid("limit", format!("a whole number from 1 to {max}"))),
    }
}

/// A JSON body, parsed with the failing field named: malformed JSON is a 400, a body of the
/// wrong shape a 422 naming the path (`recipient.pinfl`), an oversize body a 413.
pub struct JsonBody<T> {
    pub value: T,
    /// The body as sent, parsed: what the idempotency check compares.
    pub raw: serde_json::Value,
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|ct| ct.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json"))
            .unwrap_or(false);
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = match axum::body::Bytes::from_request(req, state).await {
            Ok(b) => b,
            Err(rejection) if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError::TooLarge("the request body is larger than this server accepts".into()))
            }
            Err(rejection) => return Err(ApiError::BadRequest { field: None, detail: rejection.body_text() }),
        };
        let raw: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::BadRequest { field: None, detail: format!("malformed JSON: {e}") })?;
        let value = serde_path_to_error::deserialize(&raw).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { String::new() } else { path };
            ApiError::invalid(field, e.into_inner().to_string())
        })?;
        Ok(JsonBody { value, raw })
    }
}

/// An optional JSON body: no body at all is `None`; a body must be JSON like any other.
impl<S: Send + Sync, T: DeserializeOwned> axum::extract::OptionalFromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Option<Self>, Self::Rejection> {
        let (parts, body) = req.into_parts();
        let bytes = match axum::body::Bytes::from_request(Request::from_parts(parts.clone(), body), state).await {
            Ok(b) => b,
            Err(rejection) if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError::TooLarge("the request body is larger than this server accepts".into()))
            }
            Err(rejection) => return Err(ApiError::BadRequest { field: None, detail: rejection.body_text() }),
        };
        if bytes.is_empty() {
            return Ok(None);
        }
        let req = Request::from_parts(parts, axum::body::Body::from(bytes));
        <JsonBody<T> as FromRequest<S>>::from_request(req, state).await.map(Some)
    }
}
