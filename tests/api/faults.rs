use std::sync::{Arc, Mutex};
use std::time::Duration;

use dalil::app::Roles;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};

use crate::helpers::{amqp_base, summons, Options, TestApp};

/// A TCP proxy in front of RabbitMQ that can cut every open connection, as a network fault
/// or a broker restart would.
struct Proxy {
    port: u16,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let list = conns.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { return };
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect("127.0.0.1:5672").await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                list.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy { port, conns }
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn cut(&self) -> usize {
        let mut conns = self.conns.lock().unwrap();
        let n = conns.len();
        for c in conns.drain(..) {
            c.abort();
        }
        n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_still_arrive_once_when_the_broker_connection_drops_while_the_relay_publishes() {
    let proxy = Proxy::start().await;
    let app = TestApp::spawn_with(Options { amqp_url: Some(proxy.url()), ..Default::default() }).await;
    let key = app.agency("court-faults").await;
    let (pinfl, _) = app.citizen("3120588010023").await;

    let mut ids = Vec::new();
    for round in 0..4 {
        let submits = (0..25).map(|i| {
            let mut body = summons(pinfl.as_str());
            body["reference"] = format!("F-{round}-{i}").into();
            let key = key.clone();
            let app = &app;
            async move { app.submit(&key, &format!("f-{round}-{i}"), &body).await.json::<Value>().await.unwrap() }
        });
        let (answers, _) = tokio::join!(futures_util::future::join_all(submits), async {
            tokio::time::sleep(Duration::from_millis(15)).await;
            proxy.cut()
        });
        ids.extend(answers.into_iter().map(|v| v["id"].as_str().unwrap().to_string()));
    }
    assert_eq!(ids.len(), 100);
    for id in &ids {
        app.wait_for_status(&key, id, &["consigned"]).await;
    }
    assert_eq!(app.count("select count(*) from inbox_entry").await, 100);
    assert_eq!(app.count("select count(*) from evidence where event = 'ContentConsignment'").await, 100);
    // Published, and so deleted (the relay's commit may come just after the deposits): the
    // outbox keeps only what waits.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.count("select count(*) from outbox").await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "published outbox rows were not deleted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.count("select count(*) from attempt where status <> 'done'").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_dies_between_deposit_and_ack_does_not_deposit_twice() {
    // No worker yet: the test plays the one that dies.
    let mut app =
        TestApp::spawn_with(Options { roles: Roles { worker: false, ..Roles::ALL }, ..Default::default() }).await;
    let key = app.agency("court-crash").await;
    let (pinfl, _) = app.citizen("3120588010024").await;
    let v: Value = app.submit(&key, "crash-1", &summons(pinfl.as_str())).await.json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_string();

    let queue = format!("{}delivery.inbox", app.settings.queue_prefix);
    let conn = dalil::queue::connect(&amqp_base(), "test-dying-worker").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let message = loop {
        if let Some(m) = ch.basic_get(queue.as_str().into(), BasicGetOptions::default()).await.unwrap() {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // It deposits and commits...
    let outcome = dalil::worker::process(&app.pool, &dalil::channels::inbox::Inbox, &message.delivery.data).await;
    assert_eq!(outcome, dalil::worker::Outcome::Done);
    app.wait_for_status(&key, &id, &["consigned"]).await;
    // ...and dies before the ack: the broker takes the message back.
    drop(message);
    conn.close(320, "worker died".into()).await.unwrap();

    // The message comes back; a fresh consumer gets it marked as redelivered.
    let conn = dalil::queue::connect(&amqp_base(), "test-second-worker").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(queue.as_str().into(), "second".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let again = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.unwrap().unwrap().unwrap();
    assert!(again.redelivered);
    let outcome = dalil::worker::process(&app.pool, &dalil::channels::inbox::Inbox, &again.data).await;
    assert_eq!(outcome, dalil::worker::Outcome::Done);
    again.acker.ack(Default::default()).await.unwrap();
    conn.close(200, "ok".into()).await.unwrap();

    assert_eq!(app.count("select count(*) from inbox_entry").await, 1);
    assert_eq!(app.count("select count(*) from evidence where event = 'ContentConsignment'").await, 1);

    // The real worker loop on the same queue finds nothing more to do.
    let ch = dalil::queue::connect(&amqp_base(), "test-check").await.unwrap().create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_message_never_deposits_twice_even_when_processed_concurrently() {
    let app = TestApp::spawn_with(Options { roles: Roles { serve: true, ..Roles::NONE }, ..Default::default() }).await;
    let key = app.agency("court-dup").await;
    let (pinfl, _) = app.citizen("3120588010025").await;
    app.submit(&key, "dup-1", &summons(pinfl.as_str())).await;
    let payload: Value = sqlx::query_scalar("select payload from outbox").fetch_one(&app.pool).await.unwrap();
    let body = serde_json::to_vec(&payload).unwrap();
    let inbox = dalil::channels::inbox::Inbox;
    let outcomes =
        futures_util::future::join_all((0..8).map(|_| dalil::worker::process(&app.pool, &inbox, &body))).await;
    assert!(outcomes.iter().all(|o| *o == dalil::worker::Outcome::Done), "{outcomes:?}");
    assert_eq!(app.count("select count(*) from inbox_entry").await, 1);
    assert_eq!(app.count("select count(*) from evidence where event = 'ContentConsignment'").await, 1);
    // A message that names no attempt is dead on arrival.
    let bogus = serde_json::json!({ "type": "deliver", "version": 1, "item_id": uuid::Uuid::nil(), "step_id": uuid::Uuid::nil(),
        "attempt_id": uuid::Uuid::nil(), "trace_id": uuid::Uuid::nil() });
    assert!(matches!(
        dalil::worker::process(&app.pool, &inbox, bogus.to_string().as_bytes()).await,
        dalil::worker::Outcome::Dead(_)
    ));
    assert!(matches!(dalil::worker::process(&app.pool, &inbox, b"not json").await, dalil::worker::Outcome::Dead(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_evidence_table_refuses_update_delete_and_truncate() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-evidence").await;
    let (pinfl, _) = app.citizen("3120588010026").await;
    let v: Value = app.submit(&key, "e-1", &summons(pinfl.as_str())).await.json().await.unwrap();
    app.wait_for_status(&key, v["id"].as_str().unwrap(), &["consigned"]).await;
    dalil::log::sequence(&app.pool, true).await.unwrap();
    for sql in [
        "update evidence set event = 'Recall'",
        "update evidence set at = at - interval '1 day' where event = 'SubmissionAcceptance'",
        "delete from evidence",
        "truncate evidence",
        // The sequencer gives an index once; nobody moves or removes it afterwards.
        "update log_entry set log_index = log_index + 100",
        "delete from log_entry",
        "truncate log_entry",
    ] {
        let err = sqlx::query(sql).execute(&app.pool).await.unwrap_err();
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    assert_eq!(app.count("select count(*) from evidence").await, 2);
    assert_eq!(app.count("select count(*) from log_entry").await, 2);
}

/// The item's own rows (steps, attempts, messages, evidence, ...) hold its id, its agency's and
/// its recipient's without foreign keys (migration 11): what keeps them from pointing at nothing
/// is that those parents are never removed and never change their ids, whoever connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_items_parents_refuse_delete_truncate_and_a_new_id() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-parents").await;
    let (pinfl, _) = app.citizen("3120588010026").await;
    let v: Value = app.submit(&key, "p-1", &summons(pinfl.as_str())).await.json().await.unwrap();
    let item = v["id"].as_str().unwrap().to_string();
    app.wait_for_status(&key, &item, &["consigned"]).await;
    let tables = ["agency", "recipient", "item", "step", "attempt"];
    let before: Vec<i64> = {
        let mut n = Vec::new();
        for t in tables {
            n.push(app.count(&format!("select count(*) from {t}")).await);
        }
        n
    };
    for t in tables {
        for sql in [
            format!("delete from {t}"),
            format!("truncate {t} cascade"),
            format!("update {t} set id = gen_random_uuid()"),
        ] {
            let err = sqlx::query(&sql).execute(&app.pool).await.unwrap_err();
            assert!(err.to_string().contains("never removed"), "{sql}: {err}");
        }
    }
    for (t, n) in tables.iter().zip(before) {
        assert_eq!(app.count(&format!("select count(*) from {t}")).await, n, "{t}");
    }
    // Updates that leave the id alone still go through (the pipeline's own, above, did too).
    let updated = sqlx::query("update item set updated_at = updated_at where id = $1::uuid")
        .bind(&item)
        .execute(&app.pool)
        .await
        .unwrap();
    assert_eq!(updated.rows_affected(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_server_dropped_is_replaced_before_it_is_used() {
    let app = TestApp::spawn().await;
    let mut settings = app.settings.clone();
    settings.database.max_connections = 1;
    let pool = dalil::db::connect(&settings).await.unwrap();
    let pid: i32 = sqlx::query_scalar("select pg_backend_pid()").fetch_one(&pool).await.unwrap();
    // The server ends the pool's only connection (a restart, a dropped link, an idle timeout).
    let ended: bool =
        sqlx::query_scalar("select pg_terminate_backend($1)").bind(pid).fetch_one(&app.pool).await.unwrap();
    assert!(ended);
    // Idle for longer than a connection goes unchecked: the pool pings it, finds it gone and
    // opens another, so the statement does not fail.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let again: i32 = sqlx::query_scalar("select pg_backend_pid()").fetch_one(&pool).await.unwrap();
    assert_ne!(again, pid);
}

/// Connections a writer keeps between batches (`db::Kept`) stay out of the pool while they are
/// used, and go back to it beyond the number kept, once unused for a second, when the pool has
/// none to spare, and when kept with a transaction left open (which the way back ends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_kept_between_batches_are_reused_then_given_back() {
    use sqlx::Connection;
    async fn pid(conn: &mut sqlx::PgConnection) -> i32 {
        sqlx::query_scalar("select pg_backend_pid()").fetch_one(conn).await.unwrap()
    }
    async fn idle_becomes(pool: &sqlx::PgPool, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while pool.num_idle() != n {
            assert!(tokio::time::Instant::now() < deadline, "{} idle in the pool, not {n}", pool.num_idle());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let app = TestApp::spawn().await;
    let mut settings = app.settings.clone();
    settings.database.max_connections = 4;
    let pool = dalil::db::connect(&settings).await.unwrap();
    let kept = dalil::db::Kept::new(pool.clone(), 2);
    let (mut a, mut b) = (kept.acquire().await.unwrap(), kept.acquire().await.unwrap());
    let (pa, pb) = (pid(&mut a).await, pid(&mut b).await);
    a.keep();
    b.keep();
    // Kept, not given back: none is idle in the pool, now or a moment later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pool.num_idle(), 0);
    // Taken again, the one used last first.
    let mut again = kept.acquire().await.unwrap();
    assert_eq!(pid(&mut again).await, pb);
    let mut other = kept.acquire().await.unwrap();
    assert_eq!(pid(&mut other).await, pa);
    // A third, from the pool; kept with the two, one more than are kept: it goes back.
    let third = kept.acquire().await.unwrap();
    again.keep();
    other.keep();
    third.keep();
    idle_becomes(&pool, 1).await;
    // Unused for over a second, the kept ones go back too.
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    idle_becomes(&pool, 3).await;

    // Kept with its transaction given up but not yet ended (the rollback only queued): back to
    // the pool, whose way back ends the transaction.
    let mut conn = kept.acquire().await.unwrap();
    let open = pid(&mut conn).await;
    {
        let mut tx = conn.begin().await.unwrap();
        sqlx::query("select pg_current_xact_id()").execute(&mut *tx).await.unwrap();
    }
    conn.keep();
    idle_becomes(&pool, 3).await;
    let state: String = sqlx::query_scalar("select state from pg_stat_activity where pid = $1")
        .bind(open)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(state, "idle");

    // A pool with nothing to spare gets the kept ones back at once (not a second later).
    settings.database.max_connections = 2;
    let pool = dalil::db::connect(&settings).await.unwrap();
    let kept = dalil::db::Kept::new(pool.clone(), 2);
    let (a, b) = (kept.acquire().await.unwrap(), kept.acquire().await.unwrap());
    // Both of the pool's connections taken: the first kept goes back, the second then stays.
    a.keep();
    idle_becomes(&pool, 1).await;
    b.keep();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pool.num_idle(), 1);
    // Someone else takes the idle one and asks for another: the kept one comes back for it.
    let _held = pool.acquire().await.unwrap();
    let asked = std::time::Instant::now();
    let got = tokio::time::timeout(Duration::from_millis(700), pool.acquire()).await;
    assert!(got.is_ok(), "waited {:?} for a connection kept idle", asked.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pools_sessions_carry_the_configured_postgresql_settings() {
    let app = TestApp::spawn().await;
    let mut settings = app.settings.clone();
    settings.database.max_connections = 1;
    settings.database.session.insert("statement_timeout".into(), toml::Value::String("1234 ms".into()));
    let pool = dalil::db::connect(&settings).await.unwrap();
    let cost: String = sqlx::query_scalar("show random_page_cost").fetch_one(&pool).await.unwrap();
    assert_eq!(cost, "1.1", "config/default.toml's value");
    let timeout: String = sqlx::query_scalar("show statement_timeout").fetch_one(&pool).await.unwrap();
    assert_eq!(timeout, "1234ms", "a value with a space arrives whole");
    // A name PostgreSQL does not know is refused when the pool opens, not ignored.
    settings.database.session.insert("random_page_costs".into(), toml::Value::Float(1.0));
    let err = dalil::db::connect(&settings).await.unwrap_err();
    assert!(format!("{err:#}").contains("random_page_costs"), "{err:#}");
}
