use serde_json::Value;

use crate::helpers::{summons, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_the_same_key_and_body_returns_the_first_answer() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-a").await;
    let (pinfl, _) = app.citizen("3120588010015").await;
    let first = app.submit(&key, "same", &summons(pinfl.as_str())).await;
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    let again = app.submit(&key, "same", &summons(pinfl.as_str())).await;
    assert_eq!(again.status(), 202);
    let again: Value = again.json().await.unwrap();
    assert_eq!(first["id"], again["id"]);
    // The same record; the sequencer may have given it its log index in between.
    let (mut a, mut b) = (first["evidence"].clone(), again["evidence"].clone());
    let (ia, ib) = (a["log_index"].take(), b["log_index"].take());
    assert!(ia.is_null() || ia == ib, "log index {ia} then {ib}");
    assert_eq!(a, b);
    assert_eq!(app.count("select count(*) from item").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_with_another_body_is_refused_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-b").await;
    let (pinfl, _) = app.citizen("3120588010016").await;
    let first: Value = app.submit(&key, "k", &summons(pinfl.as_str())).await.json().await.unwrap();
    // Let delivery settle, so that only the refused request could change the counts.
    app.wait_for_status(&key, first["id"].as_str().unwrap(), &["consigned"]).await;
    let before = app.written().await;
    let mut other = summons(pinfl.as_str());
    other["reference"] = "another".into();
    let resp = app.submit(&key, "k", &other).await;
    assert_eq!(resp.status(), 409);
    let problem: Value = resp.json().await.unwrap();
    assert_eq!(problem["field"], "Idempotency-Key");
    assert_eq!(app.written().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_create_one_item() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-c").await;
    let (pinfl, _) = app.citizen("3120588010017").await;
    let body = summons(pinfl.as_str());
    let answers = futures_util::future::join_all((0..20).map(|_| app.submit(&key, "race", &body))).await;
    let mut ids = std::collections::HashSet::new();
    for a in answers {
        assert_eq!(a.status(), 202);
        let v: Value = a.json().await.unwrap();
        ids.insert(v["id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(app.count("select count(*) from item").await, 1);
    assert_eq!(app.count("select count(*) from attempt").await, 1);
    assert_eq!(app.count("select count(*) from evidence where event = 'SubmissionAcceptance'").await, 1);
    // The same key from another agency is another request.
    let other = app.agency("court-d").await;
    assert_eq!(app.submit(&other, "race", &body).await.status(), 202);
    assert_eq!(app.count("select count(*) from item").await, 2);
}
