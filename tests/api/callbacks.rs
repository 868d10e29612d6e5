//! Agency callbacks against a real HTTP receiver: signatures it can verify, retries with
//! backoff when it fails, replay, and a dead or slow receiver never holding up delivery.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{citizen_token, summons, Options, TestApp};

#[derive(Debug, Clone)]
struct Call {
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Call {
    fn header(&self, name: &str) -> String {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// An agency's callback endpoint: records every call; can fail the first N, or be slow.
#[derive(Clone, Default)]
struct Receiver {
    calls: Arc<Mutex<Vec<Call>>>,
    fail_first: Arc<AtomicUsize>,
    delay_ms: Arc<AtomicU64>,
}

impl Receiver {
    async fn start(&self) -> String {
        let me = self.clone();
        let app = axum::Router::new().route(
            "/hooks/dalil",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let me = me.clone();
                async move {
                    let delay = me.delay_ms.load(Ordering::SeqCst);
                    if delay > 0 {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                    }
                    me.calls.lock().unwrap().push(Call { headers, body: body.to_vec() });
                    let failing =
                        me.fail_first.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
                    if failing {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::NO_CONTENT
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks/dalil", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    async fn wait_for(&self, what: &str, check: impl Fn(&[Call]) -> bool) -> Vec<Call> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let calls = self.calls();
            if check(&calls) {
                return calls;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}; got {} calls", calls.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn types(calls: &[Call]) -> Vec<String> {
    calls.iter().map(|c| c.header("dalil-event-type")).collect()
}

async fn register(app: &TestApp, key: &str, url: &str, events: Value) -> Value {
    let r = app
        .client
        .post(app.url("/v1/callbacks"))
        .bearer_auth(key)
        .json(&json!({ "url": url, "events": events }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    r.json().await.unwrap()
}

/// Asks for every event since `since` again.
async fn replay(app: &TestApp, key: &str, since: chrono::DateTime<chrono::Utc>) -> reqwest::Response {
    app.client
        .post(app.url("/v1/callbacks/replay"))
        .bearer_auth(key)
        .json(&json!({ "since": since.to_rfc3339() }))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_are_signed_and_the_receiver_verifies_them() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-hooks").await;
    let receiver = Receiver::default();
    let url = receiver.start().await;
    let endpoint = register(&app, &key, &url, json!(["accepted", "consigned", "opened", "served"])).await;
    let secret = endpoint["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));
    // The secret is shown once: never in a list.
    let listed: Value = app.get("/v1/callbacks", &key).await.json().await.unwrap();
    assert_eq!(listed["endpoints"][0]["url"], url);
    assert!(!listed.to_string().contains(&secret));

    let (pinfl, _) = app.citizen("3010190223456").await;
    let token = citizen_token(&app, pinfl.as_str());
    let v: Value = app.submit(&key, "h-1", &summons(pinfl.as_str())).await.json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    app.wait_for_status(&key, &id, &["consigned"]).await;
    assert_eq!(app.get(&format!("/v1/inbox/{id}"), &token).await.status(), 200);

    let calls = receiver.wait_for("four events", |c| c.len() >= 4).await;
    let mut got = types(&calls);
    got.sort();
    assert_eq!(got, ["accepted", "consigned", "opened", "served"]);
    let now = chrono::Utc::now().timestamp();
    for call in &calls {
        let (ts, sig) = (call.header("dalil-timestamp"), call.header("dalil-signature"));
        assert!(dalil::callbacks::verify(&secret, &ts, &sig, &call.body, now), "signature of {call:?}");
        // Anyone without the secret, or a changed body, fails.
        assert!(!dalil::callbacks::verify("whsec_wrong", &ts, &sig, &call.body, now));
        let mut tampered = call.body.clone();
        tampered[2] ^= 1;
        assert!(!dalil::callbacks::verify(&secret, &ts, &sig, &tampered, now));
        // A replay of the same call much later is refused by its timestamp.
        assert!(!dalil::callbacks::verify(&secret, &ts, &sig, &call.body, now + 3600));
        let body = call.json();
        assert_eq!(body["item"]["id"], id.as_str());
        assert_eq!(body["item"]["reference"], "2-1234/2026");
        assert_eq!(body["id"], call.header("dalil-event-id"));
        assert_eq!(body["type"], call.header("dalil-event-type"));
    }
    let served = calls.iter().find(|c| c.header("dalil-event-type") == "served").unwrap().json();
    assert_eq!(served["served"]["rule"], "accessed");
    assert_eq!(served["evidence"]["event"], "ContentAccessTracking");

    // The log of calls, with each attempt. The caller marks a call delivered just after the
    // receiver answered: wait for that.
    let mut log = Value::Null;
    for _ in 0..100 {
        log = app.get("/v1/callbacks/deliveries", &key).await.json().await.unwrap();
        if log["deliveries"].as_array().unwrap().iter().all(|d| d["status"] == "delivered") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deliveries = log["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 4);
    for d in deliveries {
        assert_eq!(d["status"], "delivered", "{d}");
        assert_eq!(d["attempts"][0]["status_code"], 204);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_is_retried_with_backoff_then_replayed() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-retry").await;
    let receiver = Receiver::default();
    receiver.fail_first.store(2, Ordering::SeqCst);
    let url = receiver.start().await;
    register(&app, &key, &url, json!(["accepted"])).await;
    let since = chrono::Utc::now() - chrono::Duration::seconds(1);
    let (pinfl, _) = app.citizen("3010190223457").await;
    let v: Value = app.submit(&key, "r-1", &summons(pinfl.as_str())).await.json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_string();

    // 503, 503, then 204: the same event each time, through the retry queues.
    let calls = receiver.wait_for("three tries", |c| c.len() >= 3).await;
    let event_ids: Vec<String> = calls.iter().map(|c| c.header("dalil-event-id")).collect();
    assert!(event_ids.iter().all(|e| e == &event_ids[0]), "{event_ids:?}");
    // Attempts are numbered; RabbitMQ may hand a copy out twice (at-least-once), so a number
    // may repeat, but never out of order.
    let mut attempts: Vec<String> = calls.iter().map(|c| c.header("dalil-attempt")).collect();
    attempts.dedup();
    assert_eq!(attempts[..3], ["1", "2", "3"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let delivery = loop {
        let log: Value = app.get(&format!("/v1/callbacks/deliveries?item_id={id}"), &key).await.json().await.unwrap();
        let d = log["deliveries"][0].clone();
        if d["status"] == "delivered" {
            break d;
        }
        assert!(tokio::time::Instant::now() < deadline, "{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let codes: Vec<i64> =
        delivery["attempts"].as_array().unwrap().iter().map(|a| a["status_code"].as_i64().unwrap()).collect();
    assert_eq!(codes, [503, 503, 204]);

    // Replay: the agency asks again for everything since a time; same event id, new delivery.
    let r = replay(&app, &key, since).await;
    assert_eq!(r.status(), 202);
    assert_eq!(r.json::<Value>().await.unwrap()["queued"], 1);
    let calls = receiver.wait_for("the replayed call", |c| c.len() >= 4).await;
    assert_eq!(calls[3].header("dalil-event-id"), event_ids[0]);
    let log: Value = app.get("/v1/callbacks/deliveries", &key).await.json().await.unwrap();
    assert!(log["deliveries"].as_array().unwrap().iter().any(|d| d["replay"] == true));

    // Bad replays change nothing.
    let r = replay(&app, &key, chrono::Utc::now() + chrono::Duration::days(1)).await;
    assert_eq!(r.status(), 422);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_slow_receiver_never_delays_delivery() {
    let app = TestApp::spawn_with(Options { tweak: |s| s.callbacks.timeout_ms = 1500, ..Default::default() }).await;
    let key = app.agency("court-slow").await;
    let slow = Receiver::default();
    slow.delay_ms.store(10_000, Ordering::SeqCst);
    let url = slow.start().await;
    register(&app, &key, &url, json!([])).await;
    // And one endpoint where nothing listens at all.
    register(&app, &key, "http://127.0.0.1:9/hooks", json!([])).await;

    let started = std::time::Instant::now();
    let mut ids = Vec::new();
    for i in 0..5 {
        let (pinfl, _) = app.citizen(&format!("30101902234{:02}", 60 + i)).await;
        let v: Value = app.submit(&key, &format!("s-{i}"), &summons(pinfl.as_str())).await.json().await.unwrap();
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        app.wait_for_status(&key, id, &["consigned"]).await;
    }
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(8), "deliveries waited on callbacks: {elapsed:?}");
    // The calls are being tried, and fail with the reason logged.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log: Value = app.get("/v1/callbacks/deliveries?limit=200", &key).await.json().await.unwrap();
        let errors: Vec<String> = log["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|d| {
                d["attempts"].as_array().unwrap().iter().filter_map(|a| a["error"].as_str().map(String::from))
            })
            .collect();
        if errors.iter().any(|e| e == "timed out") && errors.iter().any(|e| e.starts_with("could not connect")) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{errors:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_callback_registrations_are_refused() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-bad-hooks").await;
    for (body, field) in [
        (json!({ "url": "ftp://agency.uz/x" }), "url"),
        (json!({ "url": "not a url" }), "url"),
        (json!({ "url": "https://agency.uz/x", "events": ["delivered"] }), "events"),
    ] {
        let r = app.client.post(app.url("/v1/callbacks")).bearer_auth(&key).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 422, "{body}");
        assert_eq!(r.json::<Value>().await.unwrap()["field"], field);
    }
    assert_eq!(app.count("select count(*) from callback_endpoint").await, 0);
    // Another agency cannot remove this one's endpoint.
    let created = register(&app, &key, "https://agency.uz/hooks", json!([])).await;
    let other = app.agency("other-agency").await;
    let path = format!("/v1/callbacks/{}", created["id"].as_str().unwrap());
    let r = app.client.delete(app.url(&path)).bearer_auth(&other).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = app.client.delete(app.url(&path)).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 204);
}

/// An event is recorded only when one of its own agency's endpoints subscribes to its type as
/// it happens (otherwise it would be a copy of its evidence record that nobody reads), and a
/// replay sends the recorded events to the endpoints that subscribe to them now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_is_recorded_only_for_the_endpoints_that_subscribe_to_it() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-quiet").await;
    let other = app.agency("court-other").await;
    let receiver = Receiver::default();
    let url = receiver.start().await;
    // Another agency's endpoint, subscribed to everything, records nothing for this one.
    register(&app, &other, &url, json!([])).await;
    let since = chrono::Utc::now() - chrono::Duration::seconds(1);
    let (pinfl, _) = app.citizen("3010190223458").await;
    let events_of = |id: String| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("select type from callback_event where item_id = $1::uuid order by type")
                .bind(id)
                .fetch_all(&pool)
                .await
                .unwrap()
        }
    };

    let v: Value = app.submit(&key, "q-1", &summons(pinfl.as_str())).await.json().await.unwrap();
    let unheard = v["id"].as_str().unwrap().to_string();
    app.wait_for_status(&key, &unheard, &["consigned"]).await;
    let records = app.count(&format!("select count(*) from evidence where item_id = '{unheard}'")).await;
    assert_eq!(records, 2, "SubmissionAcceptance and ContentConsignment");
    assert!(events_of(unheard.clone()).await.is_empty());

    // Subscribed to `consigned` only: that event is recorded and called; `accepted` is not.
    register(&app, &key, &url, json!(["consigned"])).await;
    let v: Value = app.submit(&key, "q-2", &summons(pinfl.as_str())).await.json().await.unwrap();
    let heard = v["id"].as_str().unwrap().to_string();
    app.wait_for_status(&key, &heard, &["consigned"]).await;
    let calls = receiver.wait_for("the consigned call", |c| !c.is_empty()).await;
    assert_eq!(types(&calls), ["consigned"]);
    assert_eq!(calls[0].json()["item"]["id"], heard.as_str());
    assert_eq!(events_of(heard.clone()).await, ["consigned"]);

    // An endpoint added later, for everything, is sent the recorded event by a replay, and so
    // is the first endpoint again: two calls, none for what was never recorded.
    register(&app, &key, &url, json!([])).await;
    let r = replay(&app, &key, since).await;
    assert_eq!(r.status(), 202);
    assert_eq!(r.json::<Value>().await.unwrap()["queued"], 2);
    let calls = receiver.wait_for("the two replayed calls", |c| c.len() >= 3).await;
    assert!(calls.iter().all(|c| c.json()["item"]["id"] == heard.as_str()), "{:?}", types(&calls));
}
