//! The citizen's web inbox: server-rendered pages (minijinja, `templates/web/`) that work
//! without JavaScript and at phone width, in uz-Latn, uz-Cyrl, ru and en.
//!
//! - Sign-in: PINFL, then a one-time code by SMS to the phone on record. Codes are random,
//!   kept only as a hash, expire, allow a few tries, and are rate-limited per PINFL and per
//!   client address. The answer is the same whether or not the PINFL is registered.
//! - Sessions: a random token in an HttpOnly, SameSite=Strict cookie (Secure behind TLS); the
//!   server keeps its hash, and signing out ends it there. Every form carries a CSRF token.
//! - Every page: a Content-Security-Policy without scripts, `no-store`, no framing.
//! - Opening, downloading and acknowledging record the same evidence as the API (`via: web`);
//!   a change of settings is a record of its own about the recipient.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use axum::extract::{ConnectInfo, Multipart, Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use base64::Engine;
use chrono::{DateTime, Utc};
use rand::{Rng, RngCore};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::api::auth::Citizen;
use crate::api::{ApiError, AppState};
use crate::domain::{EmailAddress, PhoneNumber, Pinfl};
use crate::evidence::{self, Actor, Event, NewEvidence};

/// The languages of the pages: code, HTML `lang`, the language's own name.
pub const LANGS: [(&str, &str, &str); 4] = [
    ("uz-Latn", "uz-Latn", "Oʻzbekcha"),
    ("uz-Cyrl", "uz-Cyrl", "Ўзбекча"),
    ("ru", "ru", "Русский"),
    ("en", "en", "English"),
];

const SESSION_COOKIE: &str = "dalil_session";
const CSRF_COOKIE: &str = "dalil_csrf";
const LANG_COOKIE: &str = "dalil_lang";

const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// The page templates and their text in every language.
pub struct Pages {
    env: minijinja::Environment<'static>,
    texts: HashMap<String, BTreeMap<String, String>>,
    css: String,
}

impl Pages {
    pub fn load(dir: &Path) -> anyhow::Result<Pages> {
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::Html);
        for name in ["base", "signin", "code", "inbox", "item", "message", "settings", "verify"] {
            let file = dir.join(format!("{name}.html"));
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            env.add_template_owned(format!("{name}.html"), text).with_context(|| format!("in {}", file.display()))?;
        }
        let mut texts = HashMap::new();
        for (code, _, _) in LANGS {
            let file = dir.join("i18n").join(format!("{code}.toml"));
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let map: BTreeMap<String, String> =
                toml::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
            texts.insert(code.to_string(), map);
        }
        let keys: Vec<&String> = texts["en"].keys().collect();
        for (code, map) in &texts {
            let these: Vec<&String> = map.keys().collect();
            anyhow::ensure!(these == keys, "templates/web/i18n/{code}.toml does not have the same keys as en.toml");
        }
        let css = std::fs::read_to_string(dir.join("dalil.css")).context("reading dalil.css")?;
        Ok(Pages { env, texts, css })
    }

    fn text(&self, lang: &str, key: &str) -> String {
        self.texts.get(lang).and_then(|m| m.get(key)).cloned().unwrap_or_else(|| key.to_string())
    }

    /// A text with `{name}` placeholders filled.
    fn fill(&self, lang: &str, key: &str, args: &[(&str, &str)]) -> String {
        args.iter().fold(self.text(lang, key), |t, (k, v)| t.replace(&format!("{{{k}}}"), v))
    }
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/inbox") }))
        .route("/static/dalil.css", get(css))
        .route("/lang/{code}", get(set_lang))
        .route("/signin", get(signin_page).post(signin))
        .route("/signin/code", get(code_page).post(code))
        .route("/signout", post(signout))
        .route("/inbox", get(inbox))
        .route("/inbox/{id}", get(item))
        .route("/inbox/{id}/attachments/{n}", get(attachment))
        .route("/inbox/{id}/acknowledge", post(acknowledge))
        .route("/settings", get(settings_page).post(settings))
        .route("/verify", get(verify_page).post(verify))
        .route("/verify/{id}", get(verify_letter))
        .layer(axum::middleware::from_fn(security_headers))
}

async fn security_headers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    if !h.contains_key(header::CACHE_CONTROL) {
        // Pages are private: never kept by a browser or a proxy (a shared library computer).
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

async fn css(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=3600")],
        state.pages.css.clone(),
    )
        .into_response()
}

fn cookies(headers: &HeaderMap) -> HashMap<String, String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

fn cookie(state: &AppState, name: &str, value: &str, max_age: Option<i64>) -> String {
    let secure = if state.settings.web.secure_cookies { "; Secure" } else { "" };
    let age = max_age.map(|a| format!("; Max-Age={a}")).unwrap_or_default();
    format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict{secure}{age}")
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Only paths of this site: never an open redirect.
fn safe_next(next: Option<&str>) -> String {
    match next {
        // Visible ASCII only: browsers drop tabs and newlines, so "/\t/evil" would become "//evil".
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.contains('\\')
                && n.len() < 500
                && n.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            n.to_string()
        }
        _ => "/inbox".into(),
    }
}

/// The page language: the cookie, else the browser's first language we have, else uz-Latn.
fn language(headers: &HeaderMap) -> String {
    if let Some(l) = cookies(headers).get(LANG_COOKIE).filter(|l| LANGS.iter().any(|(c, _, _)| c == l)) {
        return l.clone();
    }
    let accept = headers.get(header::ACCEPT_LANGUAGE).and_then(|v| v.to_str().ok()).unwrap_or("");
    for part in accept.split(',') {
        let tag = part.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        let found = match tag.as_str() {
            t if t.starts_with("uz-cyrl") => Some("uz-Cyrl"),
            t if t.starts_with("uz") => Some("uz-Latn"),
            t if t.starts_with("ru") => Some("ru"),
            t if t.starts_with("en") => Some("en"),
            _ => None,
        };
        if let Some(f) = found {
            return f.into();
        }
    }
    "uz-Latn".into()
}

/// A signed-in citizen.
#[derive(Debug, Clone)]
struct Session {
    recipient_id: Uuid,
    pinfl: Pinfl,
    csrf: String,
    token_hash: Vec<u8>,
}

