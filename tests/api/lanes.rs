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
    let items: Vec<Value> = (0..n)
        .map(|i| {
            let mut body = light(pinfl.as_str(), &format!("2-{i}/2026"));
            body["idempotency_key"] = format!("bulk-{i}").into();
            body
        })
        .collect();
    let resp = app.submit_batch(&key, &items).await;
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
    let topology = dalil::app::load_topology(&app.settings).unwrap();
    let cancel = CancellationToken::new();
    let worker = tokio::spawn(dalil::worker::run(
        app.pool.clone(),
        app.settings.clone(),
        topology,
        vec!["inbox".into()],
        cancel.clone(),
    ));
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
