//! SMS and email notices: that an item waits, never its content; delivery reports; outages,
//! retries, permanent failures and dead letters.

use std::time::Duration;

use dalil::sim::{Behaviour, FailMode};
use serde_json::Value;

use crate::helpers::{summons, Options, TestApp};
use crate::smtp::SmtpServer;

async fn events(app: &TestApp, id: &str, channel: &str, event: &str) -> i64 {
    sqlx::query_scalar("select count(*) from evidence where item_id = $1::uuid and channel = $2 and event = $3")
        .bind(id)
        .bind(channel)
        .bind(event)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn submit(app: &TestApp, key: &str, pinfl: &str, idem: &str) -> String {
    let resp = app.submit(key, idem, &summons(pinfl)).await;
    assert_eq!(resp.status(), 202);
    resp.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_summons_is_announced_by_sms_and_email_without_its_content() {
    let smtp = SmtpServer::start();
    let app = TestApp::spawn_with(Options { smtp: Some(("127.0.0.1".into(), smtp.port)), ..Default::default() }).await;
    let key = app.agency("court-notices").await;
    let (pinfl, _) = app.citizen_with("3120588010036", Some("+998901234567"), Some("aziz@example.uz")).await;
    let id = submit(&app, &key, pinfl.as_str(), "n-1").await;

    wait_until("the SMS delivery report", || async { events(&app, &id, "sms", "NotificationDelivered").await == 1 })
        .await;
    wait_until("the email", || async { events(&app, &id, "email", "ConsignmentNotification").await == 1 }).await;
    let item: Value = app.get(&format!("/v1/correspondence/{id}"), &key).await.json().await.unwrap();
    assert_eq!(item["status"], "consigned", "notices never serve an item");

    // The SMS: to the registered phone, GSM-7, the reference and the link, not the summons.
    let sms = app.sms.messages().await;
    assert_eq!(sms.len(), 1);
    let text = &sms[0].request.text;
    assert_eq!(sms[0].request.to, "+998901234567");
    assert_eq!(sms[0].request.client_ref, item["steps"][1]["attempts"][0]["id"].as_str().unwrap());
    assert!(text.contains("2-1234/2026") && text.contains(&format!("/inbox/{id}")), "{text}");
    assert!(!text.contains("Karimov Anvar") && !text.contains("qarzni undirish"), "the SMS leaks content: {text}");
    let (segments, encoding): (Option<i32>, Option<String>) =
        sqlx::query_as("select a.segments, n.encoding from attempt a join notice n on n.item_id = a.item_id and n.channel = 'sms' where a.channel = 'sms'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((segments, encoding.as_deref()), (Some(1), Some("gsm-7")));

    // The email: multipart text + HTML, in Uzbek, with the link, and its Message-ID in the evidence.
    let mail = &smtp.wait_for(1)[0];
    assert!(mail["to"].as_str().unwrap().contains("aziz@example.uz"));
    assert!(mail["subject"].as_str().unwrap().contains("2-1234/2026"));
    let parts = mail["parts"].as_array().unwrap();
    let kinds: Vec<&str> = parts.iter().map(|p| p["content_type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["text/plain", "text/html"]);
    for p in parts {
        // minijinja escapes '/' in HTML as &#x2f;, which browsers read back as '/'.
        let body = p["body"].as_str().unwrap().replace("&#x2f;", "/");
        assert!(body.contains(&format!("/inbox/{id}")), "{body}");
        assert!(body.contains("Hurmatli"), "not in Uzbek: {body}");
        assert!(!body.contains("Karimov Anvar"), "the email leaks content");
    }
    let evidence_message_id: String = sqlx::query_scalar(
        "select convert_from(canonical, 'UTF8')::jsonb -> 'details' ->> 'message_id' from evidence where channel = 'email'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(mail["message_id"].as_str().unwrap(), evidence_message_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_reports_are_authenticated_and_repeats_or_late_ones_change_nothing() {
    let app = TestApp::spawn().await;
    app.sms.set(Behaviour { duplicate_reports: true, report_delay_ms: 50, ..Default::default() }).await;
    let key = app.agency("court-reports").await;
    let (pinfl, _) = app.citizen_with("3120588010037", Some("+998901234568"), None).await;
    let id = submit(&app, &key, pinfl.as_str(), "r-1").await;
    wait_until("the report", || async { events(&app, &id, "sms", "NotificationDelivered").await == 1 }).await;
    let provider_id = app.sms.messages().await[0].id.clone();
    let url = app.url("/v1/providers/sms/sim/reports");
    let post = |secret: &'static str, body: Value| app.client.post(&url).bearer_auth(secret).json(&body).send();

    let late =
        post("test-report-secret", serde_json::json!({ "id": provider_id, "status": "undelivered" })).await.unwrap();
    assert_eq!(late.status(), 200);
    let again =
        post("test-report-secret", serde_json::json!({ "id": provider_id, "status": "delivered" })).await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(
        post("wrong", serde_json::json!({ "id": provider_id, "status": "delivered" })).await.unwrap().status(),
        401
    );
    assert_eq!(
        post("test-report-secret", serde_json::json!({ "id": "sim-999", "status": "delivered" }))
            .await
            .unwrap()
            .status(),
        404
    );
    tokio::time::sleep(Duration::from_millis(300)).await; // the simulator's duplicate
    assert_eq!(events(&app, &id, "sms", "NotificationDelivered").await, 1);
    assert_eq!(events(&app, &id, "sms", "ConsignmentNotificationFailure").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_longer_than_the_cap_is_refused_at_submission() {
    let app = TestApp::spawn().await;
    let long_name = "Тошкент шаҳар Юнусобод туманлараро фуқаролик ишлари бўйича судининг ".repeat(3);
    dalil::admin::agency_create(&app.pool, "court-long", &long_name).await.unwrap();
    let key = dalil::admin::api_key_create(&app.pool, "court-long").await.unwrap()["key"].as_str().unwrap().to_string();
    let (pinfl, _) = app.citizen_with("3120588010038", Some("+998901234569"), None).await;
    let mut body = summons(pinfl.as_str());
    body["language"] = "ru".into();
    let resp = app.submit(&key, "cap-1", &body).await;
    assert_eq!(resp.status(), 422);
    let problem: Value = resp.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("segments"), "{problem}");
    assert_eq!(app.written().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sms_outage_holds_up_only_sms_and_every_notice_goes_exactly_once() {
    let app = TestApp::spawn().await;
    app.sms.set(Behaviour { fail: FailMode::ServerError, ..Default::default() }).await;
    let key = app.agency("court-outage").await;
    let (pinfl, _) = app.citizen_with("3120588010039", Some("+998901234570"), None).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(submit(&app, &key, pinfl.as_str(), &format!("o-{i}")).await);
    }
    // The inbox keeps flowing while the gateway is down.
    for id in &ids {
        app.wait_for_status(&key, id, &["consigned"]).await;
    }
    assert!(app.sms.messages().await.is_empty());
    assert_eq!(app.count("select count(*) from attempt where channel = 'sms' and status = 'queued'").await, 5);
    // The gateway recovers before the retries run out.
    app.sms.set(Behaviour::default()).await;
    wait_until("every notice", || async {
        app.count("select count(*) from evidence where event = 'ConsignmentNotification'").await == 5
    })
    .await;
    let sent = app.sms.messages().await;
    assert_eq!(sent.len(), 5);
    let refs: std::collections::HashSet<_> = sent.iter().map(|m| m.request.client_ref.clone()).collect();
    assert_eq!(refs.len(), 5, "one message per attempt");
    assert!(sent.iter().all(|m| m.requests == 1), "no attempt was sent twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_sms_fails_its_step_with_evidence_and_leaves_the_item_alone() {
    let app = TestApp::spawn().await;
    app.sms.set(Behaviour { fail: FailMode::Reject, ..Default::default() }).await;
    let key = app.agency("court-reject").await;
    let (pinfl, _) = app.citizen_with("3120588010040", Some("+998901234571"), None).await;
    let id = submit(&app, &key, pinfl.as_str(), "x-1").await;
    wait_until("the failure", || async { events(&app, &id, "sms", "ConsignmentNotificationFailure").await == 1 }).await;
    let item = app.wait_for_status(&key, &id, &["consigned"]).await;
    let sms_step = item["steps"].as_array().unwrap().iter().find(|s| s["channel"] == "sms").unwrap();
    assert_eq!(sms_step["status"], "failed");
    assert!(sms_step["attempts"][0]["detail"].as_str().unwrap().contains("refused"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_last_retry_the_step_fails_with_evidence() {
    let app = TestApp::spawn().await;
    app.sms.set(Behaviour { fail: FailMode::ServerError, ..Default::default() }).await;
    let key = app.agency("court-giveup").await;
    let (pinfl, _) = app.citizen_with("3120588010041", Some("+998901234572"), None).await;
    let id = submit(&app, &key, pinfl.as_str(), "g-1").await;
    wait_until("giving up", || async { events(&app, &id, "sms", "ConsignmentNotificationFailure").await == 1 }).await;
    let detail: String =
        sqlx::query_scalar("select detail from attempt where channel = 'sms'").fetch_one(&app.pool).await.unwrap();
    assert!(detail.contains("gave up after the last retry") && detail.contains("503"), "{detail}");
    assert!(app.sms.messages().await.is_empty());
    // One try and one per delay queue, each waited out in turn: a retry goes to one delay queue
    // (it used to go to all four, each copy making four more).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(app.sms.refused().await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_go_to_the_dead_queue_and_can_be_listed_and_replayed() {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let app = TestApp::spawn().await;
    let conn = dalil::queue::connect(&crate::helpers::amqp_base(), "test-poison").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let exchange = format!("{}dalil.delivery", app.settings.queue_prefix);
    ch.basic_publish(
        exchange.as_str().into(),
        "sms".into(),
        BasicPublishOptions::default(),
        b"{not json",
        Default::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let mut settings = app.settings.clone();
    settings.amqp_url = crate::helpers::amqp_base().into();
    let mut listed = Value::Null;
    for _ in 0..100 {
        listed = dalil::admin::dead_letters_list(&settings, 10).await.unwrap();
        if !listed.as_array().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["routing_key"], "sms");
    assert_eq!(listed[0]["body"], "{not json");
    // Listing leaves it there; replaying sends it back through delivery (where it dies again).
    assert_eq!(dalil::admin::dead_letters_list(&settings, 10).await.unwrap().as_array().unwrap().len(), 1);
    let replayed = dalil::admin::dead_letters_replay(&settings, 10).await.unwrap();
    assert_eq!(replayed["replayed"], 1);
    // It went back through the sms queue, still poison, and is dead again: listed once more.
    let mut back = 0;
    for _ in 0..100 {
        back = dalil::admin::dead_letters_list(&settings, 10).await.unwrap().as_array().unwrap().len();
        if back == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(back, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_is_dkim_signed_when_a_key_is_configured() {
    let key = std::env::temp_dir().join("dalil-test-dkim.pem");
    if !key.exists() {
        let out = std::process::Command::new("openssl")
            .args(["genrsa", "-traditional", "-out"])
            .arg(&key)
            .arg("2048")
            .output()
            .expect("openssl");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let smtp = SmtpServer::start();
    let app = TestApp::spawn_with(Options {
        smtp: Some(("127.0.0.1".into(), smtp.port)),
        tweak: |s| {
            s.email.dkim_domain = "dalil.local".into();
            s.email.dkim_selector = "mail2026".into();
            s.email.dkim_private_key_file = std::env::temp_dir().join("dalil-test-dkim.pem").display().to_string();
        },
        ..Default::default()
    })
    .await;
    let key = app.agency("court-dkim").await;
    let (pinfl, _) = app.citizen_with("3120588010042", None, Some("malika@example.uz")).await;
    submit(&app, &key, pinfl.as_str(), "d-1").await;
    let mail = &smtp.wait_for(1)[0];
    assert_eq!(mail["dkim"], true, "{mail}");
}