impl Session {
    fn citizen(&self) -> Citizen {
        Citizen { pinfl: self.pinfl.clone() }
    }
}

async fn session(state: &AppState, headers: &HeaderMap) -> Result<Option<Session>, ApiError> {
    let Some(token) = cookies(headers).get(SESSION_COOKIE).cloned() else { return Ok(None) };
    let token_hash = hash(&token);
    let idle = state.settings.web.session_idle_minutes;
    let row: Option<(Uuid, String, String)> = sqlx::query_as(
        "update web_session set last_seen_at = now()
         where token_hash = $1 and ended_at is null and expires_at > now()
           and last_seen_at > now() - make_interval(mins => $2)
         returning recipient_id, pinfl, csrf",
    )
    .bind(&token_hash)
    .bind(idle)
    .fetch_optional(&state.pool)
    .await?;
    Ok(row.and_then(|(recipient_id, pinfl, csrf)| {
        Pinfl::parse(&pinfl).ok().map(|pinfl| Session { recipient_id, pinfl, csrf, token_hash })
    }))
}

/// The session, or the response that sends the visitor to sign in first.
async fn require(state: &AppState, headers: &HeaderMap, path: &str) -> Result<Session, Response> {
    match session(state, headers).await {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(Redirect::to(&format!("/signin?next={}", urlencode(path))).into_response()),
        Err(e) => Err(e.into_response()),
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What every page needs to render.
struct Page<'a> {
    state: &'a AppState,
    lang: String,
    path: String,
    session: Option<&'a Session>,
    /// The pre-session CSRF token (signed-out forms), and whether its cookie must be set.
    anon_csrf: Option<(String, bool)>,
}

impl<'a> Page<'a> {
    fn new(state: &'a AppState, headers: &HeaderMap, path: &str, session: Option<&'a Session>) -> Page<'a> {
        Page { state, lang: language(headers), path: path.to_string(), session, anon_csrf: None }
    }

    /// Signed-out forms use a double-submit token: a cookie and the same value in the form.
    fn with_anon_csrf(mut self, headers: &HeaderMap) -> Self {
        self.anon_csrf = Some(match cookies(headers).get(CSRF_COOKIE) {
            Some(t) if t.len() >= 32 => (t.clone(), false),
            _ => (random_token(), true),
        });
        self
    }

    fn t(&self, key: &str) -> String {
        self.state.pages.text(&self.lang, key)
    }

    fn fill(&self, key: &str, args: &[(&str, &str)]) -> String {
        self.state.pages.fill(&self.lang, key, args)
    }

    fn render(&self, status: StatusCode, template: &str, title: &str, extra: Value) -> Response {
        let csrf = match (self.session, &self.anon_csrf) {
            (Some(s), _) => s.csrf.clone(),
            (None, Some((t, _))) => t.clone(),
            (None, None) => String::new(),
        };
        let langs: Vec<Value> =
            LANGS.iter().map(|(code, html, label)| json!({ "code": code, "html": html, "label": label })).collect();
        let mut ctx = json!({
            "t": self.state.pages.texts.get(&self.lang),
            "lang": self.lang,
            "html_lang": self.lang,
            "langs": langs,
            "path": self.path,
            "path_q": urlencode(&self.path),
            "signed_in": self.session.is_some(),
            "csrf": csrf,
            "title": title,
            "notice": Value::Null,
            "error": Value::Null,
            "section": "",
        });
        if let (Value::Object(base), Value::Object(more)) = (&mut ctx, extra) {
            base.extend(more);
        }
        let html =
            self.state.pages.env.get_template(template).and_then(|t| t.render(minijinja::Value::from_serialize(&ctx)));
        let mut response = match html {
            Ok(html) => (status, axum::response::Html(html)).into_response(),
            Err(e) => {
                tracing::error!(template, error = format!("{e:#}"), "rendering a page failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
            }
        };
        if let Some((token, true)) = &self.anon_csrf {
            if let Ok(v) = HeaderValue::from_str(&cookie(self.state, CSRF_COOKIE, token, None)) {
                response.headers_mut().append(header::SET_COOKIE, v);
            }
        }
        response
    }

    fn message(&self, status: StatusCode, heading: &str, text: &str, link: Option<(&str, String)>) -> Response {
        let link = link.map(|(href, label)| json!({ "href": href, "label": label }));
        self.render(status, "message.html", heading, json!({ "heading": heading, "text": text, "link": link }))
    }

    /// A form whose CSRF token does not match: nothing was done.
    fn forbidden(&self, link: Option<(&str, String)>) -> Response {
        self.message(StatusCode::FORBIDDEN, &self.t("error_title"), &self.t("form_expired"), link)
    }

    fn not_found(&self) -> Response {
        self.message(StatusCode::NOT_FOUND, &self.t("error_title"), &self.t("not_found"), None)
    }

    fn error(&self, e: ApiError) -> Response {
        match e {
            ApiError::NotFound => self.not_found(),
            ApiError::Gone(_) => self.message(
                StatusCode::GONE,
                &self.t("withdrawn_title"),
                &self.t("withdrawn_text"),
                Some(("/inbox", self.t("item_back"))),
            ),
            other => {
                let status = other.status();
                if status.is_server_error() {
                    tracing::error!(error = %other, "web page failed");
                }
                self.message(status, &self.t("error_title"), &self.t("form_expired"), None)
            }
        }
    }
}

fn local(t: DateTime<Utc>) -> String {
    crate::templates::local_time(t)
}

/// The day in Tashkent, without the time.
fn local_day(t: DateTime<Utc>) -> String {
    local(t).split(' ').next().unwrap_or_default().to_string()
}

async fn set_lang(
    State(state): State<AppState>,
    UrlPath(code): UrlPath<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let next = safe_next(q.get("next").map(String::as_str));
    if !LANGS.iter().any(|(c, _, _)| *c == code) {
        return Redirect::to(&next).into_response();
    }
    let mut r = Redirect::to(&next).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie(&state, LANG_COOKIE, &code, Some(365 * 24 * 3600))) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

fn csrf_ok(headers: &HeaderMap, session: Option<&Session>, given: &str) -> bool {
    use subtle::ConstantTimeEq;
    let expected = match session {
        Some(s) => s.csrf.clone(),
        None => match cookies(headers).get(CSRF_COOKIE) {
            Some(c) => c.clone(),
            None => return false,
        },
    };
    !given.is_empty() && bool::from(expected.as_bytes().ct_eq(given.as_bytes()))
}

// ---- sign-in ----

#[derive(Deserialize)]
struct NextQuery {
    next: Option<String>,
    bye: Option<String>,
}

async fn signin_page(State(state): State<AppState>, headers: HeaderMap, Query(q): Query<NextQuery>) -> Response {
    if let Ok(Some(_)) = session(&state, &headers).await {
        return Redirect::to(&safe_next(q.next.as_deref())).into_response();
    }
    let page = Page::new(&state, &headers, "/signin", None).with_anon_csrf(&headers);
    let notice = q.bye.map(|_| page.t("signed_out"));
    page.render(
        StatusCode::OK,
        "signin.html",
        &page.t("signin_title"),
        json!({ "next": safe_next(q.next.as_deref()), "pinfl": "", "notice": notice }),
    )
}

#[derive(Deserialize)]
struct SigninForm {
    csrf: String,
    pinfl: String,
    next: Option<String>,
}

async fn signin(
    State(state): State<AppState>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<SigninForm>,
) -> Response {
    let page = Page::new(&state, &headers, "/signin", None).with_anon_csrf(&headers);
    if !csrf_ok(&headers, None, &form.csrf) {
        return page.forbidden(Some(("/signin", page.t("signin_title"))));
    }
    let next = safe_next(form.next.as_deref());
    let again = |error: String, status: StatusCode| {
        page.render(
            status,
            "signin.html",
            &page.t("signin_title"),
            json!({ "next": next, "pinfl": form.pinfl, "error": error }),
        )
    };
    let digits: String = form.pinfl.chars().filter(|c| !c.is_whitespace()).collect();
    let Ok(pinfl) = Pinfl::parse(&digits) else {
        return again(page.t("pinfl_invalid"), StatusCode::UNPROCESSABLE_ENTITY);
    };
    let client = client_address(&state, &headers, addr);
    match start_challenge(&state, &pinfl, &client, &page.lang).await {
        Ok(Challenge::Sent(id)) => {
            Redirect::to(&format!("/signin/code?c={id}&next={}", urlencode(&next))).into_response()
        }
        Ok(Challenge::TooMany) => again(page.t("too_many_codes"), StatusCode::TOO_MANY_REQUESTS),
        Err(e) => page.error(e),
    }
}

/// The client's address for rate limits: the connection's, or the one a trusted reverse proxy
/// names in `web.client_address_header`.
fn client_address(state: &AppState, headers: &HeaderMap, peer: SocketAddr) -> String {
    let name = state.settings.web.client_address_header.trim();
    if name.is_empty() {
        return peer.ip().to_string();
    }
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .map(|v| v.trim().to_string())
        .filter(|v| v.parse::<std::net::IpAddr>().is_ok())
        .unwrap_or_else(|| peer.ip().to_string())
}

enum Challenge {
    Sent(Uuid),
    TooMany,
}

fn code_hash(challenge: Uuid, code: &str) -> Vec<u8> {
    Sha256::digest(format!("{challenge}:{code}").as_bytes()).to_vec()
}

/// Creates a challenge and sends its code, unless the PINFL or the address asked too often.
/// A PINFL without a phone on record gets a challenge no code can pass, and the same answer.
async fn start_challenge(state: &AppState, pinfl: &Pinfl, addr: &str, lang: &str) -> Result<Challenge, ApiError> {
    let w = &state.settings.web;
    let mut tx = state.pool.begin().await?;
    // Parallel requests count one after another: the limits cannot be raced.
    sqlx::query("select pg_advisory_xact_lock(hashtext('otp-pinfl:' || $1)), pg_advisory_xact_lock(hashtext('otp-addr:' || $2))")
        .bind(pinfl.as_str())
        .bind(addr)
        .execute(&mut *tx)
        .await?;
    let (by_pinfl, by_addr): (i64, i64) = sqlx::query_as(
        "select (select count(*) from otp_challenge where pinfl = $1 and created_at > now() - interval '1 hour'),
                (select count(*) from otp_challenge where client_addr = $2 and created_at > now() - interval '1 hour')",
    )
    .bind(pinfl.as_str())
    .bind(addr)
    .fetch_one(&mut *tx)
    .await?;
    if by_pinfl >= w.codes_per_pinfl_per_hour || by_addr >= w.codes_per_address_per_hour {
        tracing::warn!(addr, by_pinfl, by_addr, "web sign-in: too many codes asked for");
        return Ok(Challenge::TooMany);
    }
    let recipient: Option<(Uuid, Option<String>)> = sqlx::query_as("select id, phone from recipient where pinfl = $1")
        .bind(pinfl.as_str())
        .fetch_optional(&mut *tx)
        .await?;
    let id = Uuid::now_v7();
    let code = format!("{:06}", rand::thread_rng().gen_range(0..1_000_000));
    let target = recipient.and_then(|(rid, phone)| phone.map(|p| (rid, p)));
    sqlx::query(
        "insert into otp_challenge (id, pinfl, recipient_id, code_hash, client_addr, expires_at)
         values ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))",
    )
    .bind(id)
    .bind(pinfl.as_str())
    .bind(target.as_ref().map(|(rid, _)| *rid))
    .bind(code_hash(id, &code))
    .bind(addr)
    .bind(w.code_ttl_seconds as f64)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let Some((_, phone)) = target else { return Ok(Challenge::Sent(id)) };
    let text = match lang {
        "ru" => format!("Dalil: код для входа {code}. Никому его не сообщайте."),
        "uz-Cyrl" => format!("Dalil: кириш коди {code}. Уни ҳеч кимга айтманг."),
        "en" => format!("Dalil: your sign-in code is {code}. Never tell it to anyone."),
        _ => format!("Dalil: kirish kodi {code}. Uni hech kimga aytmang."),
    };
    // Sent in the background: the answer takes the same time whether or not the PINFL has a
    // phone on record, so timing does not tell who is registered. A failed send expires the
    // challenge; the page offers a new code.
    let state = state.clone();
    tokio::spawn(async move {
        let sent = send_code(&state, &phone, &text, id).await;
        let update = match &sent {
            Ok(provider_ref) => {
                sqlx::query("update otp_challenge set provider_ref = $2 where id = $1").bind(id).bind(provider_ref)
            }
            Err(e) => {
                tracing::warn!(error = %e, "web sign-in: the code could not be sent");
                sqlx::query("update otp_challenge set expires_at = now() where id = $1").bind(id)
            }
        };
        if let Err(e) = update.execute(&state.pool).await {
            tracing::warn!(error = %e, "web sign-in: recording the code's sending failed");
        }
    });
    Ok(Challenge::Sent(id))
}

