//! Spawns Dalil against the real PostgreSQL and RabbitMQ: each test gets its own database and
//! its own queue prefix, so tests run in parallel. Everything is removed when the test ends.

use std::path::PathBuf;
use std::time::Duration;

use dalil::app::{self, App, Roles};
use dalil::config::Settings;
use dalil::domain::Pinfl;
use reqwest::{Client, Response};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub fn postgres_base() -> String {
    std::env::var("DALIL_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

pub fn amqp_base() -> String {
    std::env::var("DALIL_TEST_AMQP").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub struct Options {
    pub roles: Roles,
    /// Point the app at another broker address (a fault-injecting proxy).
    pub amqp_url: Option<String>,
    /// The SMTP server email notices go to (host, port).
    pub smtp: Option<(String, u16)>,
    /// Any other change to the settings.
    pub tweak: fn(&mut Settings),
}

impl Default for Options {
    fn default() -> Self {
        Options { roles: Roles::ALL, amqp_url: None, smtp: None, tweak: |_| {} }
    }
}

pub struct TestApp {
    pub address: String,
    pub pool: PgPool,
    pub settings: Settings,
    pub client: Client,
    pub db_name: String,
    /// The SMS gateway simulator this app sends to.
    pub sms: dalil::sim::Simulator,
    cancel: CancellationToken,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: TempDir,
}

/// A folder removed on drop (keys of this test's identity provider).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn repo_path(p: &str) -> String {
    format!("{}/{p}", env!("CARGO_MANIFEST_DIR"))
}

/// The shipped topology with its retry delays cut to fractions of a second.
fn short_retries_topology(dir: &std::path::Path) -> String {
    let text = std::fs::read_to_string(repo_path("queues/topology.toml")).unwrap();
    let text = [("5000", "300"), ("30000", "600"), ("300000", "900"), ("3600000", "1200")].iter().fold(
        text,
        |t, (from, to)| {
            t.replace(&format!("\"x-message-ttl\" = {from},"), &format!("\"x-message-ttl\" = {to},"))
                .replace(&format!("retry_delay_ms = {from}\n"), &format!("retry_delay_ms = {to}\n"))
        },
    );
    let path = dir.join("topology.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// A test's own id, scratch folder (`dalil-<what>-<id>` in the temp dir) and settings, for
/// tests that start Dalil their own way rather than through [`TestApp`].
pub fn scratch(what: &str) -> (String, PathBuf, Settings) {
    let id = Uuid::new_v4().simple().to_string()[..12].to_string();
    let dir = std::env::temp_dir().join(format!("dalil-{what}-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let settings = test_settings(&id, &dir, &amqp_base());
    (id, dir, settings)
}

/// Settings for one test: its own database name, queue prefix and keys.
pub fn test_settings(id: &str, dir: &std::path::Path, amqp_url: &str) -> Settings {
    let defaults = std::fs::read_to_string(repo_path("config/default.toml")).unwrap();
    let env = [
        ("DALIL_DATABASE_URL", format!("{}/dalil_test_{id}", postgres_base())),
        ("DALIL_AMQP_URL", amqp_url.to_string()),
        ("DALIL_LISTEN", "127.0.0.1:0".into()),
        ("DALIL_QUEUE_PREFIX", format!("t{id}.")),
        ("DALIL_QUEUE_EXPIRES_MS", "900000".into()),
        ("DALIL_TEMPLATES_DIR", repo_path("templates")),
        ("DALIL_POLICIES_FILE", repo_path("config/policies.toml")),
        ("DALIL_TOPOLOGY_FILE", short_retries_topology(dir)),
        ("DALIL_DATABASE__MAX_CONNECTIONS", "8".into()),
        ("DALIL_RELAY__POLL_INTERVAL_MS", "200".into()),
        ("DALIL_IDENTITY__PUBLIC_KEY_FILE", dir.join("idp.pub.pem").display().to_string()),
        ("DALIL_IDENTITY__DEV_PRIVATE_KEY_FILE", dir.join("idp.pem").display().to_string()),
        ("DALIL_LOG__KEY_DIR", dir.join("log-keys").display().to_string()),
        ("DALIL_LOG__ORIGIN", "dalil.test/evidence".into()),
        ("DALIL_LOG__KEY_NAME", "dalil.test/evidence".into()),
    ];
    Settings::from_sources(&defaults, env.into_iter().map(|(k, v)| (k.to_string(), v))).unwrap()
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(Options::default()).await
    }

    pub async fn spawn_with(options: Options) -> TestApp {
        let id = Uuid::new_v4().simple().to_string()[..12].to_string();
        let dir = std::env::temp_dir().join(format!("dalil-test-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let amqp = options.amqp_url.clone().unwrap_or_else(amqp_base);
        let mut settings = test_settings(&id, &dir, &amqp_base());
        let cancel = CancellationToken::new();
        // Each app has its own SMS gateway simulator, quiet.
        let sms = dalil::sim::Simulator::new("test-sms-token", "test-report-secret", true);
        let sim_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        settings.sms.base_url = format!("http://{}", sim_listener.local_addr().unwrap());
        settings.sms.token = "test-sms-token".to_string().into();
        settings.sms.report_secret = "test-report-secret".to_string().into();
        settings.sms.rate_per_second = 1000;
        tokio::spawn(sms.clone().serve(sim_listener, cancel.clone()));
        if let Some((host, port)) = &options.smtp {
            settings.email.smtp_host = host.clone();
            settings.email.smtp_port = *port;
        }
        (options.tweak)(&mut settings);
        dalil::db::migrate(&settings).await.expect("migrations");
        // The topology is declared straight on the broker, whatever the app goes through.
        app::declare_topology(&settings).await.expect("topology");
        settings.amqp_url = amqp.into();
        // Reports come back to this app's own address, known once it is bound.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        settings.listen = format!("127.0.0.1:{port}");
        settings.public_url = format!("http://127.0.0.1:{port}");
        let app = App::build(settings.clone()).await.expect("app builds");
        let address = format!("http://127.0.0.1:{}", app.port());
        let pool = app.pool.clone();
        let channels = vec!["inbox".into(), "sms".into(), "email".into(), "postal".into(), "webhooks".into()];
        let handle = tokio::spawn(app.run_until_stopped(options.roles, channels, cancel.clone()));
        TestApp {
            address,
            pool,
            settings,
            client: Client::new(),
            db_name: format!("dalil_test_{id}"),
            sms,
            cancel,
            handle: Some(handle),
            _dir: TempDir(dir),
        }
    }

    /// Stops every role and waits until they drained.
    pub async fn stop(&mut self) {
        self.cancel.cancel();
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(20), h).await.expect("roles stop in time").unwrap().unwrap();
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn agency(&self, code: &str) -> String {
        dalil::admin::agency_create(&self.pool, code, &format!("Agency {code}")).await.unwrap();
        dalil::admin::api_key_create(&self.pool, code).await.unwrap()["key"].as_str().unwrap().to_string()
    }

    /// A citizen with no phone or email on record: items reach only their inbox.
    pub async fn citizen(&self, first13: &str) -> (Pinfl, String) {
        self.citizen_with(first13, None, None).await
    }

    /// A citizen with the given contact points (notices go to them).
    pub async fn citizen_with(&self, first13: &str, phone: Option<&str>, email: Option<&str>) -> (Pinfl, String) {
        let pinfl = Pinfl::with_check_digit(first13);
        let input = dalil::admin::RecipientInput {
            pinfl: Some(pinfl.to_string()),
            name: Some("Aliyev Aziz".into()),
            phone: phone.map(String::from),
            email: email.map(String::from),
            digital_consent: Some(true),
            ..Default::default()
        };
        dalil::admin::recipient_upsert(&self.pool, &input).await.unwrap();
        let token = dalil::admin::citizen_token(&self.settings, pinfl.as_str(), 600).unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string();
        (pinfl, token)
    }

    pub async fn submit(&self, key: &str, idempotency_key: &str, body: &Value) -> Response {
        self.client
            .post(self.url("/v1/correspondence"))
            .bearer_auth(key)
            .header("Idempotency-Key", idempotency_key)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str, token: &str) -> Response {
        self.client.get(self.url(path)).bearer_auth(token).send().await.unwrap()
    }

    pub async fn post(&self, path: &str, token: &str) -> Response {
        self.client.post(self.url(path)).bearer_auth(token).send().await.unwrap()
    }

    /// Waits until the item reaches `status` (or later), returning its view.
    pub async fn wait_for_status(&self, key: &str, id: &str, statuses: &[&str]) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let item: Value = self.get(&format!("/v1/correspondence/{id}"), key).await.json().await.unwrap();
            if statuses.contains(&item["status"].as_str().unwrap_or("")) {
                return item;
            }
            assert!(tokio::time::Instant::now() < deadline, "item {id} stuck in {}", item["status"]);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.pool).await.unwrap()
    }

    /// A fault only the database sees, until the trigger `refuse_poison` on `item` is dropped:
    /// an item with the reference `poison` cannot be written.
    pub async fn refuse_poison(&self) {
        self.execute(
            "create function refuse_poison() returns trigger language plpgsql as $$
             begin
                if new.reference = 'poison' then raise exception 'injected fault'; end if;
                return new;
             end $$;
             create trigger refuse_poison before insert on item for each row execute function refuse_poison();",
        )
        .await;
    }

    /// Runs SQL (several statements allowed) on this app's database, as its owner.
    pub async fn execute(&self, sql: &str) {
        sqlx::raw_sql(sql).execute(&self.pool).await.unwrap();
    }

    /// Waits until a connection to this app's database waits for a lock.
    pub async fn wait_for_a_lock_wait(&self, who: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self
            .count(
                "select count(*) from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock'",
            )
            .await
            == 0
        {
            assert!(tokio::time::Instant::now() < deadline, "{who} never waited for the lock");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Rows in every table a submission writes. Its outbox rows, which the relay deletes once
    /// published, are counted by their attempts (one each).
    pub async fn written(&self) -> i64 {
        self.count(
            "select (select count(*) from item) + (select count(*) from attachment) + (select count(*) from idempotency)
                  + (select count(*) from step) + (select count(*) from attempt) + (select count(*) from evidence)",
        )
        .await
    }

    /// From now on, keeps a copy of each outbox row the relay deletes once published in
    /// `outbox_published`, with the id of the transaction (the relay's round) that deleted it.
    pub async fn keep_published_outbox_rows(&self) {
        self.execute(
            "create table outbox_published as select *, 0::bigint as round from outbox where false;
             create function keep_published() returns trigger language plpgsql as $$
             begin
                 insert into outbox_published select old.*, txid_current();
                 return old;
             end $$;
             create trigger keep_published after delete on outbox for each row execute function keep_published();",
        )
        .await;
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.cancel.cancel();
        let db = self.db_name.clone();
        let settings = self.settings.clone();
        // Clean up on a thread of its own: Drop cannot await, and the test's runtime may be
        // shutting down.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                if let Ok(conn) = dalil::queue::connect(&amqp_base(), "dalil-test-cleanup").await {
                    if let (Ok(ch), Ok(t)) = (conn.create_channel().await, app::load_topology(&settings)) {
                        let _ = t.delete(&ch).await;
                    }
                    let _ = conn.close(200, "bye".into()).await;
                }
                if let Ok(mut c) = PgConnection::connect(&format!("{}/postgres", postgres_base())).await {
                    let _ =
                        sqlx::query(&format!("drop database if exists \"{db}\" with (force)")).execute(&mut c).await;
                }
            });
        })
        .join();
    }
}

/// A token of the development identity provider for this PINFL.
pub fn citizen_token(app: &TestApp, pinfl: &str) -> String {
    dalil::admin::citizen_token(&app.settings, pinfl, 600).unwrap()["token"].as_str().unwrap().to_string()
}

/// Valid summons content for the court-summons template.
pub fn summons(pinfl: &str) -> Value {
    json!({
        "kind": "summons",
        "recipient": { "pinfl": pinfl },
        "template": "court-summons",
        "language": "uz-Latn",
        "reference": "2-1234/2026",
        "personalisation": {
            "case_number": "2-1234/2026",
            "court_name": "Yunusobod tumanlararo fuqarolik ishlari sudi",
            "court_address": "Toshkent sh., Amir Temur 1",
            "hearing_at": "10.12.2026 10:00",
            "courtroom": "3",
            "party_role": "javobgar",
            "claimant": "Karimov Anvar",
            "subject_of_case": "qarzni undirish"
        },
        "attachments": [
            { "name": "chaqiruv.pdf", "content_type": "application/pdf", "content": sample_pdf_base64() }
        ]
    })
}

/// A small real PDF (one page, "Enclosure: ruling 2-1234/2026…"), as agencies attach them.
pub fn sample_pdf() -> &'static [u8] {
    include_bytes!("../../docs/samples/enclosure.pdf")
}

pub fn sample_pdf_base64() -> String {
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, sample_pdf())
}
