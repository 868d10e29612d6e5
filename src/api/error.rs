//! One error type for the whole API, answered as `application/problem+json` (RFC 9457).
//! Client errors name the failing field; everything unexpected is logged with its cause chain
//! and answered with an opaque 500.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::domain::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request cannot be read (malformed JSON, a missing header).
    #[error("bad request: {detail}")]
    BadRequest { field: Option<String>, detail: String },
    /// Well-formed but wrong: a field fails validation.
    #[error("unprocessable: {0}")]
    Invalid(FieldError),
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    #[error("not found")]
    NotFound,
    #[error("conflict: {detail}")]
    Conflict { field: Option<String>, detail: String },
    /// It existed and is gone for good (an item its sender withdrew).
    #[error("gone: {0}")]
    Gone(String),
    #[error("payload too large: {0}")]
    TooLarge(String),
    #[error("unsupported media type")]
    UnsupportedMediaType,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Several items of one request are at fault (`422` invalid, `409` conflicting), each named.
    #[error("{detail}")]
    Items { status: StatusCode, detail: String, errors: Vec<ItemProblem> },
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            // Stopping, or every connection busy for the pool's whole timeout: try again.
            sqlx::Error::PoolClosed => ApiError::Unavailable("the server is stopping: retry".into()),
            sqlx::Error::PoolTimedOut => ApiError::Unavailable("the database is busy: retry".into()),
            e => ApiError::Internal(e.into()),
        }
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::Invalid(e)
    }
}

impl ApiError {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> axum::http::StatusCode {
        use axum::http::StatusCode as S;
        match self {
            ApiError::BadRequest { .. } => S::BAD_REQUEST,
            ApiError::Invalid(_) => S::UNPROCESSABLE_ENTITY,
            ApiError::Unauthorized(_) => S::UNAUTHORIZED,
            ApiError::NotFound => S::NOT_FOUND,
            ApiError::Conflict { .. } => S::CONFLICT,
            ApiError::Gone(_) => S::GONE,
            ApiError::TooLarge(_) => S::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => S::UNSUPPORTED_MEDIA_TYPE,
            ApiError::MethodNotAllowed => S::METHOD_NOT_ALLOWED,
            ApiError::Unavailable(_) => S::SERVICE_UNAVAILABLE,
            ApiError::Items { status, .. } => *status,
            ApiError::Internal(_) => S::INTERNAL_SERVER_ERROR,
        }
    }

    /// What went wrong, for a per-row report: `field: message` for a bad field.
    pub fn detail(&self) -> String {
        match self {
            ApiError::Invalid(e) => format!("{}: {}", e.field, e.message),
            ApiError::BadRequest { detail, .. }
            | ApiError::Conflict { detail, .. }
            | ApiError::Items { detail, .. } => detail.clone(),
            ApiError::NotFound => "no such letter of this operator".into(),
            ApiError::Internal(_) => "internal error; nothing was changed".into(),
            other => other.to_string(),
        }
    }

    pub fn bad_request(field: impl Into<String>, detail: impl Into<String>) -> Self {
        ApiError::BadRequest { field: Some(field.into()), detail: detail.into() }
    }

    pub fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Self {
        ApiError::Invalid(FieldError::new(field, detail))
    }
}

/// The body of every error answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The request field at fault, as a dotted path (`recipient.pinfl`, `attachments[0].content`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Every field at fault when there are several (the items of a batch), the first of them
    /// also in `field`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<ItemProblem>,
}

/// One field at fault among several.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ItemProblem {
    /// The field, as a dotted path from the body's root (`items[3].recipient.pinfl`).
    pub field: String,
    pub detail: String,
}

impl ItemProblem {
    pub fn new(field: impl Into<String>, detail: impl Into<String>) -> Self {
        ItemProblem { field: field.into(), detail: detail.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut errors = Vec::new();
        let (status, slug, title, detail, field) = match self {
            ApiError::BadRequest { field, detail } => {
                (StatusCode::BAD_REQUEST, "bad-request", "Bad request", detail, field)
            }
            ApiError::Invalid(e) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation",
                "Invalid field",
                e.message,
                Some(e.field).filter(|f| !f.is_empty()),
            ),
            ApiError::Unauthorized(detail) => (StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized", detail, None),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not-found", "Not found", "no such resource".into(), None),
            ApiError::Conflict { field, detail } => (StatusCode::CONFLICT, "conflict", "Conflict", detail, field),
            ApiError::Gone(detail) => (StatusCode::GONE, "gone", "Gone", detail, None),
            ApiError::TooLarge(detail) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "too-large", "Payload too large", detail, None)
            }
            ApiError::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
                "send the body as application/json".into(),
                None,
            ),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "this resource does not take that method".into(),
                None,
            ),
            ApiError::Unavailable(detail) => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable", "Service unavailable", detail, None)
            }
            ApiError::Items { status, detail, errors: all } => {
                let (slug, title) = if status == StatusCode::CONFLICT {
                    ("conflict", "Conflict")
                } else {
                    ("validation", "Invalid field")
                };
                let field = all.first().map(|e| e.field.clone());
                errors = all;
                (status, slug, title, detail, field)
            }
            ApiError::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "Internal error",
                    "something went wrong on our side; nothing was changed if the request was a write".into(),
                    None,
                )
            }
        };
        let problem = Problem {
            kind: format!("https://dalil.uz/problems/{slug}"),
            title: title.into(),
            status: status.as_u16(),
            detail,
            field,
            errors,
        };
        let mut response = (status, axum::Json(problem)).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
