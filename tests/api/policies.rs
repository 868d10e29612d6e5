//! Legal service: escalation timers, deemed delivery, consent, respond-by, recall, and
//! schedulers racing for one timer. Timers are driven by moving their due time to now (the
//! database is the clock the scheduler reads), never by sleeping for hours.

use std::time::Duration;

use dalil::app::Roles;
use serde_json::{json, Value};

use crate::helpers::{citizen_token, summons, Options, TestApp};

/// A recipient who consented to digital delivery and has a postal address in Tashkent.
async fn consenting_recipient(app: &TestApp, first13: &str) -> (String, String) {
    let pinfl = dalil::domain::Pinfl::with_check_digit(first13);
    let input = dalil::admin::RecipientInput {
        pinfl: Some(pinfl.to_string()),
        name: Some("Toshmatov Bobur".into()),
        region: Some("UZ-TK".into()),
        district: Some("Chilonzor tumani".into()),
        street: Some("Bunyodkor shoh koʻchasi".into()),
        house: Some("7".into()),
        postcode: Some("100115".into()),
        digital_consent: Some(true),
        ..Default::default()
    };
    dalil::admin::recipient_upsert(&app.pool, &input).await.unwrap();
    (pinfl.to_string(), citizen_token(app, pinfl.as_str()))
}

async fn submitted(app: &TestApp, key: &str, idem: &str, body: &Value) -> String {
    let r = app.submit(key, idem, body).await;
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    v["id"].as_str().unwrap().to_string()
}

/// Moves an item's pending timers of `kind` to now: the scheduler fires them on its next tick.
async fn make_due(app: &TestApp, id: &str, kind: &str) -> i64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n =
            sqlx::query("update timer set due_at = now() where item_id = $1::uuid and kind = $2 and fired_at is null")
                .bind(id)
                .bind(kind)
                .execute(&app.pool)
                .await
                .unwrap()
                .rows_affected();
        if n > 0 {
            return n as i64;
        }
        // A deemed timer appears when the deposit is confirmed.
        assert!(tokio::time::Instant::now() < deadline, "no pending {kind} timer for {id}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn item(app: &TestApp, key: &str, id: &str) -> Value {
    app.get(&format!("/v1/correspondence/{id}"), key).await.json().await.unwrap()
}

fn step<'a>(item: &'a Value, channel: &str) -> &'a Value {
    item["steps"].as_array().unwrap().iter().find(|s| s["channel"] == channel).unwrap_or(&Value::Null)
}

fn events(item: &Value) -> Vec<String> {
    item["evidence"].as_array().unwrap().iter().map(|e| e["event"].as_str().unwrap().to_string()).collect()
}