/// Sends the code through the SMS gateway of the `sms` channel, at once (a code that waits in
/// a retry queue is useless).
async fn send_code(state: &AppState, to: &str, text: &str, challenge: Uuid) -> anyhow::Result<String> {
    send_text(state, to, text, &format!("otp-{challenge}")).await
}

/// Sends one SMS through the gateway at once; `client_ref` is the gateway's idempotency key.
async fn send_text(state: &AppState, to: &str, text: &str, client_ref: &str) -> anyhow::Result<String> {
    let s = &state.settings.sms;
    let request = crate::channels::sms::SendRequest {
        to: to.to_string(),
        from: s.sender.clone(),
        text: text.to_string(),
        client_ref: client_ref.to_string(),
        callback_url: format!(
            "{}/v1/providers/sms/{}/reports",
            state.settings.public_url.trim_end_matches('/'),
            s.provider
        ),
    };
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/messages", s.base_url.trim_end_matches('/')))
        .timeout(std::time::Duration::from_millis(s.timeout_ms))
        .bearer_auth(s.token.expose_secret())
        .json(&request)
        .send()
        .await?;
    anyhow::ensure!(response.status().is_success(), "the SMS gateway answered {}", response.status());
    let accepted: crate::channels::sms::SendResponse = response.json().await?;
    Ok(accepted.id)
}

