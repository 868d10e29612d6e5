//! `dalil demo`: the whole story in one command, on a fresh database.
//!
//! A court sends a summons to a citizen who opens it and to one who never does, a tax office a
//! notification nobody opens, and a ministry a letter to a recipient without digital consent.
//! Policy timers run fast (one day of policy time is one second), SMS goes to the built-in
//! gateway simulator, email to the configured SMTP server or, where none answers, into `.eml`
//! files, and a scripted postal operator claims, prints and confirms the letters. The demo
//! prints a timeline per item, then checks every proof bundle offline, as a court would.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::app::{self, App, Roles};
use crate::config::Settings;
use crate::policy::Span;

/// One day of policy time lasts this long in the demo.
const DAY_IN_DEMO: Duration = Duration::from_secs(1);

pub struct Options {
    /// Keep the demo's database and queues afterwards.
    pub keep: bool,
}

struct Story {
    key: &'static str,
    title: &'static str,
    reference: &'static str,
}

const STORIES: [Story; 4] = [
    Story { key: "opens", title: "summons to a citizen who opens it at once", reference: "2-101/2026" },
    Story { key: "never", title: "summons to a citizen who never opens it", reference: "2-102/2026" },
    Story { key: "notification", title: "tax notification nobody opens", reference: "SN-2026-5531" },
    Story { key: "paper", title: "letter to a recipient without digital consent", reference: "01-07/4410" },
];

pub async fn run(base: &Settings, options: Options) -> anyhow::Result<()> {
    let stamp = Utc::now().format("%Y%m%d_%H%M%S").to_string();
    let dir = PathBuf::from("var/demo").join(&stamp);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (settings, email_note) = settings_for(base, &stamp, &dir).await?;
    let db_name = format!("dalil_demo_{stamp}");
    println!("Dalil demo: policy timers run fast, one day = {DAY_IN_DEMO:?}.");
    println!("  database   {db_name} ({})", if options.keep { "kept afterwards" } else { "dropped afterwards" });
    println!("  files      {}", dir.display());
    println!("  email      {email_note}");
    println!("  SMS        the built-in gateway simulator at {} (each message is printed)\n", settings.sms.base_url);

    crate::db::migrate(&settings).await?;
    let topology = app::declare_topology(&settings).await?;
    let cancel = CancellationToken::new();
    let outcome = story(&settings, &dir, cancel.clone()).await;
    cancel.cancel();
    // Clean up whatever happened.
    if !options.keep {
        if let Ok(conn) = crate::queue::connect(settings.amqp_url.expose_secret(), "dalil-demo-cleanup").await {
            if let Ok(ch) = conn.create_channel().await {
                let _ = topology.delete(&ch).await;
            }
            let _ = conn.close(200, "bye".into()).await;
        }
        let admin = crate::db::connect(&settings.with_database("postgres")?).await?;
        sqlx::query(&format!("drop database if exists {db_name} with (force)")).execute(&admin).await?;
    }
    outcome
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The demo's settings: its own database, queue names, keys and ports; fast policies.
async fn settings_for(base: &Settings, stamp: &str, dir: &Path) -> anyhow::Result<(Settings, String)> {
    let mut s = base.with_database(&format!("dalil_demo_{stamp}"))?;
    s.queue_prefix = format!("demo-{stamp}.");
    // Queues delete themselves if the demo dies without cleaning up.
    s.queue_expires_ms = Some(600_000);
    let port = free_port()?;
    s.listen = format!("127.0.0.1:{port}");
    s.public_url = format!("http://127.0.0.1:{port}");
    s.sms.base_url = format!("http://127.0.0.1:{}", free_port()?);
    s.sms.start_simulator = true;
    s.identity.dev_keys = true;
    s.identity.public_key_file = dir.join("keys/idp.pub.pem");
    s.identity.dev_private_key_file = dir.join("keys/idp.pem");
    s.log.key_dir = dir.join("keys/log");
    s.log.signing_key_pem = SecretString::from(String::new());
    s.log.generate_key_if_missing = true;
    s.scheduler.tick_ms = 200;
    s.scheduler.escalation = "* * * * * *".into();
    s.scheduler.deemed_delivery = "* * * * * *".into();
    s.relay.poll_interval_ms = 200;
    s.policies_file = fast_policies(&base.policies_file, dir)?;
    s.worker.channels = crate::worker::known_queues().into_iter().map(String::from).collect();
    let smtp = format!("{}:{}", s.email.smtp_host, s.email.smtp_port);
    let answers = s.email.transport == "smtp"
        && tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(&smtp))
            .await
            .is_ok_and(|r| r.is_ok());
    let note = if answers {
        format!("sent to the SMTP server at {smtp}")
    } else {
        s.email.transport = "file".into();
        s.email.file_dir = dir.join("mail");
        format!("no SMTP server answers at {smtp}: messages are written to {}", s.email.file_dir.display())
    };
    Ok((s, note))
}

