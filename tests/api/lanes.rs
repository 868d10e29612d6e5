//! Lanes (DESIGN invariant 5): the items of a batch travel in the bulk lane, in queues of their
//! own, so an item sent on its own is never stuck behind them.

use std::time::Duration;

use dalil::app::Roles;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::helpers::{amqp_base, summons, Options, TestApp};

/// Messages waiting in a queue of this app (unprefixed name).
async fn waiting(app: &TestApp, queue: &str) -> u32 {
    let conn = dalil::queue::connect(&amqp_base(), "test-depth").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            format!("{}{queue}", app.settings.queue_prefix).as_str().into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "ok".into()).await;
    q.message_count()
}

/// A summons without attachments: light, so that hundreds are quick to write and deliver.
fn light(pinfl: &str, reference: &str) -> Value {
    let mut body = summons(pinfl);
    body.as_object_mut().unwrap().remove("attachments");
    body["reference"] = reference.into();
    body
}

/// `n` light items for one batch, each with its key: references `{series}-{i}/2026`.
fn batch_of(pinfl: &str, series: &str, n: u32) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let mut body = light(pinfl, &format!("{series}-{i}/2026"));
            body["idempotency_key"] = format!("{series}-bulk-{i}").into();
            body
        })
        .collect()
}

/// Starts a worker of this app for one channel (both its lanes); cancel the token to stop it.
fn start_worker(app: &TestApp, channel: &str) -> (CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let topology = dalil::app::load_topology(&app.settings).unwrap();
    let cancel = CancellationToken::new();
    let worker = tokio::spawn(dalil::worker::run(
        app.pool.clone(),
        app.settings.clone(),
        topology,
        vec![channel.into()],
        cancel.clone(),
    ));
    (cancel, worker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_sent_on_its_own_is_not_stuck_behind_a_batch() {
    // No workers yet: the queues fill first, so the order they are taken in is the test's.
    let mut app =
        TestApp::spawn_with(Options { roles: Roles { worker: false, ..Roles::ALL }, ..Default::default() }).await;
    let key = app.agency("court-lanes").await;
    let (pinfl, _) = app.citizen_with("3120588010401", Some("+998901234567"), None).await;

    // A batch may not put its items in the standard lane; nothing is written.
    let before = app.written().await;
    let mut urgent = light(pinfl.as_str(), "2-0/2026");
    urgent["idempotency_key"] = "urgent".into();
    urgent["lane"] = "standard".into();
    let resp = app.submit_batch(&key, &[urgent]).await;
    assert_eq!(resp.status(), 422);
    let problem: Value = resp.json().await.unwrap();
    assert_eq!(problem["field"], "items[0].lane", "{problem}");
    assert!(problem["errors"][0]["detail"].as_str().unwrap().contains("on its own"), "{problem}");
    assert_eq!(app.written().await, before);

    // 900 items in one batch, then one summons on its own, and one sent on its own as bulk.
    let n = 900;
    let resp = app.submit_batch(&key, &batch_of(pinfl.as_str(), "2", n)).await;
    assert_eq!(resp.status(), 202);
    let batch: Value = resp.json().await.unwrap();
    let first_of_batch = batch["items"][0]["id"].as_str().unwrap().to_string();
    let resp = app.submit(&key, "alone", &light(pinfl.as_str(), "2-alone/2026")).await;
    assert_eq!(resp.status(), 202);
    let alone = resp.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let mut campaign = light(pinfl.as_str(), "2-campaign/2026");
    campaign["lane"] = "bulk".into();
    let resp = app.submit(&key, "campaign", &campaign).await;
    assert_eq!(resp.status(), 202);
    let campaign = resp.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();

    for (id, lane) in [(&first_of_batch, "bulk"), (&alone, "standard"), (&campaign, "bulk")] {
        let v: Value = app.get(&format!("/v1/correspondence/{id}"), &key).await.json().await.unwrap();
        assert_eq!(v["lane"], lane, "{id}");
    }
    for (reference, lane) in [("2-0/2026", "bulk"), ("2-alone/2026", "standard"), ("2-campaign/2026", "bulk")] {
        let page: Value =
            app.get(&format!("/v1/correspondence?reference={reference}"), &key).await.json().await.unwrap();
        assert_eq!(page["items"][0]["lane"], lane, "{page}");
    }

    // Everything published: each lane's work is in its own queues (inbox and SMS notice).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while app.count("select count(*) from outbox where published_at is null").await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the relay did not publish everything");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(waiting(&app, "delivery.inbox").await, 1);
    assert_eq!(waiting(&app, "delivery.inbox.bulk").await, n + 1);
    assert_eq!(waiting(&app, "delivery.sms").await, 1);
    assert_eq!(waiting(&app, "delivery.sms.bulk").await, n + 1);

    // The inbox worker starts with 901 items waiting in bulk, sent before the one alone: that
    // one is deposited while most of them still wait. In one queue it would come last.
    let (cancel, worker) = start_worker(&app, "inbox");
    app.wait_for_status(&key, &alone, &["consigned"]).await;
    let ahead = app
        .count(&format!(
            "select count(*) from evidence e
             where e.event = 'ContentConsignment' and e.item_id <> '{alone}'
               and e.at < (select at from evidence where event = 'ContentConsignment' and item_id = '{alone}')"
        ))
        .await;
    assert!(ahead < n as i64 / 2, "{ahead} of the batch's {n} items were deposited before the item sent alone");

    // And the bulk lane is worked too: every item ends in the inbox.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while app.count("select count(*) from inbox_entry").await < n as i64 + 2 {
        assert!(tokio::time::Instant::now() < deadline, "the bulk lane was not delivered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cancel.cancel();
    worker.await.unwrap().unwrap();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_sent_on_its_own_goes_to_the_sms_gateway_ahead_of_a_batch_waiting_for_its_rate() {
    // A gateway that takes 20 messages a second, and no workers until the batch is queued.
    let mut app = TestApp::spawn_with(Options {
        roles: Roles { worker: false, ..Roles::ALL },
        tweak: |s| s.sms.rate_per_second = 20,
        ..Default::default()
    })
    .await;
    let key = app.agency("court-lanes-sms").await;
    let (pinfl, _) = app.citizen_with("3120588010402", Some("+998901234568"), None).await;
    let n = 40;
    assert_eq!(app.submit_batch(&key, &batch_of(pinfl.as_str(), "3", n)).await.status(), 202);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while waiting(&app, "delivery.sms.bulk").await < n {
        assert!(tokio::time::Instant::now() < deadline, "the batch's notices were not queued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The SMS worker starts on the batch: 40 notices wait two seconds for the gateway's rate.
    let (cancel, worker) = start_worker(&app, "sms");
    while app.sms.messages().await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no notice reached the gateway");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A summons sent on its own now takes the next slot or the one after, not the batch's last.
    let resp = app.submit(&key, "sms-alone", &light(pinfl.as_str(), "3-alone/2026")).await;
    assert_eq!(resp.status(), 202);
    let alone = resp.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let attempt: uuid::Uuid = sqlx::query_scalar("select id from attempt where item_id = $1::uuid and channel = 'sms'")
        .bind(&alone)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    while app.sms.messages().await.len() < n as usize + 1 {
        assert!(tokio::time::Instant::now() < deadline, "not every notice reached the gateway");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut received = app.sms.messages().await;
    received.sort_by_key(|m| m.received_at);
    let place = received.iter().position(|m| m.request.client_ref == attempt.to_string()).unwrap();
    let behind = received.len() - 1 - place;
    assert!(behind >= 20, "only {behind} of the batch's {n} notices went to the gateway after the one sent alone");
    cancel.cancel();
    worker.await.unwrap().unwrap();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_sent_again_is_the_same_item_in_the_lane_it_was_first_written_in() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-lanes-retry").await;
    let (pinfl, _) = app.citizen("3120588010403").await;
    let body = light(pinfl.as_str(), "4-1/2026");
    let first: Value = app.submit(&key, "retry-1", &body).await.json().await.unwrap();
    let id = first["id"].as_str().unwrap();

    // Again with the lane named, alone and then in a batch (whose default is bulk): the lane is
    // where an item goes, not what it is, so each is the first item, still in the standard lane.
    let mut named = body.clone();
    named["lane"] = "bulk".into();
    let again = app.submit(&key, "retry-1", &named).await;
    assert_eq!(again.status(), 202);
    assert_eq!(again.json::<Value>().await.unwrap()["id"], id);
    let mut item = body.clone();
    item["idempotency_key"] = "retry-1".into();
    let batch = app.submit_batch(&key, &[item]).await;
    assert_eq!(batch.status(), 202);
    assert_eq!(batch.json::<Value>().await.unwrap()["items"][0]["id"], id);
    let v: Value = app.get(&format!("/v1/correspondence/{id}"), &key).await.json().await.unwrap();
    assert_eq!(v["lane"], "standard");
    assert_eq!(app.count("select count(*) from item").await, 1);

    // Another body under the key is still refused.
    let mut other = named.clone();
    other["reference"] = "4-2/2026".into();
    assert_eq!(app.submit(&key, "retry-1", &other).await.status(), 409);
}