#[derive(Deserialize)]
struct CodeQuery {
    c: Option<String>,
    next: Option<String>,
}

async fn code_page(State(state): State<AppState>, headers: HeaderMap, Query(q): Query<CodeQuery>) -> Response {
    let page = Page::new(&state, &headers, "/signin/code", None).with_anon_csrf(&headers);
    let Some(challenge) = q.c.as_deref().and_then(|c| Uuid::parse_str(c).ok()) else {
        return Redirect::to("/signin").into_response();
    };
    page.render(
        StatusCode::OK,
        "code.html",
        &page.t("code_title"),
        json!({ "challenge": challenge, "next": safe_next(q.next.as_deref()) }),
    )
}

#[derive(Deserialize)]
struct CodeForm {
    csrf: String,
    challenge: String,
    code: String,
    next: Option<String>,
}

async fn code(State(state): State<AppState>, headers: HeaderMap, Form(form): Form<CodeForm>) -> Response {
    let page = Page::new(&state, &headers, "/signin/code", None).with_anon_csrf(&headers);
    if !csrf_ok(&headers, None, &form.csrf) {
        return page.forbidden(Some(("/signin", page.t("signin_title"))));
    }
    let next = safe_next(form.next.as_deref());
    match check_code(&state, &form.challenge, form.code.trim()).await {
        Ok(CodeCheck::Right(recipient_id, pinfl)) => {
            let token = random_token();
            let created = sqlx::query(
                "insert into web_session (token_hash, recipient_id, pinfl, csrf, expires_at)
                 values ($1, $2, $3, $4, now() + make_interval(hours => $5))",
            )
            .bind(hash(&token))
            .bind(recipient_id)
            .bind(&pinfl)
            .bind(random_token())
            .bind(state.settings.web.session_max_hours)
            .execute(&state.pool)
            .await;
            if let Err(e) = created {
                return page.error(e.into());
            }
            tracing::info!(%recipient_id, "web sign-in");
            let mut r = Redirect::to(&next).into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie(&state, SESSION_COOKIE, &token, None)) {
                r.headers_mut().append(header::SET_COOKIE, v);
            }
            r
        }
        Ok(CodeCheck::Wrong(left)) => page.render(
            StatusCode::UNPROCESSABLE_ENTITY,
            "code.html",
            &page.t("code_title"),
            json!({ "challenge": form.challenge, "next": next, "error": page.fill("code_wrong", &[("left", &left.to_string())]) }),
        ),
        Ok(CodeCheck::Spent) => page.message(
            StatusCode::UNPROCESSABLE_ENTITY,
            &page.t("code_title"),
            &page.t("code_expired"),
            Some(("/signin", page.t("new_code"))),
        ),
        Err(e) => page.error(e),
    }
}

enum CodeCheck {
    Right(Uuid, String),
    Wrong(i32),
    Spent,
}