/// The configured policies with every span shrunk so that a day lasts [`DAY_IN_DEMO`].
fn fast_policies(path: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut doc: toml::Value = toml::from_str(&text)?;
    fn shrink(v: &mut toml::Value) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t.iter_mut() {
                    match (k.as_str(), v) {
                        ("after" | "postal_transit", toml::Value::String(s)) => {
                            if let Ok(span) = Span::parse(s) {
                                let ms = span.0.num_milliseconds() * DAY_IN_DEMO.as_millis() as i64 / 86_400_000;
                                *s = Span(chrono::Duration::milliseconds(ms.max(1))).text();
                            }
                        }
                        (_, other) => shrink(other),
                    }
                }
            }
            toml::Value::Array(a) => a.iter_mut().for_each(shrink),
            _ => {}
        }
    }
    shrink(&mut doc);
    let out = dir.join("policies.toml");
    std::fs::write(&out, toml::to_string(&doc)?)?;
    crate::policy::Policies::load(&out)?;
    Ok(out)
}

/// The HTTP client of the agency, the operator and the citizens.
struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self.http.request(method.clone(), format!("{}{path}", self.base)).bearer_auth(token);
        if path == "/v1/correspondence" {
            // The reference is unique per demo item: a fine idempotency key.
            let reference = body.as_ref().and_then(|b| b["reference"].as_str()).unwrap_or_default().to_string();
            req = req.header("Idempotency-Key", format!("demo-{reference}"));
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.with_context(|| format!("{method} {path}"))?;
        let status = r.status();
        let text = r.text().await?;
        if !status.is_success() {
            bail!("{method} {path}: {status}: {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str, token: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, token, None).await
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, path, token, Some(body)).await
    }
}

async fn recipient(
    pool: &sqlx::PgPool,
    first13: &str,
    name: &str,
    phone: Option<&str>,
    consent: bool,
) -> anyhow::Result<String> {
    let pinfl = crate::domain::Pinfl::with_check_digit(first13);
    let email = phone.map(|_| format!("{}@example.uz", name.split(' ').next().unwrap_or("citizen").to_lowercase()));
    crate::admin::recipient_upsert(
        pool,
        &crate::admin::RecipientInput {
            pinfl: Some(pinfl.to_string()),
            name: Some(name.into()),
            phone: phone.map(String::from),
            email,
            region: Some("UZ-TK".into()),
            district: Some("Yunusobod tumani".into()),
            street: Some("Amir Temur shoh koʻchasi".into()),
            house: Some("12".into()),
            apartment: Some("45".into()),
            postcode: Some("100084".into()),
            digital_consent: Some(consent),
            ..Default::default()
        },
    )
    .await?;
    Ok(pinfl.to_string())
}

