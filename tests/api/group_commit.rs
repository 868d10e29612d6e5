//! Submissions that arrive together are written together (one statement, one transaction),
//! and each is still its own: its own claim, its own rows, its own error.

use std::collections::HashSet;

use reqwest::Response;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{summons, Options, TestApp};

/// One statement in flight, so submissions that arrive meanwhile must share the next one.
fn one_at_a_time() -> Options {
    Options { tweak: |s| s.api.group_concurrency = 1, ..Default::default() }
}

/// Submits `bodies` under `keys` so that they arrive together: a first submission takes the
/// intake's one slot and waits on a lock of the idempotency keys' table (nothing but a
/// submission writes it), the others queue behind it meanwhile, and the lock goes 1.5 s later.
/// Returns their answers.
async fn submit_together(app: &TestApp, api_key: &str, keys: &[String], bodies: &[Value]) -> Vec<Response> {
    let mut lock = app.pool.begin().await.unwrap();
    sqlx::query("lock table idempotency in share mode").execute(&mut *lock).await.unwrap();
    let mut first = bodies[0].clone();
    first["reference"] = "the first".into();
    let blocked = app.submit(api_key, "the-first", &first);
    let rest = async {
        app.wait_for_a_lock_wait("the first submission").await;
        let others = futures_util::future::join_all(keys.iter().zip(bodies).map(|(k, b)| app.submit(api_key, k, b)));
        let release = async move {
            tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
            lock.rollback().await.unwrap();
        };
        tokio::join!(others, release).0
    };
    let (first, answers) = tokio::join!(blocked, rest);
    assert_eq!(first.status(), 202);
    answers
}