async fn check_code(state: &AppState, challenge: &str, code: &str) -> Result<CodeCheck, ApiError> {
    use subtle::ConstantTimeEq;
    let Ok(id) = Uuid::parse_str(challenge) else { return Ok(CodeCheck::Spent) };
    let max = state.settings.web.code_attempts;
    let mut tx = state.pool.begin().await?;
    #[allow(clippy::type_complexity)]
    let row: Option<(Option<Uuid>, String, Vec<u8>, i32, bool)> = sqlx::query_as(
        "select recipient_id, pinfl, code_hash, attempts, (used_at is not null or expires_at <= now())
         from otp_challenge where id = $1 for update",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((recipient_id, pinfl, stored, attempts, spent)) = row else { return Ok(CodeCheck::Spent) };
    if spent || attempts >= max {
        return Ok(CodeCheck::Spent);
    }
    let right = recipient_id.is_some() && bool::from(code_hash(id, code).ct_eq(&stored));
    let check = match (right, recipient_id) {
        (true, Some(rid)) => {
            sqlx::query("update otp_challenge set used_at = now(), attempts = attempts + 1 where id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            CodeCheck::Right(rid, pinfl)
        }
        _ => {
            sqlx::query("update otp_challenge set attempts = attempts + 1 where id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            if attempts + 1 >= max {
                CodeCheck::Spent
            } else {
                CodeCheck::Wrong(max - attempts - 1)
            }
        }
    };
    tx.commit().await?;
    Ok(check)
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

async fn signout(State(state): State<AppState>, headers: HeaderMap, Form(form): Form<CsrfForm>) -> Response {
    let s = match session(&state, &headers).await {
        Ok(Some(s)) => s,
        _ => return Redirect::to("/signin").into_response(),
    };
    if !csrf_ok(&headers, Some(&s), &form.csrf) {
        let page = Page::new(&state, &headers, "/signout", Some(&s));
        return page.forbidden(None);
    }
    if let Err(e) = sqlx::query("update web_session set ended_at = now() where token_hash = $1")
        .bind(&s.token_hash)
        .execute(&state.pool)
        .await
    {
        return ApiError::from(e).into_response();
    }
    let mut r = Redirect::to("/signin?bye=1").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie(&state, SESSION_COOKIE, "", Some(0))) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

// ---- inbox ----

#[derive(sqlx::FromRow)]
struct InboxRow {
    id: Uuid,
    agency: String,
    kind: String,
    subject: String,
    deposited_at: DateTime<Utc>,
    first_opened_at: Option<DateTime<Utc>>,
    respond_by: Option<DateTime<Utc>>,
    recalled_at: Option<DateTime<Utc>>,
}

async fn inbox(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let s = match require(&state, &headers, "/inbox").await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let page = Page::new(&state, &headers, "/inbox", Some(&s));
    let rows: Result<Vec<InboxRow>, sqlx::Error> = sqlx::query_as(
        "select i.id, a.name as agency, i.kind, i.subject, e.deposited_at, e.first_opened_at, i.respond_by,
                i.recalled_at
         from inbox_entry e join item i on i.id = e.item_id join agency a on a.id = i.agency_id
         where e.recipient_id = $1
         order by (e.first_opened_at is null and i.recalled_at is null) desc, e.deposited_at desc limit 500",
    )
    .bind(s.recipient_id)
    .fetch_all(&state.pool)
    .await;
    let rows = match rows {
        Ok(r) => r,
        Err(e) => return page.error(e.into()),
    };
    let unread = rows.iter().filter(|r| r.first_opened_at.is_none() && r.recalled_at.is_none()).count();
    let items: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "id": r.id, "agency": r.agency, "kind": kind_label(&page, &r.kind), "subject": r.subject,
                "deposited": local(r.deposited_at), "deposited_iso": evidence::format_time(r.deposited_at),
                "opened": r.first_opened_at.is_some(), "withdrawn": r.recalled_at.is_some(),
                "respond_by": r.respond_by.map(local), "respond_by_iso": r.respond_by.map(evidence::format_time),
            })
        })
        .collect();
    page.render(
        StatusCode::OK,
        "inbox.html",
        &page.t("inbox_title"),
        json!({ "items": items, "unread": page.fill("unread_count", &[("n", &unread.to_string())]), "section": "inbox" }),
    )
}

fn kind_label(page: &Page, kind: &str) -> String {
    page.t(&format!("kind_{kind}"))
}

async fn item(State(state): State<AppState>, headers: HeaderMap, UrlPath(id): UrlPath<String>) -> Response {
    let path = format!("/inbox/{id}");
    let s = match require(&state, &headers, &path).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let page = Page::new(&state, &headers, &path, Some(&s));
    let opened = match crate::api::inbox::open_via(&state, &s.citizen(), &id, "web").await {
        Ok(i) => i,
        Err(e) => return page.error(e),
    };
    let history = match history(&state, &page, opened.entry.id).await {
        Ok(h) => h,
        Err(e) => return page.error(e),
    };
    let served: Option<(DateTime<Utc>, String)> =
        sqlx::query_as("select served_at, served_rule from item where id = $1 and served_at is not null")
            .bind(opened.entry.id)
            .fetch_optional(&state.pool)
            .await
            .ok()
            .flatten();
    let language: Option<String> = sqlx::query_scalar("select language from item where id = $1")
        .bind(opened.entry.id)
        .fetch_optional(&state.pool)
        .await
        .ok()
        .flatten();
    let e = &opened.entry;
    let item = json!({
        "id": e.id, "subject": e.subject, "agency": e.agency.name, "reference": e.reference,
        "deposited": local(e.deposited_at), "deposited_iso": evidence::format_time(e.deposited_at),
        "respond_by": e.respond_by.map(local), "respond_by_iso": e.respond_by.map(evidence::format_time),
        "content": opened.content_html, "lang": language.unwrap_or_default(),
        "attachments": opened.attachments.iter().map(|a| json!({ "n": a.n, "name": a.name, "size": size(a.size) })).collect::<Vec<_>>(),
        "acknowledged": e.acknowledged_at.map(|t| page.fill("acknowledged_on", &[("date", &local(t))])),
        "served": served.map(|(at, rule)| page.fill("served_rule", &[("date", &local(at)), ("rule", &page.t(&format!("rule_{rule}")))])),
    });
    page.render(
        StatusCode::OK,
        "item.html",
        &e.subject,
        json!({ "item": item, "history": history, "section": "inbox" }),
    )
}

fn size(bytes: i32) -> String {
    match bytes {
        b if b >= 1024 * 1024 => format!("{:.1} MB", b as f64 / 1048576.0),
        b if b >= 1024 => format!("{} KB", b / 1024),
        b => format!("{b} B"),
    }
}

/// The item's evidence in words: what the sender can see about the recipient's copy.
async fn history(state: &AppState, page: &Page<'_>, item_id: Uuid) -> Result<Vec<Value>, ApiError> {
    let records = evidence::for_item(&mut *state.pool.acquire().await?, item_id).await?;
    Ok(records
        .iter()
        .map(|r| {
            let key = format!("ev_{}", r.event);
            let label = match page.state.pages.texts.get(&page.lang).and_then(|m| m.get(&key)) {
                Some(l) => l.clone(),
                None => page.t("ev_other"),
            };
            json!({
                "at": local(r.at), "iso": evidence::format_time(r.at), "label": label,
                "channel": r.channel.as_ref().map(|c| page.t(&format!("channel_{c}"))),
            })
        })
        .collect())
}

