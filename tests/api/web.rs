//! The citizen's web pages over plain HTTP: sign-in by SMS code, sessions, CSRF, headers,
//! isolation between citizens, and the evidence the pages record. (The same pages in a real
//! browser: `browser.rs`.)

use std::collections::HashMap;

use reqwest::header::{HeaderMap, COOKIE, LOCATION, SET_COOKIE};
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{summons, Options, TestApp};

/// A browser without a browser: keeps cookies, does not follow redirects.
pub struct WebClient {
    http: reqwest::Client,
    base: String,
    pub cookies: HashMap<String, String>,
}

pub struct Page {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Page {
    pub fn location(&self) -> String {
        self.headers.get(LOCATION).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
    }

    /// The value of a hidden input.
    pub fn field(&self, name: &str) -> String {
        let marker = format!("name=\"{name}\" value=\"");
        let start =
            self.body.find(&marker).unwrap_or_else(|| panic!("no field {name} in {}", self.body)) + marker.len();
        self.body[start..].split('"').next().unwrap().to_string()
    }
}

impl WebClient {
    pub fn new(app: &TestApp) -> WebClient {
        let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        WebClient { http, base: app.address.clone(), cookies: HashMap::new() }
    }

    fn remember(&mut self, headers: &HeaderMap) {
        for v in headers.get_all(SET_COOKIE) {
            let v = v.to_str().unwrap();
            let (pair, _) = v.split_once(';').unwrap_or((v, ""));
            let (k, val) = pair.split_once('=').unwrap();
            if v.contains("Max-Age=0") {
                self.cookies.remove(k);
            } else {
                self.cookies.insert(k.to_string(), val.to_string());
            }
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; ")
    }

    async fn page(&mut self, r: reqwest::RequestBuilder) -> Page {
        let r = r.header(COOKIE, self.cookie_header()).send().await.unwrap();
        let status = r.status();
        let headers = r.headers().clone();
        self.remember(&headers);
        Page { status, headers, body: r.text().await.unwrap() }
    }

    pub async fn get(&mut self, path: &str) -> Page {
        let r = self.http.get(format!("{}{path}", self.base));
        self.page(r).await
    }

    pub async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let r = self.http.post(format!("{}{path}", self.base)).form(form);
        self.page(r).await
    }