async fn story(settings: &Settings, dir: &Path, cancel: CancellationToken) -> anyhow::Result<()> {
    let app = App::build(settings.clone()).await?;
    let pool = app.pool.clone();
    let base = format!("http://127.0.0.1:{}", app.port());
    let roles = Roles { simulator: true, ..Roles::ALL };
    let running = tokio::spawn(app.run_until_stopped(roles, settings.worker.channels.clone(), cancel.clone()));
    let client = Client { http: reqwest::Client::new(), base: base.clone() };
    // Wait for the API.
    for _ in 0..100 {
        if client.get("/healthz", "").await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The cast.
    crate::admin::agency_create(&pool, "yunusobod-court", "Yunusobod tumanlararo fuqarolik ishlari sudi").await?;
    let court =
        crate::admin::api_key_create(&pool, "yunusobod-court").await?["key"].as_str().unwrap_or_default().to_string();
    crate::admin::agency_create(&pool, "tashkent-tax", "Toshkent shahar soliq boshqarmasi").await?;
    let tax =
        crate::admin::api_key_create(&pool, "tashkent-tax").await?["key"].as_str().unwrap_or_default().to_string();
    let operator =
        crate::admin::postal_operator_create(&pool, "uzpost-tashkent", "Oʻzbekiston pochtasi", &["UZ-TK".into()])
            .await?["key"]
            .as_str()
            .unwrap_or_default()
            .to_string();
    let aziz = recipient(&pool, "3120588010041", "Aliyev Aziz", Some("+998901234567"), true).await?;
    let malika = recipient(&pool, "3120588010042", "Karimova Malika", Some("+998901234568"), true).await?;
    let bobur = recipient(&pool, "3120588010043", "Toshmatov Bobur", Some("+998931112233"), true).await?;
    let nodira = recipient(&pool, "3120588010044", "Rahimova Nodira", None, false).await?;

    // The court's callback endpoint: a small receiver that checks every signature.
    let hooks = Hooks::default();
    let hook_url = hooks.start().await?;
    let endpoint =
        client.post("/v1/callbacks", &court, json!({ "url": hook_url, "events": ["served", "handed_over"] })).await?;
    hooks.set_secret(endpoint["secret"].as_str().unwrap_or_default());

    // The submissions.
    let summons = |pinfl: &str, reference: &str| {
        json!({
            "kind": "summons", "recipient": { "pinfl": pinfl }, "template": "court-summons", "language": "uz-Latn",
            "reference": reference,
            "respond_by": (Utc::now() + chrono::Duration::days(30)).to_rfc3339(),
            "personalisation": {
                "case_number": reference, "court_name": "Yunusobod tumanlararo fuqarolik ishlari sudi",
                "court_address": "Toshkent sh., Amir Temur 1", "hearing_at": "10.12.2026 10:00", "courtroom": "3",
                "party_role": "javobgar", "claimant": "Karimov Anvar", "subject_of_case": "qarzni undirish"
            }
        })
    };
    let mut ids: HashMap<&str, String> = HashMap::new();
    let started = Utc::now();
    let v = client.post("/v1/correspondence", &court, summons(&aziz, STORIES[0].reference)).await?;
    ids.insert("opens", v["id"].as_str().unwrap_or_default().into());
    let v = client.post("/v1/correspondence", &court, summons(&malika, STORIES[1].reference)).await?;
    ids.insert("never", v["id"].as_str().unwrap_or_default().into());
    let v = client
        .post(
            "/v1/correspondence",
            &tax,
            json!({
                "kind": "notification", "recipient": { "pinfl": bobur }, "template": "tax-notice", "language": "ru",
                "reference": STORIES[2].reference,
                "personalisation": {
                    "tax_year": "2026", "tax_type": "налог на имущество",
                    "property_address": "г. Ташкент, Юнусабадский район, 4-квартал, дом 15, кв. 27",
                    "cadastral_number": "10:07:04:02:03:0123", "amount_due": "1 250 000 сум",
                    "payment_deadline": "01.12.2026", "payment_account": "23402000300100001010",
                    "inspectorate_phone": "+998 71 200 00 00"
                }
            }),
        )
        .await?;
    ids.insert("notification", v["id"].as_str().unwrap_or_default().into());
    let v = client
        .post(
            "/v1/correspondence",
            &court,
            json!({
                "kind": "letter", "recipient": { "pinfl": nodira }, "template": "notice", "language": "uz-Latn",
                "reference": STORIES[3].reference,
                "personalisation": { "title": "Ish hujjatlari haqida", "body": "Ishingiz boʻyicha hujjatlar tayyor." }
            }),
        )
        .await?;
    ids.insert("paper", v["id"].as_str().unwrap_or_default().into());
    println!("4 items accepted. Waiting for the story to play out (about {} s)…\n", 12 * DAY_IN_DEMO.as_secs());

    // Aziz opens his summons as soon as it is in his inbox.
    let aziz_token =
        crate::admin::citizen_token(settings, &aziz, 600)?["token"].as_str().unwrap_or_default().to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if client.get(&format!("/v1/inbox/{}", ids["opens"]), &aziz_token).await.is_ok() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the summons never reached Aziz's inbox");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The scripted postal operator: claims what is ready, prints it, and reports. Nodira's
    // letter is handed over; Malika is out, a notice is left and she never collects it.
    let mut batch = 0;
    let mut reported: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40 + 15 * DAY_IN_DEMO.as_secs());
    loop {
        batch += 1;
        let manifest = client
            .post("/v1/postal/batches", &operator, json!({ "batch_key": format!("demo-{batch}"), "limit": 100 }))
            .await?;
        for letter in manifest["letters"].as_array().into_iter().flatten() {
            let item = letter["item_id"].as_str().unwrap_or_default().to_string();
            let pdf = client
                .http
                .get(format!("{base}{}", letter["pdf_url"].as_str().unwrap_or_default()))
                .bearer_auth(&operator)
                .send()
                .await?
                .bytes()
                .await?;
            let file = dir.join(format!("letter-{item}.pdf"));
            std::fs::write(&file, &pdf)?;
            let path = format!("/v1/postal/letters/{item}/events");
            let post = |event: Value| client.post(&path, &operator, event);
            post(json!({ "event_id": format!("{item}-printed"), "event": "printed", "at": Utc::now() })).await?;
            if item == ids["paper"] {
                post(json!({
                    "event_id": format!("{item}-delivered"), "event": "delivered", "at": Utc::now(),
                    "received_by": { "name": "Rahimova Nodira", "relation": "addressee" }, "courier_id": "TK-0042"
                }))
                .await?;
            } else {
                post(json!({ "event_id": format!("{item}-held"), "event": "held_at_office", "at": Utc::now() }))
                    .await?;
            }
            reported.push(item);
        }
        let mut all_served = true;
        for id in ids.values() {
            let v = client.get(&format!("/v1/correspondence/{id}"), &court_or_tax(id, &ids, &court, &tax)).await?;
            all_served &= v["served"].is_object()
                && v["steps"].as_array().into_iter().flatten().all(|s| s["status"] != "scheduled");
        }
        if all_served && hooks.served() >= 3 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the story did not finish in time: is the scheduler running?");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The timelines.
    for story in &STORIES {
        let id = &ids[story.key];
        let v = client.get(&format!("/v1/correspondence/{id}"), &court_or_tax(id, &ids, &court, &tax)).await?;
        print!("{}", timeline(story, &v, started));
    }
    println!("Callbacks to the court's endpoint: {} received, every signature checked.\n", hooks.count());

    // Every proof bundle, verified offline against the keys the platform publishes.
    let keys: Value = client.get("/v1/log/keys", "").await?;
    let trusted: Vec<crate::note::VerifierKey> = keys
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| crate::note::VerifierKey::parse(k["verifier_key"].as_str()?).ok())
        .collect();
    let mut failed = 0;
    println!("Proof bundles, verified offline (as `dalil verify FILE --key KEY` does):");
    for story in &STORIES {
        let id = &ids[story.key];
        let bundle_json =
            client.get(&format!("/v1/correspondence/{id}/proof"), &court_or_tax(id, &ids, &court, &tax)).await?;
        let file = dir.join(format!("bundle-{}.json", story.key));
        std::fs::write(&file, serde_json::to_vec_pretty(&bundle_json)?)?;
        let bundle: crate::proof::Bundle = serde_json::from_value(bundle_json)?;
        let verdict = crate::proof::verify(&bundle, &trusted);
        if verdict.valid {
            let size = verdict.checkpoint.as_ref().map(|c| c.size).unwrap_or_default();
            println!("  VERIFIED  {}  {} records, checkpoint of size {size}", file.display(), verdict.events.len());
        } else {
            failed += 1;
            println!("  FAILED    {}  {}", file.display(), verdict.reason.unwrap_or_default());
        }
    }
    if let Some(k) = trusted.first() {
        println!("  key: {}", k.encode());
    }
    println!("\nLetters as printed: {}/letter-*.pdf", dir.display());
    cancel.cancel();
    running.await??;
    if failed > 0 {
        bail!("{failed} proof bundle(s) did not verify");
    }
    Ok(())
}