async fn attachment(
    State(state): State<AppState>,
    headers: HeaderMap,
    UrlPath((id, n)): UrlPath<(String, String)>,
) -> Response {
    let path = format!("/inbox/{id}");
    let s = match require(&state, &headers, &path).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    match crate::api::inbox::attachment_via(&state, &s.citizen(), &id, &n, "web").await {
        Ok(r) => r,
        Err(e) => Page::new(&state, &headers, &path, Some(&s)).error(e),
    }
}

async fn acknowledge(
    State(state): State<AppState>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    let path = format!("/inbox/{id}");
    let s = match require(&state, &headers, &path).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let page = Page::new(&state, &headers, &path, Some(&s));
    if !csrf_ok(&headers, Some(&s), &form.csrf) {
        return page.forbidden(None);
    }
    match crate::api::inbox::acknowledge_via(&state, &s.citizen(), &id, "web").await {
        Ok(_) => Redirect::to(&path).into_response(),
        Err(e) => page.error(e),
    }
}

// ---- settings ----

async fn settings_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let s = match require(&state, &headers, "/settings").await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let page = Page::new(&state, &headers, "/settings", Some(&s));
    render_settings(&page, &s, StatusCode::OK, json!({})).await
}

async fn render_settings(page: &Page<'_>, s: &Session, status: StatusCode, extra: Value) -> Response {
    let current: Result<(bool, Option<String>, Option<String>), sqlx::Error> =
        sqlx::query_as("select digital_consent, phone, email from recipient where id = $1")
            .bind(s.recipient_id)
            .fetch_one(&page.state.pool)
            .await;
    let (consent, phone, email) = match current {
        Ok(c) => c,
        Err(e) => return page.error(e.into()),
    };
    let changes = match page.state.pool.acquire().await {
        Ok(mut conn) => evidence::for_recipient(&mut conn, s.recipient_id).await.unwrap_or_default(),
        Err(e) => return page.error(e.into()),
    };
    let changes: Vec<Value> = changes
        .iter()
        .rev()
        .map(|r| {
            let c = &r.record["details"]["changes"];
            let mut what = Vec::new();
            if let Some(to) = c["digital_consent"]["to"].as_bool() {
                what.push(format!("{}: {}", page.t("consent_label"), if to { "✓" } else { "✗" }));
            }
            if c.get("phone").is_some() {
                what.push(format!("{}: {}", page.t("phone_label"), c["phone"]["to"].as_str().unwrap_or("—")));
            }
            if c.get("email").is_some() {
                what.push(format!("{}: {}", page.t("email_label"), c["email"]["to"].as_str().unwrap_or("—")));
            }
            json!({ "at": local(r.at), "iso": evidence::format_time(r.at), "what": what.join("; ") })
        })
        .collect();
    let mut ctx = json!({
        "consent": consent, "phone": phone.unwrap_or_default(), "email": email.unwrap_or_default(),
        "changes": changes, "field": "", "section": "settings",
    });
    if let (Value::Object(base), Value::Object(more)) = (&mut ctx, extra) {
        base.extend(more);
    }
    page.render(status, "settings.html", &page.t("settings_title"), ctx)
}

#[derive(Deserialize)]
struct SettingsForm {
    csrf: String,
    digital_consent: Option<String>,
    phone: String,
    email: String,
}

async fn settings(State(state): State<AppState>, headers: HeaderMap, Form(form): Form<SettingsForm>) -> Response {
    let s = match require(&state, &headers, "/settings").await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let page = Page::new(&state, &headers, "/settings", Some(&s));
    if !csrf_ok(&headers, Some(&s), &form.csrf) {
        return page.forbidden(None);
    }
    let invalid = |field: &str, key: &str| {
        let extra = json!({ "error": page.t(key), "field": field, "phone": form.phone, "email": form.email });
        (field.to_string(), extra)
    };
    let phone = match form.phone.trim() {
        "" => None,
        p => match PhoneNumber::parse(p) {
            Ok(p) => Some(p.as_str().to_string()),
            Err(_) => {
                let (_, extra) = invalid("phone", "phone_invalid");
                return render_settings(&page, &s, StatusCode::UNPROCESSABLE_ENTITY, extra).await;
            }
        },
    };
    let email = match form.email.trim() {
        "" => None,
        e => match EmailAddress::parse(e) {
            Ok(e) => Some(e.as_str().to_string()),
            Err(_) => {
                let (_, extra) = invalid("email", "email_invalid");
                return render_settings(&page, &s, StatusCode::UNPROCESSABLE_ENTITY, extra).await;
            }
        },
    };
    let consent = form.digital_consent.as_deref() == Some("yes");
    match save_settings(&state, &s, consent, phone, email).await {
        Ok(_) => render_settings(&page, &s, StatusCode::OK, json!({ "notice": page.t("saved") })).await,
        Err(e) => page.error(e),
    }
}