    /// Signs in with the code the SMS simulator received.
    pub async fn sign_in(&mut self, app: &TestApp, pinfl: &str) -> Page {
        let page = self.get("/signin").await;
        let csrf = page.field("csrf");
        let before = codes_sent(app).await;
        let sent = self.post("/signin", &[("csrf", &csrf), ("pinfl", pinfl), ("next", "/inbox")]).await;
        wait_codes(app, before + 1).await;
        assert_eq!(sent.status, StatusCode::SEE_OTHER, "{}", sent.body);
        let code_url = sent.location();
        let challenge = code_url.split("c=").nth(1).unwrap().split('&').next().unwrap().to_string();
        let code = last_code(app).await;
        self.post("/signin/code", &[("csrf", &csrf), ("challenge", &challenge), ("code", &code), ("next", "/inbox")])
            .await
    }
}

/// The code in the last SMS the simulator received. Codes are sent in the background: wait for
/// the one asked for with [`wait_codes`] first.
pub async fn last_code(app: &TestApp) -> String {
    wait_codes(app, 1).await;
    let messages = app.sms.messages().await;
    let code = messages.iter().rev().find(|m| m.request.client_ref.starts_with("otp-")).expect("a code was sent");
    let text = &code.request.text;
    text.split(|c: char| !c.is_ascii_digit()).find(|w| w.len() == 6).expect("a 6-digit code").to_string()
}

/// Sign-in codes the SMS simulator has received.
pub async fn codes_sent(app: &TestApp) -> usize {
    app.sms.messages().await.iter().filter(|m| m.request.client_ref.starts_with("otp-")).count()
}

/// Waits until the simulator has received `n` codes.
pub async fn wait_codes(app: &TestApp, n: usize) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while codes_sent(app).await < n {
        assert!(tokio::time::Instant::now() < deadline, "{} of {n} codes sent", codes_sent(app).await);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn citizen_with_phone(app: &TestApp, first13: &str, phone: &str) -> String {
    let (pinfl, _) = app.citizen_with(first13, Some(phone), None).await;
    pinfl.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_in_by_sms_code_opens_a_session_with_safe_cookies() {
    let app = TestApp::spawn().await;
    let pinfl = citizen_with_phone(&app, "3010190323456", "+998901112233").await;
    let mut web = WebClient::new(&app);

    // Private pages send the visitor to sign in, and back afterwards.
    let r = web.get("/inbox").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.location(), "/signin?next=/inbox");
    let page = web.get("/signin").await;
    assert_eq!(page.status, 200);
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(page.headers["cache-control"], "no-store");
    assert!(page.body.contains("<label for=\"pinfl\">"));

    let done = web.sign_in(&app, &pinfl).await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
    assert_eq!(done.location(), "/inbox");
    let set_cookie: Vec<&str> = done.headers.get_all(SET_COOKIE).iter().map(|v| v.to_str().unwrap()).collect();
    let session = set_cookie.iter().find(|c| c.starts_with("dalil_session=")).unwrap();
    assert!(session.contains("HttpOnly") && session.contains("SameSite=Strict"), "{session}");
    assert!(!session.contains("Secure"), "not behind TLS in this test");
    // The SMS said the code, and only its hash is kept.
    let code = last_code(&app).await;
    assert_eq!(
        app.count(&format!("select count(*) from otp_challenge where code_hash::text like '%{code}%'")).await,
        0
    );
    let inbox = web.get("/inbox").await;
    assert_eq!(inbox.status, 200);
    assert!(inbox.body.contains("<h1>"));

    // Signing out ends the session on the server: the old cookie no longer works.
    let old = web.cookies.clone();
    let csrf = inbox.field("csrf");
    let out = web.post("/signout", &[("csrf", &csrf)]).await;
    assert_eq!(out.location(), "/signin?bye=1");
    web.cookies = old;
    assert_eq!(web.get("/inbox").await.status, StatusCode::SEE_OTHER);
    assert_eq!(app.count("select count(*) from web_session where ended_at is not null").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_cookies_behind_tls() {
    let app = TestApp::spawn_with(Options { tweak: |s| s.web.secure_cookies = true, ..Default::default() }).await;
    let mut web = WebClient::new(&app);
    let page = web.get("/signin").await;
    let c = page.headers.get(SET_COOKIE).unwrap().to_str().unwrap();
    assert!(c.contains("Secure") && c.contains("HttpOnly") && c.contains("SameSite=Strict"), "{c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_codes_run_out_and_requests_are_rate_limited() {
    let app = TestApp::spawn().await;
    let pinfl = citizen_with_phone(&app, "3010190323457", "+998901112234").await;
    let mut web = WebClient::new(&app);
    let csrf = web.get("/signin").await.field("csrf");
    let sent = web.post("/signin", &[("csrf", &csrf), ("pinfl", &pinfl)]).await;
    let challenge = sent.location().split("c=").nth(1).unwrap().split('&').next().unwrap().to_string();
    wait_codes(&app, 1).await;
    let right = last_code(&app).await;
    let wrong = if right == "000000" { "111111" } else { "000000" };
    for left in (1..5).rev() {
        let p = web.post("/signin/code", &[("csrf", &csrf), ("challenge", &challenge), ("code", wrong)]).await;
        assert_eq!(p.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(p.body.contains(&format!("{left}.")), "{left} tries left in {}", p.body);
    }
    let p = web.post("/signin/code", &[("csrf", &csrf), ("challenge", &challenge), ("code", wrong)]).await;
    assert_eq!(p.status, StatusCode::UNPROCESSABLE_ENTITY);
    // Spent: even the right code no longer signs in.
    let p = web.post("/signin/code", &[("csrf", &csrf), ("challenge", &challenge), ("code", &right)]).await;
    assert_eq!(p.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(!p.headers.get_all(SET_COOKIE).iter().any(|c| c.to_str().unwrap().starts_with("dalil_session")));

    // Five codes an hour per PINFL (one used above).
    for _ in 0..4 {
        let r = web.post("/signin", &[("csrf", &csrf), ("pinfl", &pinfl)]).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
    }
    let r = web.post("/signin", &[("csrf", &csrf), ("pinfl", &pinfl)]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    wait_codes(&app, 5).await;

    // A PINFL nobody registered gets the same answer, and no SMS goes anywhere.
    let unknown = dalil::domain::Pinfl::with_check_digit("3999999999999").to_string();
    let r = web.post("/signin", &[("csrf", &csrf), ("pinfl", &unknown)]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert!(r.location().starts_with("/signin/code?c="));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(codes_sent(&app).await, 5, "no code for a PINFL nobody registered");
    // A malformed one is told so.
    let r = web.post("/signin", &[("csrf", &csrf), ("pinfl", "12345")]).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_without_their_csrf_token_change_nothing() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-web-csrf").await;
    let pinfl = citizen_with_phone(&app, "3010190323458", "+998901112235").await;
    let v: Value = app.submit(&key, "w-1", &summons(&pinfl)).await.json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    app.wait_for_status(&key, &id, &["consigned"]).await;

    let mut web = WebClient::new(&app);
    // Sign-in without the token from the form's cookie.
    let r = web.post("/signin", &[("csrf", "forged"), ("pinfl", &pinfl)]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(!app.sms.messages().await.iter().any(|m| m.request.client_ref.starts_with("otp-")), "no code was sent");

    web.sign_in(&app, &pinfl).await;
    let before = app.count("select count(*) from evidence").await;
    let r = web.post(&format!("/inbox/{id}/acknowledge"), &[("csrf", "forged")]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = web.post("/settings", &[("csrf", "forged"), ("phone", ""), ("email", "")]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(app.count("select count(*) from evidence").await, before);
    assert_eq!(app.count("select count(*) from recipient where phone is null").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_citizen_never_reaches_anothers_pages() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-web-tenancy").await;
    let alice = citizen_with_phone(&app, "3010190323459", "+998901112236").await;
    let bob = citizen_with_phone(&app, "3010190323460", "+998901112237").await;
    let v: Value = app.submit(&key, "t-1", &summons(&alice)).await.json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    app.wait_for_status(&key, &id, &["consigned"]).await;

    let mut web = WebClient::new(&app);
    web.sign_in(&app, &bob).await;
    let inbox = web.get("/inbox").await;
    assert!(!inbox.body.contains(&id));
    let before = app.count("select count(*) from evidence").await;
    for path in [format!("/inbox/{id}"), format!("/inbox/{id}/attachments/0")] {
        let r = web.get(&path).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
    }
    let csrf = inbox.field("csrf");
    let r = web.post(&format!("/inbox/{id}/acknowledge"), &[("csrf", &csrf)]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(app.count("select count(*) from evidence").await, before, "nothing recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_acknowledging_and_settings_are_evidence() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-web-evidence").await;
    let pinfl = citizen_with_phone(&app, "3010190323461", "+998901112238").await;
    let v: Value = app.submit(&key, "e-1", &summons(&pinfl)).await.json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    app.wait_for_status(&key, &id, &["consigned"]).await;
    let mut web = WebClient::new(&app);
    web.sign_in(&app, &pinfl).await;

    let item = web.get(&format!("/inbox/{id}")).await;
    assert_eq!(item.status, 200);
    assert!(item.body.contains("Yunusobod"), "the content as rendered");
    let file = web.get(&format!("/inbox/{id}/attachments/0")).await;
    assert_eq!(file.status, 200);
    assert_eq!(file.headers["content-type"], "application/pdf");
    let csrf = item.field("csrf");
    let ack = web.post(&format!("/inbox/{id}/acknowledge"), &[("csrf", &csrf)]).await;
    assert_eq!(ack.status, StatusCode::SEE_OTHER);
    let view: Value = app.get(&format!("/v1/correspondence/{id}"), &key).await.json().await.unwrap();
    let events: Vec<(&str, &Value)> = view["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["event"].as_str().unwrap(), &e["record"]["details"]))
        .collect();
    let open = events.iter().find(|(e, _)| *e == "ContentAccessTracking").unwrap();
    assert_eq!(open.1["via"], "web");
    assert_eq!(open.1["served"]["rule"], "accessed");
    assert!(events.iter().any(|(e, _)| *e == "ContentHandover"));
    assert!(events.iter().any(|(e, d)| *e == "ConsignmentAcceptance" && d["via"] == "web"));

    // A second session of the same citizen (another browser).
    let mut other = WebClient::new(&app);
    other.sign_in(&app, &pinfl).await;
    assert_eq!(other.get("/inbox").await.status, 200);

    // Settings: consent off and a new phone, recorded about the recipient.
    let page = web.get("/settings").await;
    let csrf = page.field("csrf");
    let r = web.post("/settings", &[("csrf", &csrf), ("phone", "+998 90 111 22 99"), ("email", "")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (consent, phone): (bool, Option<String>) =
        sqlx::query_as("select digital_consent, phone from recipient where pinfl = $1")
            .bind(&pinfl)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(!consent);
    assert_eq!(phone.as_deref(), Some("+998901112299"));
    let record: Vec<u8> = sqlx::query_scalar("select canonical from evidence where event = 'RecipientSettingsChange'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let record: Value = serde_json::from_slice(&record).unwrap();
    assert_eq!(record["recipient"]["pinfl"], pinfl.as_str());
    assert_eq!(record["details"]["changes"]["digital_consent"], serde_json::json!({ "from": true, "to": false }));
    assert_eq!(record["details"]["changes"]["phone"]["to"], "+998901112299");
    // A new phone ends the other sessions and is announced to the old number.
    assert_eq!(other.get("/inbox").await.status, StatusCode::SEE_OTHER);
    assert_eq!(web.get("/inbox").await.status, 200, "this session stays");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !app
        .sms
        .messages()
        .await
        .iter()
        .any(|m| m.request.client_ref.starts_with("phone-change-") && m.request.to == "+998901112238")
    {
        assert!(tokio::time::Instant::now() < deadline, "the old number was never told");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // A bad phone is refused and changes nothing.
    let r = web.post("/settings", &[("csrf", &csrf), ("phone", "12"), ("email", "")]).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(app.count("select count(*) from evidence where event = 'RecipientSettingsChange'").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_are_rate_limited_per_client_address_too() {
    let app =
        TestApp::spawn_with(Options { tweak: |s| s.web.codes_per_address_per_hour = 3, ..Default::default() }).await;
    let mut web = WebClient::new(&app);
    let csrf = web.get("/signin").await.field("csrf");
    // Different PINFLs from one address: the address runs out.
    for i in 0..3 {
        let pinfl = dalil::domain::Pinfl::with_check_digit(&format!("30101903234{:02}", 70 + i)).to_string();
        let r = web.post("/signin", &[("csrf", &csrf), ("pinfl", &pinfl)]).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
    }
    let pinfl = dalil::domain::Pinfl::with_check_digit("3010190323479").to_string();
    let r = web.post("/signin", &[("csrf", &csrf), ("pinfl", &pinfl)]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_qr_code_of_a_letter_leads_to_its_public_check() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-web-qr").await;
    dalil::admin::postal_operator_create(&app.pool, "uzpost-qr", "Pochta", &["UZ-TK".into()]).await.unwrap();
    let pinfl = dalil::domain::Pinfl::with_check_digit("3010190323480");
    let input = dalil::admin::RecipientInput {
        pinfl: Some(pinfl.to_string()),
        name: Some("Qodirov Sardor".into()),
        region: Some("UZ-TK".into()),
        district: Some("Mirobod tumani".into()),
        street: Some("Amir Temur shoh koʻchasi".into()),
        house: Some("3".into()),
        postcode: Some("100000".into()),
        digital_consent: Some(false),
        ..Default::default()
    };
    dalil::admin::recipient_upsert(&app.pool, &input).await.unwrap();
    let v: Value = app.submit(&key, "q-1", &summons(pinfl.as_str())).await.json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while app.count(&format!("select count(*) from letter where item_id = '{id}'")).await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no letter");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let sha: String = sqlx::query_scalar(&format!("select pdf_sha256 from letter where item_id = '{id}'"))
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let mut web = WebClient::new(&app);
    let page = web.get(&format!("/verify/{id}")).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains(&sha), "the printed letter's fingerprint");
    assert!(page.body.contains("2-1234&#x2f;2026"), "the reference (HTML-escaped)");
    assert!(!page.body.contains("Qodirov"), "no personal data on a public page");
    // Anything else: nothing is revealed.
    assert_eq!(web.get(&format!("/verify/{}", uuid::Uuid::now_v7())).await.status, StatusCode::NOT_FOUND);
    assert_eq!(web.get("/verify/not-an-id").await.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_proxy_the_limit_counts_each_client_not_the_proxy() {
    let app = TestApp::spawn_with(Options {
        tweak: |s| {
            s.web.codes_per_address_per_hour = 1;
            s.web.client_address_header = "x-forwarded-for".into();
        },
        ..Default::default()
    })
    .await;
    let mut web = WebClient::new(&app);
    let csrf = web.get("/signin").await.field("csrf");
    let cookie = format!("dalil_csrf={csrf}");
    let send = |forwarded: &'static str, first13: &'static str| {
        let pinfl = dalil::domain::Pinfl::with_check_digit(first13).to_string();
        let (client, url, cookie, csrf) = (
            reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap(),
            app.url("/signin"),
            cookie.clone(),
            csrf.clone(),
        );
        async move {
            client
                .post(url)
                .header(COOKIE, cookie)
                .header("x-forwarded-for", forwarded)
                .form(&[("csrf", csrf.as_str()), ("pinfl", pinfl.as_str())])
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    // Two clients behind one proxy: each has its own allowance; the proxy's entry is the last.
    assert_eq!(send("10.0.0.9, 203.0.113.5", "3010190323481").await, StatusCode::SEE_OTHER);
    assert_eq!(send("203.0.113.6", "3010190323482").await, StatusCode::SEE_OTHER);
    assert_eq!(send("10.0.0.1, 203.0.113.5", "3010190323483").await, StatusCode::TOO_MANY_REQUESTS);
}
