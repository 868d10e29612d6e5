//! The citizen's web inbox in a real browser: the distribution's headless Chromium, driven
//! through ChromeDriver with the W3C WebDriver protocol (a few JSON calls, spoken here with
//! reqwest). Screenshots of every page, at phone and desktop width, are written to
//! `target/screenshots/`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

use crate::helpers::{summons, TestApp};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
const PHONE: (u32, u32) = (390, 844);
const DESKTOP: (u32, u32) = (1280, 900);

/// ChromeDriver on a free port, stopped on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (package chromium-driver, installed by .ci/services)");
        // Owned at once, so that it is stopped (and waited for) on every path.
        let driver = Driver { child, url: format!("http://127.0.0.1:{port}") };
        let http = reqwest::Client::new();
        for _ in 0..100 {
            if let Ok(r) = http.get(format!("{}/status", driver.url)).send().await {
                if r.json::<Value>().await.is_ok_and(|v| v["value"]["ready"] == true) {
                    return driver;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("chromedriver did not become ready");
    }
}

/// One browser session.
struct Browser {
    http: reqwest::Client,
    session: String,
    _profile: tempdir::Dir,
    pub downloads: PathBuf,
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Browser {
    async fn open(driver: &Driver) -> Browser {
        let profile = std::env::temp_dir().join(format!("dalil-chromium-{}", uuid::Uuid::new_v4()));
        let downloads = profile.join("downloads");
        std::fs::create_dir_all(&downloads).unwrap();
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--lang=uz", format!("--user-data-dir={}", profile.join("profile").display()),
                    format!("--window-size={},{}", PHONE.0, PHONE.1),
                ],
                "prefs": {
                    "download.default_directory": downloads.display().to_string(),
                    "download.prompt_for_download": false,
                    "intl.accept_languages": "uz",
                },
            },
        }}});
        let http = reqwest::Client::new();
        let r: Value =
            http.post(format!("{}/session", driver.url)).json(&caps).send().await.unwrap().json().await.unwrap();
        let session = r["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {r}")).to_string();
        Browser {
            http,
            session: format!("{}/session/{session}", driver.url),
            _profile: tempdir::Dir(profile),
            downloads,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.session));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        if v["value"].get("error").is_some() {
            panic!("WebDriver {path}: {}", v["value"]);
        }
        v["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url }))).await;
    }

    async fn url(&self) -> String {
        self.call(reqwest::Method::GET, "/url", None).await.as_str().unwrap().to_string()
    }

    /// Waits until the page's URL contains `part` (a click's navigation has landed).
    async fn wait_url(&self, part: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let url = self.url().await;
            if url.contains(part) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "the browser is at {url}, not at …{part}…");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the page's source contains `part`.
    async fn wait_source(&self, part: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let source = self.source().await;
            if source.contains(part) {
                return source;
            }
            assert!(tokio::time::Instant::now() < deadline, "the page never showed {part:?}: {source}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn source(&self) -> String {
        self.call(reqwest::Method::GET, "/source", None).await.as_str().unwrap().to_string()
    }

    async fn find(&self, css: &str) -> String {
        let v =
            self.call(reqwest::Method::POST, "/element", Some(json!({ "using": "css selector", "value": css }))).await;
        v[ELEMENT].as_str().unwrap().to_string()
    }

    async fn text(&self, css: &str) -> String {
        let e = self.find(css).await;
        self.call(reqwest::Method::GET, &format!("/element/{e}/text"), None).await.as_str().unwrap().to_string()
    }

    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{e}/click"), Some(json!({}))).await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{e}/clear"), Some(json!({}))).await;
        self.call(reqwest::Method::POST, &format!("/element/{e}/value"), Some(json!({ "text": text }))).await;
    }

    /// Gives a file input a file, as choosing it would.
    async fn upload(&self, css: &str, path: &std::path::Path) {
        let e = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{e}/value"),
            Some(json!({ "text": path.display().to_string() })),
        )
        .await;
    }

    /// Presses Tab `n` times and tells which element has the focus (keyboard use).
    async fn tab_to(&self, n: usize) -> String {
        let keys: Vec<Value> = (0..n)
            .flat_map(|_| [json!({"type":"keyDown","value":"\u{E004}"}), json!({"type":"keyUp","value":"\u{E004}"})])
            .collect();
        self.call(
            reqwest::Method::POST,
            "/actions",
            Some(json!({ "actions": [{ "type": "key", "id": "kb", "actions": keys }] })),
        )
        .await;
        let active = self.call(reqwest::Method::GET, "/element/active", None).await;
        let e = active[ELEMENT].as_str().unwrap().to_string();
        self.call(reqwest::Method::GET, &format!("/element/{e}/text"), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    async fn size(&self, (width, height): (u32, u32)) {
        self.call(reqwest::Method::POST, "/window/rect", Some(json!({ "width": width, "height": height }))).await;
    }

    /// Screenshots of the current page at phone and desktop width.
    async fn screenshots(&self, name: &str) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        for (label, size) in [("phone", PHONE), ("desktop", DESKTOP)] {
            self.size(size).await;
            let png = self.call(reqwest::Method::GET, "/screenshot", None).await;
            let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
            assert!(bytes.starts_with(b"\x89PNG"), "a PNG");
            std::fs::write(dir.join(format!("{name}-{label}.png")), bytes).unwrap();
        }
        self.size(PHONE).await;
    }

    async fn close(self) {
        let _ = self.http.delete(&self.session).send().await;
    }
}