/// Changes the recipient's settings and records what changed; nothing when nothing did.
async fn save_settings(
    state: &AppState,
    s: &Session,
    consent: bool,
    phone: Option<String>,
    email: Option<String>,
) -> Result<bool, ApiError> {
    let mut tx = state.pool.begin().await?;
    let (old_consent, old_phone, old_email): (bool, Option<String>, Option<String>) =
        sqlx::query_as("select digital_consent, phone, email from recipient where id = $1 for update")
            .bind(s.recipient_id)
            .fetch_one(&mut *tx)
            .await?;
    let mut changes = serde_json::Map::new();
    if old_consent != consent {
        changes.insert("digital_consent".into(), json!({ "from": old_consent, "to": consent }));
    }
    if old_phone != phone {
        changes.insert("phone".into(), json!({ "from": old_phone, "to": phone }));
    }
    if old_email != email {
        changes.insert("email".into(), json!({ "from": old_email, "to": email }));
    }
    if changes.is_empty() {
        return Ok(false);
    }
    sqlx::query("update recipient set digital_consent = $2, phone = $3, email = $4, updated_at = now() where id = $1")
        .bind(s.recipient_id)
        .bind(consent)
        .bind(&phone)
        .bind(&email)
        .execute(&mut *tx)
        .await?;
    evidence::append_for_recipient(
        &mut tx,
        s.recipient_id,
        json!({ "pinfl": s.pinfl.as_str() }),
        NewEvidence {
            event: Event::RecipientSettingsChange,
            at: evidence::now(),
            actor: Actor::Citizen(s.pinfl.to_string()),
            channel: Some("web".into()),
            details: json!({ "changes": changes, "via": "web" }),
            digests: None,
        },
    )
    .await?;
    let phone_changed = old_phone != phone;
    if phone_changed {
        // Sign-in codes go to this phone: every other session of the recipient ends, and the
        // old number is told, so a change the owner did not make does not go unnoticed.
        sqlx::query(
            "update web_session set ended_at = now() where recipient_id = $1 and token_hash <> $2 and ended_at is null",
        )
        .bind(s.recipient_id)
        .bind(&s.token_hash)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    tracing::info!(recipient_id = %s.recipient_id, "recipient changed their settings");
    if let (true, Some(old)) = (phone_changed, old_phone) {
        let text = "Dalil: kiruvchi qutingiz telefon raqami oʻzgartirildi. Bu siz boʻlmasangiz, darhol xabar bering. \
                    Dalil: the phone number of your inbox was changed. If it was not you, report it at once.";
        let (state, id) = (state.clone(), Uuid::now_v7());
        tokio::spawn(async move {
            if let Err(e) = send_text(&state, &old, text, &format!("phone-change-{id}")).await {
                tracing::warn!(error = %e, "could not tell the old number of a phone change");
            }
        });
    }
    Ok(true)
}

// ---- verify ----

async fn verify_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let signed_in = session(&state, &headers).await.ok().flatten();
    let page = Page::new(&state, &headers, "/verify", None).with_anon_csrf(&headers);
    let page = Page { session: signed_in.as_ref(), ..page };
    page.render(StatusCode::OK, "verify.html", &page.t("verify_title"), json!({ "verdict": null, "letter": null }))
}

async fn verify(State(state): State<AppState>, headers: HeaderMap, mut form: Multipart) -> Response {
    let signed_in = session(&state, &headers).await.ok().flatten();
    let page = Page::new(&state, &headers, "/verify", None).with_anon_csrf(&headers);
    let page = Page { session: signed_in.as_ref(), ..page };
    let mut csrf = String::new();
    let mut bundle: Option<Vec<u8>> = None;
    while let Ok(Some(field)) = form.next_field().await {
        match field.name() {
            Some("csrf") => csrf = field.text().await.unwrap_or_default(),
            Some("bundle") => bundle = field.bytes().await.ok().map(|b| b.to_vec()),
            _ => {}
        }
    }
    let anon_ok = csrf_ok(&headers, None, &csrf);
    let session_ok = signed_in.as_ref().is_some_and(|s| csrf_ok(&headers, Some(s), &csrf));
    if !anon_ok && !session_ok {
        return page.forbidden(Some(("/verify", page.t("verify_title"))));
    }
    let verdict = match bundle.as_deref().map(serde_json::from_slice::<crate::proof::Bundle>) {
        Some(Ok(b)) => {
            let keys = match state.pool.acquire().await {
                Ok(mut conn) => crate::log::published_keys(&mut conn).await.map(|k| crate::log::verifier_keys(&k)),
                Err(e) => Err(e.into()),
            };
            match keys {
                Ok(keys) => verdict_view(&page, &crate::proof::verify(&b, &keys)),
                Err(e) => return page.error(ApiError::Internal(e)),
            }
        }
        _ => {
            json!({ "valid": false, "headline": page.t("verdict_invalid"), "reason": page.t("verdict_unreadable"), "lines": [] })
        }
    };
    let status = if verdict["valid"] == true { StatusCode::OK } else { StatusCode::UNPROCESSABLE_ENTITY };
    page.render(status, "verify.html", &page.t("verify_title"), json!({ "verdict": verdict, "letter": null }))
}

/// The kind of failure behind a verifier's technical reason, for a plain-language sentence.
fn failure_kind(reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    if r.contains("another item")
        || r.contains("duplicated")
        || r.contains("out of order")
        || r.contains("added, removed")
    {
        "verdict_why_set"
    } else if r.contains("summary") {
        "verdict_why_summary"
    } else if r.contains("checkpoint") || r.contains("key") || r.contains("signature") || r.contains("signed by") {
        "verdict_why_signature"
    } else if r.contains("bundle format") || r.contains("no records") {
        "verdict_why_format"
    } else {
        "verdict_why_changed"
    }
}

fn verdict_view(page: &Page, v: &crate::proof::Verdict) -> Value {
    let mut lines = Vec::new();
    // What an invalid bundle claims is not shown: it would read as fact.
    if let Some(item) = v.item.as_ref().filter(|_| v.valid) {
        lines.push(page.fill(
            "verdict_item",
            &[("reference", &item.reference), ("sender", &item.sender.name), ("date", &local(item.submitted_at))],
        ));
        lines.push(match &item.served {
            Some(s) => {
                page.fill("verdict_served", &[("date", &local(s.at)), ("rule", &page.t(&format!("rule_{}", s.rule)))])
            }
            None => page.t("verdict_not_served"),
        });
    }
    if v.valid {
        lines.push(page.fill("verdict_records", &[("n", &v.events.len().to_string())]));
    }
    if let Some(reason) = &v.reason {
        lines.insert(0, page.t(failure_kind(reason)));
    }
    json!({
        "valid": v.valid,
        "headline": if v.valid { page.t("verdict_valid") } else { page.t("verdict_invalid") },
        "reason": v.reason,
        "lines": lines,
    })
}