fn court_or_tax(id: &str, ids: &HashMap<&str, String>, court: &str, tax: &str) -> String {
    if ids.get("notification").is_some_and(|n| n == id) {
        tax.to_string()
    } else {
        court.to_string()
    }
}

/// One item's story: its evidence in order, with times from the start of the demo, and its
/// steps that a timer skipped or started.
fn timeline(story: &Story, v: &Value, started: DateTime<Utc>) -> String {
    let mut out = format!(
        "── {} ({} {}, policy {} v{})\n",
        story.title,
        v["kind"].as_str().unwrap_or_default(),
        story.reference,
        v["policy"]["id"].as_str().unwrap_or_default(),
        v["policy"]["version"]
    );
    let since = |t: &str| {
        t.parse::<DateTime<Utc>>()
            .map(|t| format!("{:>7.2}s", (t - started).num_milliseconds() as f64 / 1000.0))
            .unwrap_or_default()
    };
    let index_of = |evidence_id: &Value| {
        v["evidence"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| &e["evidence_id"] == evidence_id)
            .and_then(|e| e["log_index"].as_i64())
            .map_or_else(|| "not indexed yet".to_string(), |i| format!("#{i}"))
    };
    for e in v["evidence"].as_array().into_iter().flatten() {
        let r = &e["record"];
        let d = &r["details"];
        let mut note = String::new();
        match e["event"].as_str().unwrap_or_default() {
            "SubmissionAcceptance" => note = format!("by {}", r["sender"]["agency"].as_str().unwrap_or_default()),
            "ConsignmentNotification" => note = format!("to {}", d["to"].as_str().unwrap_or_default()),
            "RelayToNonERDS" => note = format!("claimed by {} for print", d["operator"].as_str().unwrap_or_default()),
            "ContentHandover" if r["channel"] == "postal" => {
                note = format!("handed to {}", d["received_by"]["name"].as_str().unwrap_or_default())
            }
            "DeemedDelivery" => {
                note = format!(
                    "rule: {} after the deposit (record {})",
                    d["rule"]["after"].as_str().unwrap_or_default(),
                    index_of(&d["rule"]["deposit"]["evidence_id"])
                )
            }
            _ => {}
        }
        if let Some(rule) = d["served"]["rule"].as_str() {
            note.push_str(&format!("{}SERVED by rule {rule}", if note.is_empty() { "" } else { "; " }));
        }
        out.push_str(&format!(
            "  {}  {:<5} {:<31} {:<7} {}\n",
            since(e["at"].as_str().unwrap_or_default()),
            e["log_index"].as_i64().map_or_else(|| "#…".to_string(), |i| format!("#{i}")),
            e["event"].as_str().unwrap_or_default(),
            e["channel"].as_str().unwrap_or("-"),
            note
        ));
    }
    for s in v["steps"].as_array().into_iter().flatten() {
        if let Some(note) = s["note"].as_str() {
            out.push_str(&format!(
                "  step {} ({}): {note}\n",
                s["channel"].as_str().unwrap_or_default(),
                s["status"].as_str().unwrap_or_default()
            ));
        }
    }
    if let Some(letter) = v["letter"].as_object() {
        out.push_str(&format!(
            "  letter: {} by {}\n",
            letter["status"].as_str().unwrap_or_default(),
            letter["operator"].as_str().unwrap_or_default()
        ));
    }
    match v["served"].as_object() {
        Some(s) => out.push_str(&format!(
            "  served at {} by rule {} (record #{})\n\n",
            since(s["at"].as_str().unwrap_or_default()).trim(),
            s["rule"].as_str().unwrap_or_default(),
            s["evidence"]
        )),
        None => out.push_str("  not served\n\n"),
    }
    out
}