async fn wait_for(app: &TestApp, what: &str, sql: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while app.count(sql).await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_citizen_signs_in_reads_acknowledges_and_signs_out_in_a_real_browser() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-browser").await;
    let (pinfl, _) = app.citizen_with("3010190423456", Some("+998907654321"), None).await;
    let pinfl = pinfl.to_string();

    let driver = Driver::start().await;
    let browser = Browser::open(&driver).await;

    // Sign in: PINFL, then the code the SMS gateway received.
    browser.go(&app.url("/inbox")).await;
    assert!(browser.url().await.contains("/signin?next=/inbox"), "{}", browser.url().await);
    assert_eq!(browser.text("h1").await, "Kirish");
    // Keyboard: the first Tab reaches the skip link.
    browser.screenshots("1-signin").await;
    assert_eq!(browser.tab_to(1).await, "Asosiy qismga oʻtish");
    browser.type_into("#pinfl", &pinfl).await;
    browser.click("form[action='/signin'] button").await;
    browser.wait_url("/signin/code").await;
    browser.screenshots("2-code").await;
    crate::web::wait_codes(&app, 1).await;
    let code = crate::web::last_code(&app).await;
    browser.type_into("#code", &code).await;
    browser.click("form[action='/signin/code'] button").await;

    // An empty inbox; then the court sends a summons and it arrives.
    browser.wait_source("<h1>Kiruvchi xatlaringiz</h1>").await;
    assert!(!browser.source().await.contains("class=\"items\""));
    browser.screenshots("3-inbox-empty").await;
    let mut body = summons(&pinfl);
    body["respond_by"] = json!((chrono::Utc::now() + chrono::Duration::days(20)).to_rfc3339());
    let v: Value = app.submit(&key, "b-1", &body).await.json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    app.wait_for_status(&key, &id, &["consigned"]).await;
    browser.go(&app.url("/inbox")).await;

    // The inbox: the item, unread, with its deadline made prominent.
    let source = browser.wait_source("class=\"item unread\"").await;
    assert!(browser.url().await.ends_with("/inbox"), "{}", browser.url().await);
    assert!(source.contains("class=\"deadline\""));
    browser.screenshots("3-inbox").await;

    // Open it: the content as rendered at submission, recorded as opened via the web.
    browser.click(".items a").await;
    browser.wait_source("Yunusobod tumanlararo fuqarolik ishlari sudi").await;
    assert!(browser.url().await.ends_with(&format!("/inbox/{id}")));
    wait_for(&app, "the open", "select count(*) from evidence where event = 'ContentAccessTracking'").await;
    browser.screenshots("4-item").await;

    // Download the attachment: ContentHandover, and the file in the download folder.
    browser.click("a[download]").await;
    wait_for(&app, "the download", "select count(*) from evidence where event = 'ContentHandover'").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let done: Vec<_> = std::fs::read_dir(&browser.downloads)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".pdf"))
            .collect();
        if let Some(f) = done.first() {
            assert_eq!(std::fs::read(f.path()).unwrap(), crate::helpers::sample_pdf());
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the PDF never reached the download folder");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Acknowledge receipt.
    browser.click("form[action$='/acknowledge'] button").await;
    wait_for(&app, "the acknowledgement", "select count(*) from evidence where event = 'ConsignmentAcceptance'").await;
    browser.wait_source("<p role=\"status\">").await;

    // Switch to Russian: every word of the page, not only the item.
    browser.click("a[hreflang='ru']").await;
    browser.wait_source("<html lang=\"ru\">").await;
    assert!(browser.url().await.ends_with(&format!("/inbox/{id}")));
    assert_eq!(browser.text("#history").await, "Что отправитель видит о вашем экземпляре");
    assert!(browser.source().await.contains("<html lang=\"ru\">"));
    browser.screenshots("5-item-ru").await;

    // Settings: withdraw digital consent; recorded as evidence about the recipient.
    browser.click("a[href='/settings']").await;
    browser.wait_url("/settings").await;
    browser.screenshots("6-settings").await;
    browser.click("#consent").await;
    browser.click("form[action='/settings'] button").await;
    wait_for(&app, "the settings change", "select count(*) from evidence where event = 'RecipientSettingsChange'")
        .await;
    assert_eq!(app.count("select count(*) from recipient where digital_consent").await, 0);

    // Sign out: the inbox asks to sign in again.
    browser.click("form[action='/signout'] button").await;
    browser.wait_url("/signin?bye=1").await;
    browser.go(&app.url("/inbox")).await;
    browser.wait_url("/signin?next=/inbox").await;

    // The public verify page: a good bundle, then a tampered one.
    let bundle: Value = app.get(&format!("/v1/correspondence/{id}/proof"), &key).await.json().await.unwrap();
    let dir = std::env::temp_dir().join(format!("dalil-bundles-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("bundle.json");
    std::fs::write(&good, serde_json::to_vec_pretty(&bundle).unwrap()).unwrap();
    let mut bad_bundle = bundle.clone();
    let canonical = bad_bundle["records"][0]["canonical"].as_str().unwrap().replace("2-1234/2026", "2-1234/2025");
    bad_bundle["records"][0]["canonical"] = Value::String(canonical);
    let bad = dir.join("tampered.json");
    std::fs::write(&bad, serde_json::to_vec_pretty(&bad_bundle).unwrap()).unwrap();

    browser.go(&app.url("/verify")).await;
    browser.screenshots("7-verify").await;
    browser.upload("#bundle", &good).await;
    browser.click("form[action='/verify'] button").await;
    browser.wait_source("class=\"verdict good\"").await;
    assert!(browser.text(".verdict h2").await.starts_with("Подлинный"));
    browser.screenshots("8-verify-good").await;
    browser.upload("#bundle", &bad).await;
    browser.click("form[action='/verify'] button").await;
    browser.wait_source("class=\"verdict bad\"").await;
    browser.screenshots("9-verify-tampered").await;
    let _ = std::fs::remove_dir_all(&dir);
    browser.close().await;
}