/// Where the QR code of a printed letter leads: what Dalil can say about it publicly.
async fn verify_letter(State(state): State<AppState>, headers: HeaderMap, UrlPath(id): UrlPath<String>) -> Response {
    let path = format!("/verify/{id}");
    let signed_in = session(&state, &headers).await.ok().flatten();
    let page = Page::new(&state, &headers, &path, None).with_anon_csrf(&headers);
    let page = Page { session: signed_in.as_ref(), ..page };
    let Ok(id) = Uuid::parse_str(&id) else {
        return page.message(StatusCode::NOT_FOUND, &page.t("verify_title"), &page.t("verify_unknown"), None);
    };
    #[allow(clippy::type_complexity)]
    let row: Result<
        Option<(String, String, DateTime<Utc>, Option<DateTime<Utc>>, Option<DateTime<Utc>>, Option<String>)>,
        _,
    > = sqlx::query_as(
        "select i.reference, a.name, i.created_at, i.served_at, i.recalled_at, l.pdf_sha256
             from item i join agency a on a.id = i.agency_id left join letter l on l.item_id = i.id where i.id = $1",
    )
    .bind(id)
    .fetch_optional(&state.pool)
    .await;
    let (reference, sender, created, served, recalled, sha256) = match row {
        Ok(Some(r)) => r,
        Ok(None) => {
            return page.message(StatusCode::NOT_FOUND, &page.t("verify_title"), &page.t("verify_unknown"), None)
        }
        Err(e) => return page.error(e.into()),
    };
    // Only letters that went on paper can be checked this way; an id alone says nothing more.
    let Some(sha256) = sha256 else {
        return page.message(StatusCode::NOT_FOUND, &page.t("verify_title"), &page.t("verify_unknown"), None);
    };
    let status = match (recalled, served) {
        (Some(_), _) => page.t("verify_qr_withdrawn"),
        // The day only: the exact time could tell when the addressee opened it.
        (None, Some(at)) => page.fill("verify_qr_status_served", &[("date", &local_day(at))]),
        (None, None) => page.t("verify_qr_status_open"),
    };
    let letter = json!({
        "title": page.fill("verify_qr_title", &[("reference", &reference)]),
        "text": page.fill("verify_qr_text", &[("sender", &sender), ("date", &local(created))]),
        "status": status,
        "sha256": sha256,
    });
    let title = letter["title"].as_str().unwrap_or_default().to_string();
    page.render(StatusCode::OK, "verify.html", &title, json!({ "verdict": null, "letter": letter }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_language_has_every_text_and_the_pages_parse() {
        let pages = Pages::load(Path::new("templates/web")).unwrap();
        assert_eq!(pages.texts.len(), 4);
        // Uzbek Latin takes U+02BB in oʻ and gʻ.
        for (k, v) in &pages.texts["uz-Latn"] {
            for bad in ["o'", "g'", "O'", "G'", "o‘", "g‘"] {
                assert!(!v.contains(bad), "uz-Latn {k}: {bad:?} in {v:?}");
            }
        }
        // Every event of the log has words in every language.
        for e in ["ContentConsignment", "ContentAccessTracking", "DeemedDelivery", "Recall", "ConsignmentAcceptance"] {
            for lang in ["uz-Latn", "uz-Cyrl", "ru", "en"] {
                assert!(pages.texts[lang].contains_key(&format!("ev_{e}")), "{lang} ev_{e}");
            }
        }
    }

    /// WCAG 2.x relative luminance of a #rrggbb colour.
    fn luminance(hex: &str) -> f64 {
        let v = u32::from_str_radix(hex.trim_start_matches('#'), 16).unwrap();
        let channel = |c: u32| {
            let c = c as f64 / 255.0;
            if c <= 0.03928 {
                c / 12.92
            } else {
                ((c + 0.055) / 1.055).powf(2.4)
            }
        };
        0.2126 * channel(v >> 16 & 255) + 0.7152 * channel(v >> 8 & 255) + 0.0722 * channel(v & 255)
    }

    #[test]
    fn text_colours_pass_wcag_aa_contrast() {
        let css = std::fs::read_to_string("templates/web/dalil.css").unwrap();
        let var = |name: &str| {
            let start = css.find(&format!("--{name}: #")).unwrap_or_else(|| panic!("--{name}")) + name.len() + 4;
            css[start..start + 7].to_string()
        };
        // Every text colour on the background it is shown on.
        let pairs = [
            (var("ink"), var("bg")),
            (var("muted"), var("bg")),
            (var("brand"), var("bg")),
            ("#ffffff".to_string(), var("brand")),
            (var("good"), var("bg")),
            (var("bad"), var("bg")),
            (var("bad"), "#fbe9ea".to_string()),
            ("#5c3c00".to_string(), var("warn-bg")),
            (var("muted"), "#f3f3f3".to_string()),
            (var("ink"), "#e8f1fa".to_string()),
        ];
        for (fg, bg) in pairs {
            let (a, b) = (luminance(&fg), luminance(&bg));
            let ratio = (a.max(b) + 0.05) / (a.min(b) + 0.05);
            assert!(ratio >= 4.5, "{fg} on {bg}: {ratio:.2}:1, WCAG AA needs 4.5:1");
        }
    }

    #[test]
    fn verifier_reasons_map_to_plain_words() {
        assert_eq!(
            failure_kind(
                "record at log index 3 is not in the signed log: its bytes or its inclusion proof were changed"
            ),
            "verdict_why_changed"
        );
        assert_eq!(failure_kind("the checkpoint's signature does not verify"), "verdict_why_signature");
        assert_eq!(failure_kind("record at log index 4 belongs to another item"), "verdict_why_set");
        assert_eq!(
            failure_kind("the summary claims the item was served, but no record served it"),
            "verdict_why_summary"
        );
        assert_eq!(failure_kind("the bundle's signature does not verify: records were added, removed or changed, or the summary was edited"), "verdict_why_set");
        assert_eq!(
            failure_kind("unknown bundle format \"x\"; this verifier reads dalil-proof-bundle/1"),
            "verdict_why_format"
        );
    }

    #[test]
    fn redirects_stay_on_this_site() {
        assert_eq!(safe_next(Some("/inbox/1")), "/inbox/1");
        for bad in [
            "//evil.example/x",
            "https://evil.example",
            "/\\evil",
            "javascript:alert(1)",
            "/\t/evil.example",
            "/\n/evil",
        ] {
            assert_eq!(safe_next(Some(bad)), "/inbox", "{bad}");
        }
    }

    #[test]
    fn the_browser_language_picks_the_page_language() {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_LANGUAGE, HeaderValue::from_static("ru-RU,ru;q=0.9,en;q=0.8"));
        assert_eq!(language(&h), "ru");
        h.insert(header::ACCEPT_LANGUAGE, HeaderValue::from_static("uz-Cyrl-UZ"));
        assert_eq!(language(&h), "uz-Cyrl");
        h.insert(header::COOKIE, HeaderValue::from_static("dalil_lang=en"));
        assert_eq!(language(&h), "en");
    }
}
