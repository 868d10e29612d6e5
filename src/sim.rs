//! `dalil sim sms-gateway`: an SMS gateway simulator that behaves like a real one. It accepts
//! messages (idempotently by `client_ref`), answers with provider ids, posts delivery reports
//! after a delay (retrying while the platform answers non-2xx), and can be told to fail: 5xx,
//! timeouts, rejections, slow reports — for a number of requests or until told otherwise.
//!
//! `GET /api/v1/messages` lists what it received; `POST /control` changes its behaviour;
//! every accepted message is printed, so the demo shows each SMS as a phone would.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::channels::sms::{SendRequest, SendResponse};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    #[default]
    None,
    /// Answer 503.
    ServerError,
    /// Never answer (the client times out).
    Timeout,
    /// Refuse the message (422): a permanent failure.
    Reject,
}

/// How the simulator behaves; `POST /control` replaces it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Behaviour {
    pub fail: FailMode,
    /// Fail only this many requests, then recover; `null`: until told otherwise.
    pub fail_count: Option<u32>,
    /// Delay before the delivery report.
    pub report_delay_ms: u64,
    /// The status reports carry: delivered, undelivered, expired, rejected.
    pub report_status: String,
    /// Send every report twice (duplicate reports must be harmless).
    pub duplicate_reports: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            fail: FailMode::None,
            fail_count: None,
            report_delay_ms: 300,
            report_status: "delivered".into(),
            duplicate_reports: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Received {
    pub id: String,
    #[serde(flatten)]
    pub request: SendRequest,
    pub segments: i32,
    /// How many requests carried this client_ref (resends are answered, not re-sent).
    pub requests: u32,
    /// When the first request for it arrived.
    pub received_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Default)]
struct Inner {
    behaviour: Behaviour,
    messages: Vec<Received>,
    by_ref: HashMap<String, usize>,
    refused: u64,
}

#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Mutex<Inner>>,
    token: String,
    report_secret: String,
    http: reqwest::Client,
    quiet: bool,
}

impl Simulator {
    pub fn new(token: &str, report_secret: &str, quiet: bool) -> Simulator {
        Simulator {
            inner: Arc::default(),
            token: token.into(),
            report_secret: report_secret.into(),
            http: reqwest::Client::new(),
            quiet,
        }
    }

    pub async fn set(&self, b: Behaviour) {
        self.inner.lock().await.behaviour = b;
    }

    pub async fn messages(&self) -> Vec<Received> {
        self.inner.lock().await.messages.clone()
    }

    /// How many sends it has refused (failed on purpose).
    pub async fn refused(&self) -> u64 {
        self.inner.lock().await.refused
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/api/v1/messages", post(send).get(list))
            .route("/control", post(control).get(current))
            .with_state(self.clone())
    }

    pub async fn serve(self, listener: TcpListener, cancel: CancellationToken) -> anyhow::Result<()> {
        axum::serve(listener, self.router()).with_graceful_shutdown(async move { cancel.cancelled().await }).await?;
        Ok(())
    }
}

async fn send(State(sim): State<Simulator>, headers: HeaderMap, Json(req): Json<SendRequest>) -> Response {
    let authorised = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {}", sim.token));
    if !authorised {
        return (StatusCode::UNAUTHORIZED, Json(serde_json::json!({ "error": "bad token" }))).into_response();
    }
    let mut inner = sim.inner.lock().await;
    let failing = inner.behaviour.fail != FailMode::None && inner.behaviour.fail_count != Some(0);
    if failing {
        if let Some(n) = inner.behaviour.fail_count.as_mut() {
            *n -= 1;
        }
        inner.refused += 1;
        let mode = inner.behaviour.fail;
        drop(inner);
        return match mode {
            FailMode::ServerError => {
                (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({ "error": "gateway overloaded" })))
                    .into_response()
            }
            FailMode::Timeout => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                StatusCode::GATEWAY_TIMEOUT.into_response()
            }
            FailMode::Reject => {
                (StatusCode::UNPROCESSABLE_ENTITY, Json(serde_json::json!({ "error": "number blocked" })))
                    .into_response()
            }
            FailMode::None => unreachable!(),
        };
    }
    // Idempotent by client_ref: a resend is answered with the first id and not sent again.
    if let Some(&i) = inner.by_ref.get(&req.client_ref) {
        inner.messages[i].requests += 1;
        let m = &inner.messages[i];
        return Json(SendResponse { id: m.id.clone(), status: "accepted".into(), segments: Some(m.segments) })
            .into_response();
    }
    let id = format!("sim-{}", inner.messages.len() + 1);
    let segments = crate::sms::encode(&req.text).segments as i32;
    if !sim.quiet {
        println!("SMS {id} to {} ({segments} segment(s)) from {}: {}", req.to, req.from, req.text);
    }
    let index = inner.messages.len();
    inner.by_ref.insert(req.client_ref.clone(), index);
    inner.messages.push(Received {
        id: id.clone(),
        request: req.clone(),
        segments,
        requests: 1,
        received_at: chrono::Utc::now(),
    });
    let behaviour = inner.behaviour.clone();
    drop(inner);
    tokio::spawn(report(sim.clone(), id.clone(), req.client_ref.clone(), req.callback_url.clone(), behaviour));
    Json(SendResponse { id, status: "accepted".into(), segments: Some(segments) }).into_response()
}

/// Posts the delivery report, retrying with backoff while the platform does not take it.
async fn report(sim: Simulator, id: String, client_ref: String, url: String, b: Behaviour) {
    tokio::time::sleep(Duration::from_millis(b.report_delay_ms)).await;
    let body = serde_json::json!({
        "id": id, "client_ref": client_ref, "status": b.report_status, "at": chrono::Utc::now(),
    });
    let times = if b.duplicate_reports { 2 } else { 1 };
    for _ in 0..times {
        let mut wait = Duration::from_millis(200);
        for _ in 0..8 {
            let sent = sim.http.post(&url).bearer_auth(&sim.report_secret).json(&body).send().await;
            if sent.as_ref().is_ok_and(|r| r.status().is_success()) {
                break;
            }
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }
}

async fn list(State(sim): State<Simulator>) -> Json<Vec<Received>> {
    Json(sim.messages().await)
}

async fn control(State(sim): State<Simulator>, Json(b): Json<Behaviour>) -> Json<Behaviour> {
    if !sim.quiet {
        println!("control: {}", serde_json::to_string(&b).unwrap_or_default());
    }
    sim.set(b.clone()).await;
    Json(b)
}

async fn current(State(sim): State<Simulator>) -> Json<serde_json::Value> {
    let inner = sim.inner.lock().await;
    Json(
        serde_json::json!({ "behaviour": inner.behaviour, "accepted": inner.messages.len(), "refused": inner.refused }),
    )
}