/// The court's callback receiver: counts calls and checks each signature.
#[derive(Clone, Default)]
struct Hooks {
    secret: Arc<Mutex<String>>,
    calls: Arc<Mutex<Vec<String>>>,
}

impl Hooks {
    fn set_secret(&self, s: &str) {
        *self.secret.lock().expect("not poisoned") = s.to_string();
    }

    fn count(&self) -> usize {
        self.calls.lock().expect("not poisoned").len()
    }

    fn served(&self) -> usize {
        self.calls.lock().expect("not poisoned").iter().filter(|t| *t == "served").count()
    }

    async fn start(&self) -> anyhow::Result<String> {
        let me = self.clone();
        let app = axum::Router::new().route(
            "/hooks",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let me = me.clone();
                async move {
                    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
                    let secret = me.secret.lock().expect("not poisoned").clone();
                    let ok = crate::callbacks::verify(
                        &secret,
                        &h("dalil-timestamp"),
                        &h("dalil-signature"),
                        &body,
                        Utc::now().timestamp(),
                    );
                    if !ok {
                        println!("callback with a BAD SIGNATURE refused");
                        return axum::http::StatusCode::UNAUTHORIZED;
                    }
                    let v: Value = serde_json::from_slice(&body).unwrap_or_default();
                    println!(
                        "callback  {:<11} {}  (signature ok)",
                        v["type"].as_str().unwrap_or_default(),
                        v["item"]["reference"].as_str().unwrap_or_default()
                    );
                    me.calls.lock().expect("not poisoned").push(h("dalil-event-type"));
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hooks", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(url)
    }
}