/// Transactions that wrote idempotency keys (a row nothing updates keeps its writer's xmin).
async fn key_transactions(app: &TestApp) -> i64 {
    app.count("select count(distinct xmin::text) from idempotency").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submissions_share_transactions_and_keep_their_own_rows() {
    let app = TestApp::spawn_with(one_at_a_time()).await;
    let key = app.agency("court-gc").await;
    let (pinfl, _) = app.citizen("3120588010031").await;
    let n = 40;
    let bodies: Vec<Value> = (0..n)
        .map(|i| {
            let mut b = summons(pinfl.as_str());
            b["reference"] = format!("2-{i}/2026").into();
            b
        })
        .collect();
    let keys: Vec<String> = (0..n).map(|i| format!("gc-{i}")).collect();
    let answers = submit_together(&app, &key, &keys, &bodies).await;
    // The first submission in one transaction, the forty that waited behind it in one more
    // (or a few, if some came late).
    let transactions = key_transactions(&app).await;
    assert!(transactions <= 3, "{n} submissions that waited together took {transactions} transactions");
    let mut ids = HashSet::new();
    for (i, a) in answers.into_iter().enumerate() {
        assert_eq!(a.status(), 202);
        let v: Value = a.json().await.unwrap();
        // Each answer is its own item's, with its own acceptance record.
        assert_eq!(v["reference"], format!("2-{i}/2026"));
        assert_eq!(v["evidence"]["event"], "SubmissionAcceptance");
        let id = v["id"].as_str().unwrap().to_string();
        let stored: String = sqlx::query_scalar("select reference from item where id = $1::uuid")
            .bind(&id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
        assert_eq!(stored, format!("2-{i}/2026"));
        let accepted: Uuid = sqlx::query_scalar(
            "select evidence_id from evidence where item_id = $1::uuid and event = 'SubmissionAcceptance'",
        )
        .bind(&id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert_eq!(accepted.to_string(), v["evidence"]["evidence_id"].as_str().unwrap());
        ids.insert(id);
    }
    assert_eq!(ids.len(), n);
    assert_eq!(app.count("select count(*) from idempotency").await, n as i64 + 1);
    assert_eq!(app.count("select count(*) from attachment").await, n as i64 + 1);
    assert_eq!(app.count("select count(*) from evidence where event = 'SubmissionAcceptance'").await, n as i64 + 1);
    // Every item is delivered as if it had come alone.
    for id in &ids {
        app.wait_for_status(&key, id, &["consigned"]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_that_fails_to_write_fails_alone() {
    let app = TestApp::spawn_with(one_at_a_time()).await;
    let key = app.agency("court-gf").await;
    let (pinfl, _) = app.citizen("3120588010032").await;
    // A fault only the database sees: one reference cannot be written.
    app.refuse_poison().await;
    let n = 30;
    let poison = 17;
    let bodies: Vec<Value> = (0..n)
        .map(|i| {
            let mut b = summons(pinfl.as_str());
            b["reference"] = if i == poison { "poison".into() } else { format!("2-{i}/2026").into() };
            b
        })
        .collect();
    let keys: Vec<String> = (0..n).map(|i| format!("gf-{i}")).collect();
    let answers = submit_together(&app, &key, &keys, &bodies).await;
    for (i, a) in answers.into_iter().enumerate() {
        if i == poison {
            assert_eq!(a.status(), 500);
        } else {
            assert_eq!(a.status(), 202, "submission {i}");
        }
    }
    // The batch the poisoned one was in failed, and each of the others was written again
    // alone: the first submission's transaction and one for each of the 29.
    assert_eq!(key_transactions(&app).await, n as i64);
    assert_eq!(app.count("select count(*) from item").await, n as i64);
    // The failed one left nothing, not even its key: a retry can succeed.
    assert_eq!(app.count("select count(*) from idempotency where key = 'gf-17'").await, 0);
    assert_eq!(app.count("select count(*) from evidence where event = 'SubmissionAcceptance'").await, n as i64);
    sqlx::query("drop trigger refuse_poison on item").execute(&app.pool).await.unwrap();
    assert_eq!(app.submit(&key, "gf-17", &bodies[poison]).await.status(), 202);
    assert_eq!(app.count("select count(*) from item where reference = 'poison'").await, 1);
    assert_eq!(app.count("select count(*) from item").await, n as i64 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_that_arrive_together_settle_each_message_once() {
    let app = TestApp::spawn_with(one_at_a_time()).await;
    // The simulator's own reports come too late to matter: these are the test's.
    app.sms.set(dalil::sim::Behaviour { report_delay_ms: 120_000, ..Default::default() }).await;
    let key = app.agency("court-gr").await;
    let items = 5;
    for i in 0..items {
        let (pinfl, _) =
            app.citizen_with(&format!("31205880100{}", 40 + i), Some(&format!("+99890123450{i}")), None).await;
        assert_eq!(app.submit(&key, &format!("gr-{i}"), &summons(pinfl.as_str())).await.status(), 202);
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while app.count("select count(*) from sms_message where status = 'accepted'").await < items {
        assert!(tokio::time::Instant::now() < deadline, "the SMS notices were not sent");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let provider_ids: Vec<String> =
        sqlx::query_scalar("select provider_id from sms_message").fetch_all(&app.pool).await.unwrap();
    // Six reports per message, at once: three say delivered, three undelivered, and repeats.
    let url = app.url("/v1/providers/sms/sim/reports");
    let posts = provider_ids.iter().flat_map(|id| {
        ["delivered", "undelivered", "delivered", "undelivered", "delivered", "undelivered"].map(|status| {
            app.client
                .post(&url)
                .bearer_auth("test-report-secret")
                .json(&serde_json::json!({ "id": id, "status": status }))
                .send()
        })
    });
    let answers = futures_util::future::join_all(posts).await;
    let mut taken = 0;
    for a in answers {
        let a = a.unwrap();
        assert_eq!(a.status(), 200);
        let v: Value = a.json().await.unwrap();
        taken += i64::from(v["taken"] == true);
    }
    assert_eq!(taken, items, "each message is settled by one report");
    // One record per message, and it says what the message's status says.
    assert_eq!(
        app.count(
            "select count(*) from sms_message m join evidence e on e.item_id = m.item_id and e.channel = 'sms'
             and e.event = case m.status when 'delivered' then 'NotificationDelivered'
                                         else 'ConsignmentNotificationFailure' end
             where m.status in ('delivered', 'failed')"
        )
        .await,
        items
    );
    assert_eq!(
        app.count(
            "select count(*) from evidence
             where event in ('NotificationDelivered', 'ConsignmentNotificationFailure')"
        )
        .await,
        items
    );
}

/// Backends of this database waiting for a lock on `table`.
async fn waiting_on(conn: &mut sqlx::PgConnection, table: &str) -> i64 {
    sqlx::query_scalar(
        "select count(*) from pg_locks l join pg_class c on c.oid = l.relation
         where not l.granted and c.relname = $1
           and l.database = (select oid from pg_database where datname = current_database())",
    )
    .bind(table)
    .fetch_one(conn)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_made_together_share_a_statement_and_each_gets_its_own_answer() {
    // The API alone: nothing else reads the tables the test locks.
    let app = TestApp::spawn_with(Options {
        roles: dalil::app::Roles { serve: true, ..dalil::app::Roles::NONE },
        ..one_at_a_time()
    })
    .await;
    let agencies = ["court-la", "court-lb"];
    let keys = [app.agency(agencies[0]).await, app.agency(agencies[1]).await];
    let mut pinfls = Vec::new();
    for i in 0..3 {
        pinfls.push(app.citizen(&format!("312058801006{i}")).await.0.to_string());
    }
    // Valid, but registered to nobody.
    let unknown = dalil::domain::Pinfl::with_check_digit("3120588010069").to_string();
    let n = 24;
    // Out of the pool, which requests that wait one by one would fill.
    let mut watch = app.pool.acquire().await.unwrap().detach();
    for table in ["api_key", "recipient"] {
        // A first submission takes the one slot of the reads of `table` and waits for the
        // lock; the others queue behind it meanwhile.
        let mut lock = app.pool.begin().await.unwrap();
        sqlx::query(&format!("lock table {table} in access exclusive mode")).execute(&mut *lock).await.unwrap();
        let (first_key, first_body) = (format!("{table}-first"), summons(&pinfls[0]));
        let blocked = app.submit(&keys[0], &first_key, &first_body);
        let app = &app;
        let watch = &mut watch;
        let rest = async {
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            while waiting_on(watch, table).await == 0 {
                assert!(tokio::time::Instant::now() < deadline, "the first submission never waited for {table}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            // Every fourth for a recipient nobody registered; every sixth with a key nobody holds.
            let sends = (0..n).map(|i| {
                let key = if i % 6 == 5 { "dalil_0000000000000000".to_string() } else { keys[i % 2].clone() };
                let mut body = summons(if i % 4 == 3 { &unknown } else { &pinfls[i % 3] });
                body["reference"] = format!("{table}-{i}").into();
                async move { (i, app.submit(&key, &format!("{table}-{i}"), &body).await) }
            });
            let answers = futures_util::future::join_all(sends);
            let release = async move {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                let waiting = waiting_on(watch, table).await;
                lock.rollback().await.unwrap();
                waiting
            };
            tokio::join!(answers, release)
        };
        let (first, (answers, waiting)) = tokio::join!(blocked, rest);
        // One statement read for all that waited: alone, each would have waited on its own.
        assert_eq!(waiting, 1, "{waiting} reads of {table} waited for the lock at once");
        assert_eq!(first.status(), 202);
        for (i, a) in answers {
            if i % 6 == 5 {
                assert_eq!(a.status(), 401, "{table} {i}");
                continue;
            }
            if i % 4 == 3 {
                assert_eq!(a.status(), 422, "{table} {i}");
                let v: Value = a.json().await.unwrap();
                assert_eq!(v["field"], "recipient.pinfl");
                continue;
            }
            assert_eq!(a.status(), 202, "{table} {i}");
            let v: Value = a.json().await.unwrap();
            // Each item is its own agency's and its own recipient's.
            let (agency, pinfl): (String, String) = sqlx::query_as(
                "select a.code, r.pinfl from item i join agency a on a.id = i.agency_id
                 join recipient r on r.id = i.recipient_id where i.id = $1::uuid",
            )
            .bind(v["id"].as_str().unwrap())
            .fetch_one(&app.pool)
            .await
            .unwrap();
            assert_eq!((agency.as_str(), pinfl.as_str()), (agencies[i % 2], pinfls[i % 3].as_str()), "{table} {i}");
        }
    }
    // Per table: the first, and the 24 less the 4 with a bad key (5, 11, 17, 23) and the 4 others
    // for nobody (3, 7, 15, 19).
    assert_eq!(app.count("select count(*) from item").await, 2 * (1 + 24 - 4 - 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_fails_answers_every_request_that_shared_it_at_once() {
    // The API alone, with two connections that give up waiting for a free one after 300 ms.
    let app = TestApp::spawn_with(Options {
        roles: dalil::app::Roles { serve: true, ..dalil::app::Roles::NONE },
        tweak: |s| {
            s.api.group_concurrency = 1;
            s.database.max_connections = 2;
            s.database.acquire_timeout_ms = 300;
        },
        ..Default::default()
    })
    .await;
    let key = app.agency("court-lf").await;
    let (pinfl, _) = app.citizen("3120588010070").await;
    let body = summons(pinfl.as_str());
    // Both connections held: every read fails for want of one, a fault of the whole database
    // and not of any key.
    let held = (app.pool.acquire().await.unwrap(), app.pool.acquire().await.unwrap());
    let idem: Vec<String> = (0..25).map(|i| format!("lf-{i}")).collect();
    let started = std::time::Instant::now();
    let answers = futures_util::future::join_all(idem.iter().map(|k| app.submit(&key, k, &body))).await;
    let took = started.elapsed();
    drop(held);
    assert!(answers.iter().all(|a| a.status() == 503), "{:?}", answers.iter().map(|a| a.status()).collect::<Vec<_>>());
    // A few batches of one pool timeout each. Retried one by one, as a failed write batch is,
    // the last request would have waited 25 timeouts (7.5 s).
    assert!(took < std::time::Duration::from_secs(4), "25 failed reads took {took:?}");
    assert_eq!(app.count("select count(*) from item").await, 0);
}

/// Submits a first item and waits until it is in the inbox (so the relay and the workers are
/// running), then four more 150 ms apart, each answered before the next is sent, and waits
/// until those are in the inbox too. Returns the four's ids.
async fn trickle(app: &TestApp, key: &str, agency: &str) -> Vec<String> {
    let (pinfl, _) = app.citizen("3120588010034").await;
    let submit = |i: usize| {
        let mut body = summons(pinfl.as_str());
        body["reference"] = format!("7-{i}/2026").into();
        async move {
            let answer = app.submit(key, &format!("{agency}-{i}"), &body).await;
            assert_eq!(answer.status(), 202);
            answer.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string()
        }
    };
    let first = submit(0).await;
    app.wait_for_status(key, &first, &["consigned"]).await;
    let started = std::time::Instant::now();
    let mut ids = Vec::new();
    for i in 1..=4 {
        ids.push(submit(i).await);
        if i < 4 {
            tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        }
    }
    // Within the 1 s wait of the tests below, so at most two waits can split them.
    assert!(started.elapsed() < std::time::Duration::from_millis(1000), "the submissions took {:?}", started.elapsed());
    for id in &ids {
        app.wait_for_status(key, id, &["consigned"]).await;
    }
    ids
}

/// A batch whose first delivery had to be waited for waits `worker.batch_wait_ms` for more:
/// items that come one by one within that time are deposited together, where each used to be
/// a batch (and a transaction) of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_that_trickle_into_an_idle_queue_are_recorded_together() {
    let app = TestApp::spawn_with(Options { tweak: |s| s.worker.batch_wait_ms = 1000, ..Default::default() }).await;
    let key = app.agency("court-gw").await;
    let ids: Vec<Uuid> = trickle(&app, &key, "court-gw").await.iter().map(|id| id.parse().unwrap()).collect();
    // Inbox entries are never updated here (nobody opens them), so each keeps its writer's
    // xmin. Four items within one wait: one batch, or two if the wait began just before the
    // first of them (without the wait: four).
    let transactions: i64 =
        sqlx::query_scalar("select count(distinct xmin::text) from inbox_entry where item_id = any($1)")
            .bind(&ids)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(transactions <= 2, "four deliveries 150 ms apart on an idle queue took {transactions} transactions");
}

/// Once a commit wakes the relay, it lets rows gather for `relay.batch_wait_ms` before it
/// claims them, and waits as long again after a round that found rows: outbox rows committed
/// one by one within that time are published in one round, or two (without the wait: four).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_rows_that_trickle_in_are_published_together() {
    let app = TestApp::spawn_with(Options { tweak: |s| s.relay.batch_wait_ms = 1000, ..Default::default() }).await;
    app.keep_published_outbox_rows().await;
    let key = app.agency("court-gr").await;
    let ids = trickle(&app, &key, "court-gr").await;
    // A round deletes its rows in one transaction once they are published.
    let (rows, rounds): (i64, i64) = sqlx::query_as(
        "select count(*), count(distinct round) from outbox_published where payload->>'item_id' = any($1)",
    )
    .bind(&ids)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(rows, 4);
    assert!(rounds <= 2, "four items 150 ms apart were published in {rounds} rounds");
}

/// The page (block number) each row of `table` is on, by its key.
async fn pages(app: &TestApp, table: &str, key: &str) -> std::collections::HashMap<String, i64> {
    let sql = format!("select {key}::text, (ctid::text::point)[0]::bigint from {table}");
    sqlx::query_as::<_, (String, i64)>(&sql).fetch_all(&app.pool).await.unwrap().into_iter().collect()
}

/// The rows of `table` that left the page they were on in `before` (or were not there).
async fn moved(app: &TestApp, table: &str, key: &str, before: &std::collections::HashMap<String, i64>) -> usize {
    let after = pages(app, table, key).await;
    assert_eq!(after.len(), before.len(), "{table}: rows came or went");
    after.iter().filter(|(k, page)| before.get(*k) != Some(*page)).count()
}

/// `n` messages taken off `queue` (acknowledged as they are taken).
async fn take(app: &TestApp, queue: &str, n: usize) -> Vec<Vec<u8>> {
    let queue = format!("{}{queue}", app.settings.queue_prefix);
    let conn = dalil::queue::connect(&crate::helpers::amqp_base(), "test-take").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut bodies = Vec::new();
    while bodies.len() < n {
        let options = lapin::options::BasicGetOptions { no_ack: true };
        match ch.basic_get(queue.as_str().into(), options).await.unwrap() {
            Some(m) => bodies.push(m.delivery.data.clone()),
            None => {
                assert!(tokio::time::Instant::now() < deadline, "{queue}: {} of {n} messages", bodies.len());
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    conn.close(200, "ok".into()).await.unwrap();
    bodies
}

/// Rows written together sit together, and their deliveries are recorded together: one
/// statement updates every attempt, step and item on a page at once, when no old version on it
/// can be pruned yet. Each page keeps room for one new version of every row on it, so each of
/// those updates is HOT: the row stays on its page and no index gains an entry (with a fifth
/// to a third of the page free, most rows of a batch moved, with an entry in every index).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_recorded_together_update_their_rows_in_place() {
    use dalil::worker::{process_batch, Outcome};
    // The test is the worker, so it can look at the pages between the writes.
    let app = TestApp::spawn_with(Options {
        roles: dalil::app::Roles { worker: false, ..dalil::app::Roles::ALL },
        ..Default::default()
    })
    .await;
    // Reports come late enough to see the SMS messages' pages before them.
    app.sms.set(dalil::sim::Behaviour { report_delay_ms: 3000, ..Default::default() }).await;
    let key = app.agency("court-hot").await;
    let (pinfl, _) = app.citizen_with("3120588010044", Some("+998901234567"), None).await;
    let n = 40;
    let items: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "idempotency_key": format!("hot-{i}"),
                "kind": "notification",
                "recipient": { "pinfl": pinfl.as_str() },
                "template": "notice",
                "language": "uz-Latn",
                "reference": format!("N-{i}"),
                "personalisation": { "title": "Murojaatingiz koʻrib chiqildi", "body": "Qaror qabul qilindi." }
            })
        })
        .collect();
    assert_eq!(app.submit_batch(&key, &items).await.status(), 202);
    let (attempts, steps, item_rows) =
        (pages(&app, "attempt", "id").await, pages(&app, "step", "id").await, pages(&app, "item", "id").await);
    assert_eq!((attempts.len(), steps.len(), item_rows.len()), (2 * n, 2 * n, n));

    let kept = dalil::db::Kept::new(app.pool.clone(), 2);
    let inbox = take(&app, "delivery.inbox.bulk", n).await;
    let bodies: Vec<&[u8]> = inbox.iter().map(Vec::as_slice).collect();
    let outcomes = process_batch(&kept, &dalil::channels::inbox::Inbox, &bodies).await;
    assert!(outcomes.iter().all(|o| *o == Outcome::Done), "{outcomes:?}");
    let sms_channel = dalil::channels::build("sms", &app.settings, &app.pool).unwrap();
    let sms = take(&app, "delivery.sms.bulk", n).await;
    let bodies: Vec<&[u8]> = sms.iter().map(Vec::as_slice).collect();
    let outcomes = process_batch(&kept, sms_channel.as_ref(), &bodies).await;
    assert!(outcomes.iter().all(|o| *o == Outcome::Done), "{outcomes:?}");
    let messages = pages(&app, "sms_message", "attempt_id").await;
    assert_eq!(messages.len(), n);
    assert_eq!(app.count("select count(*) from sms_message where status = 'accepted'").await, n as i64);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while app.count("select count(*) from sms_message where status = 'delivered'").await < n as i64 {
        assert!(tokio::time::Instant::now() < deadline, "the SMS reports were not recorded");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    assert_eq!(app.count("select count(*) from attempt where status = 'done'").await, 2 * n as i64);
    assert_eq!(app.count("select count(*) from step where status = 'done'").await, 2 * n as i64);
    assert_eq!(app.count("select count(*) from item where status = 'consigned'").await, n as i64);
    let moved = (
        moved(&app, "attempt", "id", &attempts).await,
        moved(&app, "step", "id", &steps).await,
        moved(&app, "item", "id", &item_rows).await,
        moved(&app, "sms_message", "attempt_id", &messages).await,
    );
    assert_eq!(moved, (0, 0, 0, 0), "rows (attempts, steps, items, SMS messages) that left their page");
}

/// The relay claims by the primary key alone. A row that an older version published and
/// marked (it deleted nothing; a rolling upgrade can leave one) is deleted, not published
/// again: this one names an exchange that does not exist, so publishing it would fail and
/// leave it in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_an_older_relay_marked_published_is_deleted_not_published_again() {
    let app = TestApp::spawn().await;
    sqlx::query(
        "insert into outbox (exchange, routing_key, message_id, payload, published_at)
         values ('no-such-exchange', 'inbox', gen_random_uuid(), '{}', now())",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while app.count("select count(*) from outbox").await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the marked row is still in the outbox");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