async fn operator(app: &TestApp) {
    dalil::admin::postal_operator_create(&app.pool, "uzpost-tk", "Uzbekiston pochtasi", &["UZ-TK".into()])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unopened_summons_escalates_to_a_letter_then_is_deemed_served() {
    let app = TestApp::spawn().await;
    operator(&app).await;
    let key = app.agency("court-escalate").await;
    let (pinfl, token) = consenting_recipient(&app, "3010190123456").await;
    let id = submitted(&app, &key, "e-1", &summons(&pinfl)).await;
    let v = app.wait_for_status(&key, &id, &["consigned"]).await;

    // With consent: inbox and notices now, the letter only after 72 hours unopened.
    assert_eq!(v["policy"], json!({ "id": "summons", "version": 2 }));
    assert_eq!(v["digital_consent"], true);
    assert_eq!(v["deemed"]["after"], "10d");
    let postal = step(&v, "postal");
    assert_eq!(postal["status"], "scheduled");
    assert_eq!(postal["unless"], "opened");
    let due: chrono::DateTime<chrono::Utc> = postal["due_at"].as_str().unwrap().parse().unwrap();
    let created: chrono::DateTime<chrono::Utc> = v["created_at"].as_str().unwrap().parse().unwrap();
    assert!((due - created - chrono::Duration::hours(72)).num_seconds().abs() <= 2, "due {due}");
    let plan = &v["evidence"][0]["record"]["details"]["plan"];
    assert!(plan.as_array().unwrap().iter().any(|p| p["channel"] == "postal" && p["after"] == "3d"), "{plan}");

    // 72 hours pass unopened: the scheduler starts the letter.
    make_due(&app, &id, "escalate").await;
    wait_until("the letter is ready", async || {
        app.count(&format!("select count(*) from letter where item_id = '{id}'")).await == 1
    })
    .await;
    let v = item(&app, &key, &id).await;
    assert_eq!(step(&v, "postal")["note"], "started by its timer: not opened in time");
    assert_eq!(v["served"], Value::Null);

    // 10 days after the deposit: deemed served, at the time the rule names.
    make_due(&app, &id, "deemed").await;
    let v = app.wait_for_status(&key, &id, &["served"]).await;
    assert_eq!(v["served"]["rule"], "deemed");
    let deemed = v["evidence"].as_array().unwrap().iter().find(|e| e["event"] == "DeemedDelivery").unwrap();
    assert_eq!(v["served"]["evidence"], deemed["evidence_id"]);
    let details = &deemed["record"]["details"];
    assert_eq!(details["served"]["rule"], "deemed");
    assert_eq!(details["rule"]["after"], "10d");
    let deposit = v["evidence"].as_array().unwrap().iter().find(|e| e["event"] == "ContentConsignment").unwrap();
    assert_eq!(details["rule"]["deposit"]["evidence_id"], deposit["evidence_id"], "{details}");
    let served_at = v["served"]["at"].clone();

    // Opened afterwards: recorded, and the item stays served at the deemed time.
    let r = app.get(&format!("/v1/inbox/{id}"), &token).await;
    assert_eq!(r.status(), 200);
    let v = item(&app, &key, &id).await;
    assert_eq!(v["served"]["at"], served_at);
    assert_eq!(v["served"]["rule"], "deemed");
    assert!(events(&v).contains(&"ContentAccessTracking".to_string()));
    let access = v["evidence"].as_array().unwrap().iter().find(|e| e["event"] == "ContentAccessTracking").unwrap();
    assert_eq!(access["record"]["details"]["served"], Value::Null);

    // The database refuses to change service once decided, whoever asks.
    let err = sqlx::query("update item set served_rule = 'accessed' where id = $1::uuid")
        .bind(&id)
        .execute(&app.pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("service is decided once"), "{err}");

    // And the bundle proves it.
    let bundle: Value = app.get(&format!("/v1/correspondence/{id}/proof"), &key).await.json().await.unwrap();
    let verdict: Value =
        app.client.post(app.url("/v1/verify")).json(&bundle).send().await.unwrap().json().await.unwrap();
    assert_eq!(verdict["valid"], true, "{verdict}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_items_later_steps_stay_in_the_bulk_lane() {
    let app = TestApp::spawn().await;
    app.keep_published_outbox_rows().await;
    operator(&app).await;
    let key = app.agency("court-escalate-bulk").await;
    let (pinfl, _) = consenting_recipient(&app, "3010190123457").await;
    let mut body = summons(&pinfl);
    body["lane"] = "bulk".into();
    let id = submitted(&app, &key, "eb-1", &body).await;
    app.wait_for_status(&key, &id, &["consigned"]).await;

    // The letter, started by its timer days later, is queued in the item's lane and worked there.
    make_due(&app, &id, "escalate").await;
    wait_until("the letter is ready", async || {
        app.count(&format!("select count(*) from letter where item_id = '{id}'")).await == 1
    })
    .await;
    let routes: Vec<String> = sqlx::query_scalar(
        "select o.routing_key from outbox_published o join attempt a on a.id = o.message_id
         where a.item_id = $1::uuid order by o.routing_key",
    )
    .bind(&id)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(routes, ["inbox.bulk", "postal.bulk"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opened_summons_does_not_escalate() {
    let app = TestApp::spawn().await;
    operator(&app).await;
    let key = app.agency("court-opened").await;
    let (pinfl, token) = consenting_recipient(&app, "3010190123457").await;
    let id = submitted(&app, &key, "o-1", &summons(&pinfl)).await;
    app.wait_for_status(&key, &id, &["consigned"]).await;
    assert_eq!(app.get(&format!("/v1/inbox/{id}"), &token).await.status(), 200);

    make_due(&app, &id, "escalate").await;
    wait_until("the timer fired", async || {
        app.count(&format!("select count(*) from timer where item_id = '{id}' and fired_at is not null")).await >= 1
    })
    .await;
    let v = item(&app, &key, &id).await;
    let postal = step(&v, "postal");
    assert_eq!(postal["status"], "skipped");
    assert!(postal["note"].as_str().unwrap().starts_with("served at"), "{postal}");
    assert_eq!(postal["attempts"], json!([]));
    assert_eq!(app.count(&format!("select count(*) from letter where item_id = '{id}'")).await, 0);
    assert_eq!(v["served"]["rule"], "accessed");

    // The deemed timer finds the item served and changes nothing.
    make_due(&app, &id, "deemed").await;
    wait_until("the deemed timer fired", async || {
        app.count(&format!("select count(*) from timer where item_id = '{id}' and fired_at is not null")).await == 2
    })
    .await;
    let v2 = item(&app, &key, &id).await;
    assert_eq!(v2["served"], v["served"]);
    assert!(!events(&v2).contains(&"DeemedDelivery".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_digital_consent_the_letter_goes_at_once_and_nothing_is_deemed() {
    let app = TestApp::spawn().await;
    operator(&app).await;
    let key = app.agency("court-paper-only").await;
    let (pinfl, _) = consenting_recipient(&app, "3010190123458").await;
    let input =
        dalil::admin::RecipientInput { pinfl: Some(pinfl.clone()), digital_consent: Some(false), ..Default::default() };
    dalil::admin::recipient_upsert(&app.pool, &input).await.unwrap();
    let id = submitted(&app, &key, "n-1", &summons(&pinfl)).await;
    wait_until("the letter is ready", async || {
        app.count(&format!("select count(*) from letter where item_id = '{id}'")).await == 1
    })
    .await;
    let v = app.wait_for_status(&key, &id, &["consigned"]).await;
    assert_eq!(v["digital_consent"], false);
    assert_eq!(v["deemed"], Value::Null);
    assert_eq!(step(&v, "postal")["due_at"], Value::Null);
    assert_eq!(app.count(&format!("select count(*) from timer where item_id = '{id}'")).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_respond_by_too_soon_for_the_policy_is_flagged() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-deadline").await;
    let (pinfl, _) = consenting_recipient(&app, "3010190123459").await;
    let mut body = summons(&pinfl);
    // A letter may leave after 3 days and take 5 more: 4 days is too little.
    body["respond_by"] = json!((chrono::Utc::now() + chrono::Duration::days(4)).to_rfc3339());
    let r = app.submit(&key, "d-1", &body).await;
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    let warning = v["respond_by_warning"].as_str().expect("flagged at submission");
    assert!(warning.contains("postal step after 3d unless opened"), "{warning}");
    let id = v["id"].as_str().unwrap();
    let view = item(&app, &key, id).await;
    assert_eq!(view["respond_by_warning"], warning);
    assert_eq!(view["evidence"][0]["record"]["details"]["respond_by_warning"], warning);

    body["respond_by"] = json!((chrono::Utc::now() + chrono::Duration::days(20)).to_rfc3339());
    let v: Value = app.submit(&key, "d-2", &body).await.json().await.unwrap();
    assert_eq!(v["respond_by_warning"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recall_before_service_stops_pending_steps_and_withdraws_the_item() {
    let app = TestApp::spawn().await;
    operator(&app).await;
    let key = app.agency("court-recall").await;
    let (pinfl, token) = consenting_recipient(&app, "3010190123460").await;
    let id = submitted(&app, &key, "r-1", &summons(&pinfl)).await;
    app.wait_for_status(&key, &id, &["consigned"]).await;

    let r = app
        .client
        .post(app.url(&format!("/v1/correspondence/{id}/recall")))
        .bearer_auth(&key)
        .json(&json!({ "reason": "sent to the wrong party" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let recall: Value = r.json().await.unwrap();
    assert_eq!(recall["status"], "recalled");
    assert_eq!(recall["cancelled_steps"], json!(["postal"]));
    assert_eq!(recall["evidence"]["event"], "Recall");

    let v = item(&app, &key, &id).await;
    assert_eq!(v["status"], "recalled");
    assert_eq!(v["recalled"]["reason"], "sent to the wrong party");
    assert_eq!(step(&v, "postal")["status"], "cancelled");
    let rec = v["evidence"].as_array().unwrap().iter().find(|e| e["event"] == "Recall").unwrap();
    assert_eq!(rec["record"]["details"]["reason"], "sent to the wrong party");
    assert_eq!(rec["record"]["actor"], json!({ "type": "agency", "id": "court-recall" }));

    // The citizen sees it withdrawn, and cannot open it.
    let inbox: Value = app.get("/v1/inbox", &token).await.json().await.unwrap();
    assert!(inbox["items"][0]["withdrawn_at"].is_string(), "{inbox}");
    let r = app.get(&format!("/v1/inbox/{id}"), &token).await;
    assert_eq!(r.status(), 410);
    let problem: Value = r.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("withdrew"), "{problem}");

    // Timers find nothing to do; the item is never served.
    make_due(&app, &id, "escalate").await;
    make_due(&app, &id, "deemed").await;
    wait_until("both timers fired", async || {
        app.count(&format!("select count(*) from timer where item_id = '{id}' and fired_at is not null")).await == 2
    })
    .await;
    let v = item(&app, &key, &id).await;
    assert_eq!(v["served"], Value::Null);
    assert_eq!(app.count(&format!("select count(*) from letter where item_id = '{id}'")).await, 0);

    // Recalling again changes nothing.
    let evidence_before = app.count("select count(*) from evidence").await;
    let again: Value = app.post(&format!("/v1/correspondence/{id}/recall"), &key).await.json().await.unwrap();
    assert_eq!(again["status"], "recalled");
    assert_eq!(again["evidence"], Value::Null);
    assert_eq!(app.count("select count(*) from evidence").await, evidence_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_item_cannot_be_recalled() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-late-recall").await;
    let (pinfl, token) = consenting_recipient(&app, "3010190123461").await;
    let id = submitted(&app, &key, "s-1", &summons(&pinfl)).await;
    app.wait_for_status(&key, &id, &["consigned"]).await;
    assert_eq!(app.get(&format!("/v1/inbox/{id}"), &token).await.status(), 200);
    let before = app.count("select count(*) from evidence").await;
    let r = app.post(&format!("/v1/correspondence/{id}/recall"), &key).await;
    assert_eq!(r.status(), 409);
    let problem: Value = r.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("cannot be recalled"), "{problem}");
    assert_eq!(app.count("select count(*) from evidence").await, before);
    assert_eq!(item(&app, &key, &id).await["status"], "served");
    // Another agency's item, or none: 404.
    let other = app.agency("someone-else").await;
    assert_eq!(app.post(&format!("/v1/correspondence/{id}/recall"), &other).await.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schedulers_racing_fire_each_timer_once() {
    // No scheduler in the app: the test is the two schedulers.
    let app =
        TestApp::spawn_with(Options { roles: Roles { scheduler: false, ..Roles::ALL }, ..Default::default() }).await;
    let key = app.agency("court-race").await;
    let (pinfl, _) = consenting_recipient(&app, "3010190123462").await;
    let mut ids = Vec::new();
    for i in 0..12 {
        let mut body = summons(&pinfl);
        body["reference"] = json!(format!("2-{i}/2026"));
        ids.push(submitted(&app, &key, &format!("race-{i}"), &body).await);
    }
    for id in &ids {
        make_due(&app, id, "deemed").await;
    }
    let (a, b) = tokio::join!(
        dalil::timers::fire_due(&app.pool, dalil::timers::Kind::Deemed, "scheduler-a"),
        dalil::timers::fire_due(&app.pool, dalil::timers::Kind::Deemed, "scheduler-b"),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.fired + b.fired, 12, "a fired {a:?}, b fired {b:?}");
    assert_eq!(app.count("select count(*) from evidence where event = 'DeemedDelivery'").await, 12);
    assert_eq!(app.count("select count(*) from item where served_rule = 'deemed'").await, 12);

    // Recurring jobs: one run per tick, whichever scheduler claims it; a missed run is caught up.
    sqlx::query("insert into scheduler_job (name, next_run_at) values ('retention', now() - interval '3 days')")
        .execute(&app.pool)
        .await
        .unwrap();
    let schedule: cron::Schedule = "0 17 3 * * *".parse().unwrap();
    let (x, y) = tokio::join!(
        dalil::scheduler::claim(&app.pool, "retention", &schedule, "a"),
        dalil::scheduler::claim(&app.pool, "retention", &schedule, "b"),
    );
    assert!(x.unwrap() ^ y.unwrap(), "exactly one scheduler runs the overdue job");
    assert!(!dalil::scheduler::claim(&app.pool, "retention", &schedule, "c").await.unwrap(), "once, not thrice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passed_deemed_time_decides_service_even_before_a_scheduler_records_it() {
    // No scheduler: the deemed time passes, and nobody has fired the timer yet.
    let app =
        TestApp::spawn_with(Options { roles: Roles { scheduler: false, ..Roles::ALL }, ..Default::default() }).await;
    let key = app.agency("court-late-scheduler").await;
    let (pinfl, token) = consenting_recipient(&app, "3010190123463").await;
    let id = submitted(&app, &key, "l-1", &summons(&pinfl)).await;
    app.wait_for_status(&key, &id, &["consigned"]).await;
    make_due(&app, &id, "deemed").await;

    // The agency cannot recall it any more.
    let r = app.post(&format!("/v1/correspondence/{id}/recall"), &key).await;
    assert_eq!(r.status(), 409);
    assert!(r.json::<Value>().await.unwrap()["detail"].as_str().unwrap().contains("deemed served"));
    // The citizen opening it now does not serve it by access.
    assert_eq!(app.get(&format!("/v1/inbox/{id}"), &token).await.status(), 200);
    assert_eq!(item(&app, &key, &id).await["served"], Value::Null);
    // When a scheduler comes back, the rule serves it at the deemed time.
    let fired = dalil::timers::fire_due(&app.pool, dalil::timers::Kind::Deemed, "late").await.unwrap();
    assert_eq!(fired.acted, 1);
    let v = item(&app, &key, &id).await;
    assert_eq!(v["served"]["rule"], "deemed");
    assert_eq!(v["status"], "served");
}
