//! Liveness and readiness.

use std::time::Duration;

use axum::extract::State;
use axum::Json;
use secrecy::ExposeSecret;
use tokio::sync::Mutex;

use super::{ApiError, ApiResult, AppState};

/// Keeps one connection to RabbitMQ for readiness checks, reconnecting when it is lost.
#[derive(Default)]
pub struct BrokerProbe {
    conn: Mutex<Option<lapin::Connection>>,
}

impl BrokerProbe {
    pub async fn check(&self, url: &str) -> Result<(), String> {
        let mut guard = self.conn.lock().await;
        if guard.as_ref().is_some_and(|c| c.status().connected()) {
            return Ok(());
        }
        match tokio::time::timeout(Duration::from_secs(3), crate::queue::connect(url, "dalil-readyz")).await {
            Ok(Ok(c)) => {
                *guard = Some(c);
                Ok(())
            }
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err("RabbitMQ did not answer within 3 s".into()),
        }
    }
}

#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "The process is up")))]
pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "PostgreSQL and RabbitMQ answer"),
    (status = 503, description = "A dependency does not answer", body = super::error::Problem)))]
pub async fn readyz(State(state): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    let db = tokio::time::timeout(Duration::from_secs(3), sqlx::query("select 1").execute(&state.pool)).await;
    if !matches!(db, Ok(Ok(_))) {
        return Err(ApiError::Unavailable("PostgreSQL does not answer".into()));
    }
    state
        .broker
        .check(state.settings.amqp_url.expose_secret())
        .await
        .map_err(|e| ApiError::Unavailable(format!("RabbitMQ does not answer: {e}")))?;
    Ok(Json(serde_json::json!({ "status": "ready", "postgres": "ok", "rabbitmq": "ok" })))
}
