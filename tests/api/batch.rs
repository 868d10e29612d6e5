//! `POST /v1/correspondence/batch`: many items in one request, checked whole, written each
//! with its own key.

use serde_json::{json, Value};

use crate::helpers::{summons, TestApp};

impl TestApp {
    pub async fn submit_batch(&self, key: &str, items: &[Value]) -> reqwest::Response {
        self.client
            .post(self.url("/v1/correspondence/batch"))
            .bearer_auth(key)
            .json(&json!({ "items": items }))
            .send()
            .await
            .unwrap()
    }
}

/// A batch item: a submission body with its key.
fn keyed(idempotency_key: &str, mut body: Value) -> Value {
    body["idempotency_key"] = idempotency_key.into();
    body
}

fn with_reference(pinfl: &str, reference: &str) -> Value {
    let mut body = summons(pinfl);
    body["reference"] = reference.into();
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_accepted_whole_answered_in_order_and_every_item_delivered() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-batch").await;
    let (a, _) = app.citizen("3120588010301").await;
    let (b, _) = app.citizen("3120588010302").await;
    let items = [
        keyed("b-1", with_reference(a.as_str(), "2-1/2026")),
        keyed("b-2", with_reference(b.as_str(), "2-2/2026")),
        keyed("b-3", with_reference(a.as_str(), "2-3/2026")),
    ];
    let resp = app.submit_batch(&key, &items).await;
    assert_eq!(resp.status(), 202);
    let answer: Value = resp.json().await.unwrap();
    let answers = answer["items"].as_array().unwrap();
    assert_eq!(answers.len(), 3);
    for (n, (item, sent)) in answers.iter().zip(&items).enumerate() {
        assert_eq!(item["reference"], sent["reference"], "answer {n} out of order");
        assert_eq!(item["status"], "accepted");
        assert_eq!(item["evidence"]["event"], "SubmissionAcceptance");
        assert_eq!(item["evidence"]["record"]["details"]["idempotency_key"], sent["idempotency_key"]);
        app.wait_for_status(&key, item["id"].as_str().unwrap(), &["consigned"]).await;
    }
    assert_eq!(app.count("select count(*) from item").await, 3);
    assert_eq!(app.count("select count(*) from inbox_entry").await, 3);
    assert_eq!(app.count("select count(*) from evidence where event = 'SubmissionAcceptance'").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_returns_its_items_and_shares_keys_with_single_submissions() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-batch-retry").await;
    let (pinfl, _) = app.citizen("3120588010303").await;
    // Sent alone first, then again inside a batch with the same body: one item.
    let alone = with_reference(pinfl.as_str(), "2-10/2026");
    let first = app.submit(&key, "r-1", &alone).await;
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    let items = [keyed("r-1", alone), keyed("r-2", with_reference(pinfl.as_str(), "2-11/2026"))];
    let resp = app.submit_batch(&key, &items).await;
    assert_eq!(resp.status(), 202);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["items"][0]["id"], first["id"]);
    assert_ne!(answer["items"][1]["id"], first["id"]);
    assert_eq!(app.count("select count(*) from item").await, 2);

    // The whole batch again: the same answers, nothing new written.
    let resp = app.submit_batch(&key, &items).await;
    assert_eq!(resp.status(), 202);
    let again: Value = resp.json().await.unwrap();
    for n in 0..2 {
        assert_eq!(again["items"][n]["id"], answer["items"][n]["id"]);
        let sha256 = &answer["items"][n]["evidence"]["sha256"];
        assert!(sha256.is_string());
        assert_eq!(&again["items"][n]["evidence"]["sha256"], sha256);
    }
    assert_eq!(app.count("select count(*) from item").await, 2);
    assert_eq!(app.count("select count(*) from evidence where event = 'SubmissionAcceptance'").await, 2);

    // An item of the batch sent alone with its key: the batch's item.
    let r2 = app.submit(&key, "r-2", &with_reference(pinfl.as_str(), "2-11/2026")).await;
    assert_eq!(r2.status(), 202);
    assert_eq!(r2.json::<Value>().await.unwrap()["id"], answer["items"][1]["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_bad_items_names_every_one_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-batch-bad").await;
    let (pinfl, _) = app.citizen("3120588010304").await;
    let good = || with_reference(pinfl.as_str(), "2-20/2026");
    let before = app.written().await;

    let refused = |status: u16, problem: &Value, fields: &[&str]| {
        assert_eq!(problem["status"], status, "{problem}");
        let named: Vec<&str> =
            problem["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
        assert_eq!(named, fields, "{problem}");
        assert_eq!(problem["field"], fields[0]);
        assert!(problem["detail"].as_str().unwrap().contains("nothing was written"), "{problem}");
    };

    // Read from the body: keys missing, repeated or malformed, fields unknown or mistyped.
    let mut unknown_field = keyed("k-3", good());
    unknown_field["colour"] = "red".into();
    let mut mistyped = keyed("k-4", good());
    mistyped["reference"] = json!(42);
    let items = [
        keyed("k-1", good()),
        good(),
        keyed("k-1", good()),
        unknown_field,
        mistyped,
        json!("not an item"),
        keyed(" ", good()),
    ];
    let resp = app.submit_batch(&key, &items).await;
    assert_eq!(resp.status(), 422);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let problem: Value = resp.json().await.unwrap();
    refused(
        422,
        &problem,
        &[
            "items[1].idempotency_key",
            "items[2].idempotency_key",
            "items[3].colour",
            "items[4].reference",
            "items[5]",
            "items[6].idempotency_key",
        ],
    );
    assert!(problem["detail"].as_str().unwrap().starts_with("6 of 7 items are invalid"), "{problem}");
    assert!(problem["errors"][1]["detail"].as_str().unwrap().contains("items[0]"), "{problem}");

    // Checked against the templates and the register: every bad item named, none written.
    let mut bad_pinfl = keyed("k-11", good());
    bad_pinfl["recipient"]["pinfl"] = "31205880103040".into();
    let mut stranger = keyed("k-12", good());
    stranger["recipient"]["pinfl"] = dalil::domain::Pinfl::with_check_digit("3120588019999").to_string().into();
    let mut missing_variable = keyed("k-13", good());
    missing_variable["personalisation"].as_object_mut().unwrap().remove("hearing_at");
    let items = [keyed("k-10", good()), bad_pinfl, stranger, keyed("k-14", good()), missing_variable];
    let problem: Value = app.submit_batch(&key, &items).await.json().await.unwrap();
    refused(
        422,
        &problem,
        &["items[1].recipient.pinfl", "items[2].recipient.pinfl", "items[4].personalisation.hearing_at"],
    );

    // No items, or more than a batch takes.
    for n in [0, 1001] {
        let items: Vec<Value> = (0..n).map(|i| keyed(&format!("n-{i}"), good())).collect();
        let resp = app.submit_batch(&key, &items).await;
        assert_eq!(resp.status(), 422, "{n} items");
        assert_eq!(resp.json::<Value>().await.unwrap()["field"], "items");
    }
    assert_eq!(app.written().await, before);
    assert_eq!(app.count("select count(*) from item").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_reusing_a_key_for_another_body_is_refused_whole() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-batch-conflict").await;
    let (pinfl, _) = app.citizen("3120588010305").await;
    let first: Value =
        app.submit(&key, "c-1", &with_reference(pinfl.as_str(), "2-30/2026")).await.json().await.unwrap();
    app.wait_for_status(&key, first["id"].as_str().unwrap(), &["consigned"]).await;
    let before = app.written().await;
    let items = [
        keyed("c-2", with_reference(pinfl.as_str(), "2-31/2026")),
        keyed("c-1", with_reference(pinfl.as_str(), "another")),
    ];
    let resp = app.submit_batch(&key, &items).await;
    assert_eq!(resp.status(), 409);
    let problem: Value = resp.json().await.unwrap();
    assert_eq!(problem["field"], "items[1].idempotency_key");
    assert_eq!(problem["errors"].as_array().unwrap().len(), 1);
    assert!(problem["detail"].as_str().unwrap().contains("nothing was written"), "{problem}");
    assert_eq!(app.written().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_batch_sent_at_once_many_times_and_its_items_alone_create_each_item_once() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-batch-race").await;
    let (pinfl, _) = app.citizen("3120588010306").await;
    let items: Vec<Value> =
        (0..30).map(|i| keyed(&format!("race-{i}"), with_reference(pinfl.as_str(), &format!("2-{i}/2026")))).collect();
    let batches = futures_util::future::join_all((0..4).map(|_| app.submit_batch(&key, &items)));
    let alone = futures_util::future::join_all(items.iter().step_by(3).map(|item| {
        let mut body = item.clone();
        let k = body.as_object_mut().unwrap().remove("idempotency_key").unwrap();
        let (app, key) = (&app, &key);
        async move { app.submit(key, k.as_str().unwrap(), &body).await }
    }));
    let (batches, alone) = tokio::join!(batches, alone);
    let mut first: Option<Vec<Value>> = None;
    for resp in batches {
        assert_eq!(resp.status(), 202);
        let answers = resp.json::<Value>().await.unwrap()["items"].as_array().unwrap().clone();
        assert_eq!(answers.len(), 30);
        for (answer, item) in answers.iter().zip(&items) {
            assert_eq!(answer["reference"], item["reference"]);
        }
        let ids: Vec<Value> = answers.iter().map(|a| a["id"].clone()).collect();
        match &first {
            None => first = Some(ids),
            Some(first) => assert_eq!(&ids, first),
        }
    }
    let first = first.unwrap();
    for (n, resp) in alone.into_iter().enumerate() {
        assert_eq!(resp.status(), 202);
        assert_eq!(resp.json::<Value>().await.unwrap()["id"], first[n * 3]);
    }
    assert_eq!(app.count("select count(*) from item").await, 30);
    assert_eq!(app.count("select count(*) from evidence where event = 'SubmissionAcceptance'").await, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_database_fails_half_way_says_so_and_its_retry_writes_the_rest_once() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-batch-fault").await;
    let (pinfl, _) = app.citizen("3120588010307").await;
    // A fault only the database sees, while it lasts: one reference cannot be written.
    app.refuse_poison().await;
    let items: Vec<Value> = (0..10)
        .map(|i| keyed(&format!("f-{i}"), with_reference(pinfl.as_str(), if i == 6 { "poison" } else { "2-40/2026" })))
        .collect();
    let resp = app.submit_batch(&key, &items).await;
    assert_eq!(resp.status(), 503);
    let problem: Value = resp.json().await.unwrap();
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("items[6]") && detail.contains("send the same batch again"), "{detail}");
    // Each of the others was written (alone, once the shared statement failed); the poisoned
    // one left nothing, not even its key.
    assert_eq!(app.count("select count(*) from item").await, 9);
    assert_eq!(app.count("select count(*) from idempotency where key = 'f-6'").await, 0);

    app.execute("drop trigger refuse_poison on item").await;
    let resp = app.submit_batch(&key, &items).await;
    assert_eq!(resp.status(), 202);
    let answers: Value = resp.json().await.unwrap();
    assert_eq!(answers["items"][6]["reference"], "poison");
    assert_eq!(app.count("select count(*) from item").await, 10);
    assert_eq!(app.count("select count(*) from evidence where event = 'SubmissionAcceptance'").await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_made_during_a_batch_waits_for_a_share_of_it_not_all_of_it() {
    // Groups of 4, one at a time: a batch has at most 4 items in the intake at once.
    let options = crate::helpers::Options {
        tweak: |s| {
            s.api.group_items = 4;
            s.api.group_concurrency = 1;
        },
        ..Default::default()
    };
    let app = TestApp::spawn_with(options).await;
    let key = app.agency("court-batch-fair").await;
    let (pinfl, _) = app.citizen("3120588010308").await;
    let items: Vec<Value> =
        (0..120).map(|i| keyed(&format!("fair-{i}"), with_reference(pinfl.as_str(), &format!("2-{i}/2026")))).collect();

    // The batch's first group waits on a lock of the keys' table (nothing but a submission
    // writes it) while a single submission arrives; the lock goes 3 s later, time enough for
    // the single one's request to be read, checked and queued even on a loaded machine (the
    // test suite runs in parallel).
    let mut lock = app.pool.begin().await.unwrap();
    sqlx::query("lock table idempotency in share mode").execute(&mut *lock).await.unwrap();
    let batch = app.submit_batch(&key, &items);
    let single = async {
        app.wait_for_a_lock_wait("the batch").await;
        let body = with_reference(pinfl.as_str(), "single");
        let single = app.submit(&key, "fair-single", &body);
        let release = async move {
            tokio::time::sleep(std::time::Duration::from_secs(3)).await;
            lock.rollback().await.unwrap();
        };
        tokio::join!(single, release).0
    };
    let (batch, single) = tokio::join!(batch, single);
    assert_eq!(batch.status(), 202);
    assert_eq!(single.status(), 202);
    // Written in the order their transactions began (a transaction's id is taken at its first
    // write, and nothing updates a key's row, so it keeps its writer's): the single submission
    // went in after the batch's first group, ahead of the rest of the batch, instead of after
    // all 120.
    let later = app
        .count(
            "select count(*) from idempotency where key <> 'fair-single'
               and xmin::text::bigint > (select xmin::text::bigint from idempotency where key = 'fair-single')",
        )
        .await;
    assert!(later >= 100, "only {later} of the batch's 120 items were written after the single submission");
    assert_eq!(app.count("select count(*) from item").await, 121);
}
