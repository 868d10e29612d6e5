//! Who is calling: an agency by its API key, a citizen by an identity-provider token.
//! API keys are random, shown once and stored as SHA-256: a leaked database reveals no key.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::{ApiError, AppState};
use crate::domain::Pinfl;

pub const KEY_PREFIX: &str = "dalil_";
pub const OPERATOR_KEY_PREFIX: &str = "dalilop_";

/// A new API key: (the secret to show once, its display prefix, its hash to store).
pub fn new_api_key() -> (String, String, Vec<u8>) {
    new_key(KEY_PREFIX)
}

/// A new key with the given prefix (agencies `dalil_`, postal operators `dalilop_`).
pub fn new_key(kind: &str) -> (String, String, Vec<u8>) {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let secret = format!("{kind}{}", hex::encode(bytes));
    let prefix = secret[..kind.len() + 8].to_string();
    let hash = Sha256::digest(secret.as_bytes()).to_vec();
    (secret, prefix, hash)
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let value = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| ApiError::Unauthorized("send Authorization: Bearer <key>".into()))?;
    let value = value.to_str().map_err(|_| ApiError::Unauthorized("malformed Authorization header".into()))?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => Ok(token.trim()),
        _ => Err(ApiError::Unauthorized("send Authorization: Bearer <key>".into())),
    }
}

/// The agency behind a valid, unrevoked API key.
#[derive(Debug, Clone)]
pub struct Agency {
    pub id: Uuid,
    pub code: String,
    pub name: String,
}

impl FromRequestParts<AppState> for Agency {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        // Read with the keys of requests made alongside (`super::lookup`).
        let (hash, denied) = presented(parts, KEY_PREFIX, "API key")?;
        match state.lookups.agency(hash.clone()).await? {
            Some(o) if bool::from(o.key_hash.ct_eq(&hash)) => Ok(Agency { id: o.id, code: o.code, name: o.name }),
            _ => Err(denied()),
        }
    }
}

/// The owner (id, code, name) of a presented key, looked up by the key's SHA-256 — keys are
/// stored only hashed — or a 401 that says which kind of key was expected.
async fn key_owner(
    parts: &Parts,
    state: &AppState,
    prefix: &str,
    sql: &str,
    what: &str,
) -> Result<(Uuid, String, String), ApiError> {
    let (hash, denied) = presented(parts, prefix, what)?;
    let row: Option<(Uuid, String, String, Vec<u8>)> =
        sqlx::query_as(sql).bind(&hash).fetch_optional(&state.pool).await?;
    match row {
        Some((id, code, name, stored)) if bool::from(stored.ct_eq(&hash)) => Ok((id, code, name)),
        _ => Err(denied()),
    }
}

/// The SHA-256 of the presented key, if it has the expected prefix, and the 401 to answer
/// when no unrevoked key has that hash.
fn presented<'a>(
    parts: &Parts,
    prefix: &str,
    what: &'a str,
) -> Result<(Vec<u8>, impl Fn() -> ApiError + 'a), ApiError> {
    let key = bearer(parts)?;
    let denied = move || ApiError::Unauthorized(format!("the {what} is unknown or revoked"));
    if !key.starts_with(prefix) || key.len() > 200 {
        return Err(denied());
    }
    Ok((Sha256::digest(key.as_bytes()).to_vec(), denied))
}

/// A citizen signed in through the identity provider.
#[derive(Debug, Clone)]
pub struct Citizen {
    pub pinfl: Pinfl,
}

impl FromRequestParts<AppState> for Citizen {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = bearer(parts)?;
        let pinfl = state.identity.verify(token, chrono::Utc::now().timestamp()).map_err(ApiError::Unauthorized)?;
        Ok(Citizen { pinfl })
    }
}

/// A postal operator behind a valid operator key.
#[derive(Debug, Clone)]
pub struct Operator {
    pub id: Uuid,
    pub code: String,
}

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let (id, code, _) = key_owner(
            parts,
            state,
            OPERATOR_KEY_PREFIX,
            "select o.id, o.code, o.name, k.key_hash from operator_key k join postal_operator o on o.id = k.operator_id
             where k.key_hash = $1 and k.revoked_at is null",
            "operator key",
        )
        .await?;
        Ok(Operator { id, code })
    }
}
