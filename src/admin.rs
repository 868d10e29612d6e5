//! Operator commands (`dalil admin …`): agencies, API keys, recipients, citizen tokens. Each
//! returns a JSON value; the CLI prints it as JSON (`--json`) or as a human summary.

use std::io::BufRead;
use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::api::auth::new_api_key;
use crate::config::Settings;
use crate::domain::{EmailAddress, FieldError, PhoneNumber, Pinfl, PostalAddress, RecipientId};
use crate::identity;

pub async fn agency_create(pool: &PgPool, code: &str, name: &str) -> anyhow::Result<Value> {
    let code = code.trim().to_ascii_lowercase();
    if code.len() < 2
        || code.len() > 63
        || !code.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        || code.starts_with('-')
    {
        bail!("--code: 2 to 63 letters, digits or dashes, e.g. tashkent-civil-court");
    }
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 300 {
        bail!("--name: 1 to 300 characters");
    }
    let id = Uuid::now_v7();
    let done = sqlx::query("insert into agency (id, code, name) values ($1, $2, $3) on conflict (code) do nothing")
        .bind(id)
        .bind(&code)
        .bind(name)
        .execute(pool)
        .await?;
    if done.rows_affected() == 0 {
        bail!("an agency with code {code} exists already");
    }
    Ok(json!({ "id": id, "code": code, "name": name }))
}

pub async fn agency_list(pool: &PgPool) -> anyhow::Result<Value> {
    let rows: Vec<(Uuid, String, String)> =
        sqlx::query_as("select id, code, name from agency order by code").fetch_all(pool).await?;
    Ok(Value::Array(rows.into_iter().map(|(id, code, name)| json!({ "id": id, "code": code, "name": name })).collect()))
}

pub async fn api_key_create(pool: &PgPool, agency_code: &str) -> anyhow::Result<Value> {
    let agency: Option<Uuid> = sqlx::query_scalar("select id from agency where code = $1")
        .bind(agency_code.trim().to_ascii_lowercase())
        .fetch_optional(pool)
        .await?;
    let Some(agency_id) = agency else { bail!("--agency: no agency with code {agency_code}") };
    let (secret, prefix, hash) = new_api_key();
    let id = Uuid::now_v7();
    sqlx::query("insert into api_key (id, agency_id, prefix, key_hash) values ($1, $2, $3, $4)")
        .bind(id)
        .bind(agency_id)
        .bind(&prefix)
        .bind(&hash)
        .execute(pool)
        .await?;
    Ok(json!({ "id": id, "agency": agency_code, "prefix": prefix, "key": secret }))
}

pub async fn api_key_revoke(pool: &PgPool, prefix: &str) -> anyhow::Result<Value> {
    let rows: Vec<(Uuid,)> =
        sqlx::query_as("update api_key set revoked_at = now() where prefix = $1 and revoked_at is null returning id")
            .bind(prefix)
            .fetch_all(pool)
            .await?;
    if rows.is_empty() {
        bail!("no active key with prefix {prefix}");
    }
    Ok(json!({ "revoked": rows.len(), "prefix": prefix }))
}

pub async fn api_key_list(pool: &PgPool, agency_code: &str) -> anyhow::Result<Value> {
    let rows: Vec<(String, chrono::DateTime<chrono::Utc>, Option<chrono::DateTime<chrono::Utc>>)> = sqlx::query_as(
        "select k.prefix, k.created_at, k.revoked_at from api_key k join agency a on a.id = k.agency_id where a.code = $1 order by k.created_at",
    )
    .bind(agency_code)
    .fetch_all(pool)
    .await?;
    Ok(Value::Array(
        rows.into_iter()
            .map(|(prefix, created, revoked)| json!({ "prefix": prefix, "created_at": created, "revoked_at": revoked }))
            .collect(),
    ))
}

/// A recipient as an operator gives it, from the command line or one line of an import file.
/// Fields left out keep their stored value; a new recipient needs a name.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipientInput {
    pub pinfl: Option<String>,
    pub tin: Option<String>,
    pub name: Option<String>,
    pub phone: Option<String>,
    pub email: Option<String>,
    pub region: Option<String>,
    pub district: Option<String>,
    pub street: Option<String>,
    pub house: Option<String>,
    pub apartment: Option<String>,
    pub postcode: Option<String>,
    pub digital_consent: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct ValidRecipient {
    pub id: RecipientId,
    pub name: Option<String>,
    pub phone: Option<PhoneNumber>,
    pub email: Option<EmailAddress>,
    pub address: Option<PostalAddress>,
    pub digital_consent: Option<bool>,
}

fn blank(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

pub fn validate_recipient(input: &RecipientInput) -> Result<ValidRecipient, FieldError> {
    let id = RecipientId::from_parts(blank(&input.pinfl), blank(&input.tin)).map_err(|e| {
        if e.field.is_empty() {
            FieldError::new("pinfl", e.message)
        } else {
            e
        }
    })?;
    let name = blank(&input.name).map(str::to_string);
    if name.as_ref().is_some_and(|n| n.chars().count() > 300) {
        return Err(FieldError::new("name", "at most 300 characters"));
    }
    let address_parts = [&input.region, &input.district, &input.street, &input.house, &input.postcode];
    let address = if address_parts.iter().all(|p| blank(p).is_none()) {
        None
    } else {
        Some(PostalAddress::parse(PostalAddress {
            region: blank(&input.region).unwrap_or_default().into(),
            district: blank(&input.district).unwrap_or_default().into(),
            street: blank(&input.street).unwrap_or_default().into(),
            house: blank(&input.house).unwrap_or_default().into(),
            apartment: blank(&input.apartment).map(str::to_string),
            postcode: blank(&input.postcode).unwrap_or_default().into(),
        })?)
    };
    Ok(ValidRecipient {
        id,
        name,
        phone: blank(&input.phone).map(PhoneNumber::parse).transpose()?,
        email: blank(&input.email).map(EmailAddress::parse).transpose()?,
        address,
        digital_consent: input.digital_consent,
    })
}

async fn upsert(conn: &mut sqlx::PgConnection, r: &ValidRecipient) -> anyhow::Result<(Uuid, bool)> {
    let column = r.id.scheme();
    let existing: Option<Uuid> =
        sqlx::query_scalar(&format!("select id from recipient where {column} = $1 for update"))
            .bind(r.id.value())
            .fetch_optional(&mut *conn)
            .await?;
    let address = r.address.as_ref().map(sqlx::types::Json);
    match existing {
        Some(id) => {
            sqlx::query(
                "update recipient set name = coalesce($2, name), phone = coalesce($3, phone), email = coalesce($4, email),
                        address = coalesce($5, address), digital_consent = coalesce($6, digital_consent), updated_at = now()
                 where id = $1",
            )
            .bind(id)
            .bind(&r.name)
            .bind(r.phone.as_ref().map(PhoneNumber::as_str))
            .bind(r.email.as_ref().map(EmailAddress::as_str))
            .bind(address)
            .bind(r.digital_consent)
            .execute(&mut *conn)
            .await?;
            Ok((id, false))
        }
        None => {
            let Some(name) = &r.name else { bail!("name: required for a new recipient") };
            let id = Uuid::now_v7();
            sqlx::query(&format!(
                "insert into recipient (id, {column}, name, phone, email, address, digital_consent) values ($1, $2, $3, $4, $5, $6, $7)"
            ))
            .bind(id)
            .bind(r.id.value())
            .bind(name)
            .bind(r.phone.as_ref().map(PhoneNumber::as_str))
            .bind(r.email.as_ref().map(EmailAddress::as_str))
            .bind(address)
            .bind(r.digital_consent.unwrap_or(false))
            .execute(&mut *conn)
            .await?;
            Ok((id, true))
        }
    }
}

pub async fn recipient_upsert(pool: &PgPool, input: &RecipientInput) -> anyhow::Result<Value> {
    let valid = validate_recipient(input)
        .map_err(|e| anyhow::anyhow!("--{}: {}", e.field.replace("address.", "").replace('_', "-"), e.message))?;
    let mut tx = pool.begin().await?;
    let (id, created) = upsert(&mut tx, &valid).await?;
    tx.commit().await?;
    Ok(json!({ "id": id, valid.id.scheme(): valid.id.value(), "created": created }))
}

/// Reads CSV (with a header row) or JSON lines, by the file's extension (`.csv`, `.jsonl`).
pub fn read_recipients(path: &Path) -> anyhow::Result<Vec<(usize, Result<RecipientInput, String>)>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let mut rows = Vec::new();
    match ext.as_str() {
        "csv" => {
            let mut reader = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(file);
            for (i, record) in reader.deserialize::<RecipientInput>().enumerate() {
                rows.push((i + 2, record.map_err(|e| e.to_string())));
            }
        }
        "jsonl" | "ndjson" | "json" => {
            for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                rows.push((i + 1, serde_json::from_str::<RecipientInput>(&line).map_err(|e| e.to_string())));
            }
        }
        _ => bail!("{}: name the file .csv or .jsonl", path.display()),
    }
    Ok(rows)
}

/// Imports a file all or nothing: every row is checked first; one bad row imports none and
/// every bad row is reported with its line number.
pub async fn recipients_import(pool: &PgPool, path: &Path) -> anyhow::Result<Value> {
    let rows = read_recipients(path)?;
    let mut errors = Vec::new();
    let mut valid = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (line, row) in rows {
        match row.map_err(|e| e.to_string()).and_then(|r| validate_recipient(&r).map_err(|e| e.to_string())) {
            Ok(v) => {
                if !seen.insert(v.id.clone()) {
                    errors.push(json!({ "line": line, "error": format!("{} {} appears twice in the file", v.id.scheme(), v.id.value()) }));
                } else {
                    valid.push((line, v));
                }
            }
            Err(e) => errors.push(json!({ "line": line, "error": e })),
        }
    }
    if !errors.is_empty() {
        return Ok(json!({ "imported": 0, "created": 0, "updated": 0, "errors": errors }));
    }
    let mut tx = pool.begin().await?;
    let (mut created, mut updated) = (0, 0);
    for (line, v) in &valid {
        match upsert(&mut tx, v).await {
            Ok((_, true)) => created += 1,
            Ok((_, false)) => updated += 1,
            Err(e) => errors.push(json!({ "line": line, "error": format!("{e:#}") })),
        }
    }
    if !errors.is_empty() {
        tx.rollback().await?;
        return Ok(json!({ "imported": 0, "created": 0, "updated": 0, "errors": errors }));
    }
    tx.commit().await?;
    Ok(json!({ "imported": created + updated, "created": created, "updated": updated, "errors": [] }))
}

pub fn citizen_token(settings: &Settings, pinfl: &str, ttl_secs: i64) -> anyhow::Result<Value> {
    let pinfl = Pinfl::parse(pinfl).map_err(|e| anyhow::anyhow!("PINFL: {}", e.message))?;
    let token = identity::mint_dev_token(&settings.identity, &pinfl, ttl_secs)?;
    Ok(json!({ "pinfl": pinfl, "token": token, "expires_in": ttl_secs }))
}

/// Messages in the dead queue, left in place.
pub async fn dead_letters_list(settings: &Settings, limit: usize) -> anyhow::Result<Value> {
    use lapin::options::{BasicGetOptions, BasicNackOptions};
    let topology = crate::app::load_topology(settings)?;
    let conn = crate::queue::connect(secrecy::ExposeSecret::expose_secret(&settings.amqp_url), "dalil-admin").await?;
    let ch = conn.create_channel().await?;
    let queue = topology.name("dead");
    let mut out = Vec::new();
    let mut held = Vec::new();
    while out.len() < limit {
        let Some(m) = ch.basic_get(queue.as_str().into(), BasicGetOptions::default()).await? else { break };
        out.push(json!({
            "message_id": m.delivery.properties.message_id().as_ref().map(|s| s.to_string()),
            "routing_key": m.delivery.routing_key.to_string(),
            "death": format!("{:?}", m.delivery.properties.headers().as_ref().and_then(|h| h.inner().get("x-death").cloned())),
            "body": String::from_utf8_lossy(&m.delivery.data),
        }));
        held.push(m);
    }
    // Put everything back, in order: listing changes nothing.
    for m in held {
        m.delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await?;
    }
    let _ = conn.close(200, "listed".into()).await;
    Ok(Value::Array(out))
}

/// Publishes dead letters back to the delivery exchange with their original routing key, each
/// removed from the dead queue only after RabbitMQ confirmed its replay.
pub async fn dead_letters_replay(settings: &Settings, limit: usize) -> anyhow::Result<Value> {
    use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
    let topology = crate::app::load_topology(settings)?;
    let conn = crate::queue::connect(secrecy::ExposeSecret::expose_secret(&settings.amqp_url), "dalil-admin").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let queue = topology.name("dead");
    // Only what is dead now: a replayed message that dies again is not replayed twice in a run.
    let present = ch
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions { passive: true, ..Default::default() },
            Default::default(),
        )
        .await?
        .message_count() as usize;
    let limit = limit.min(present);
    let mut replayed = 0;
    while replayed < limit {
        let Some(m) = ch.basic_get(queue.as_str().into(), BasicGetOptions::default()).await? else { break };
        let mut props = m.delivery.properties.clone();
        // A fresh start on the retry ladder.
        if let Some(headers) = props.headers().clone() {
            let mut h = lapin::types::FieldTable::default();
            for (k, v) in headers.inner() {
                if k.as_str() != "x-dalil-retries" && k.as_str() != "x-death" {
                    h.insert(k.clone(), v.clone());
                }
            }
            props = props.with_headers(h);
        }
        let confirm = ch
            .basic_publish(
                topology.name(crate::queue::DELIVERY_EXCHANGE).as_str().into(),
                m.delivery.routing_key.clone(),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                &m.delivery.data,
                props,
            )
            .await?
            .await?;
        anyhow::ensure!(
            confirm.is_ack() && confirm.take_message().is_none(),
            "RabbitMQ did not take a replayed message"
        );
        m.delivery.acker.ack(BasicAckOptions::default()).await?;
        replayed += 1;
    }
    let _ = conn.close(200, "replayed".into()).await;
    Ok(json!({ "replayed": replayed }))
}

/// A postal operator, the regions it covers, and its first API key (shown once).
pub async fn postal_operator_create(
    pool: &PgPool,
    code: &str,
    name: &str,
    regions: &[String],
) -> anyhow::Result<Value> {
    let code = code.trim().to_ascii_lowercase();
    if code.len() < 2 || code.len() > 63 || !code.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        bail!("--code: 2 to 63 letters, digits or dashes, e.g. uzpost-tashkent");
    }
    if name.trim().is_empty() {
        bail!("--name: required");
    }
    let mut codes = Vec::new();
    for r in regions.iter().flat_map(|r| r.split(',')).map(|r| r.trim().to_ascii_uppercase()).filter(|r| !r.is_empty())
    {
        if !crate::domain::REGIONS.iter().any(|(c, _)| *c == r) {
            bail!("--regions: {r} is not a region code of Uzbekistan (UZ-TK, UZ-SA, …)");
        }
        codes.push(r);
    }
    if codes.is_empty() {
        bail!("--regions: at least one region code, e.g. UZ-TK,UZ-TO");
    }
    let id = Uuid::now_v7();
    let mut tx = pool.begin().await?;
    let done = sqlx::query(
        "insert into postal_operator (id, code, name, regions) values ($1, $2, $3, $4) on conflict do nothing",
    )
    .bind(id)
    .bind(&code)
    .bind(name.trim())
    .bind(&codes)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        bail!("a postal operator with code {code} exists already");
    }
    let (secret, prefix, hash) = crate::api::auth::new_key(crate::api::auth::OPERATOR_KEY_PREFIX);
    sqlx::query("insert into operator_key (id, operator_id, prefix, key_hash) values ($1, $2, $3, $4)")
        .bind(Uuid::now_v7())
        .bind(id)
        .bind(&prefix)
        .bind(&hash)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(json!({ "id": id, "code": code, "name": name.trim(), "regions": codes, "key": secret }))
}

async fn agency_id(pool: &PgPool, code: &str) -> anyhow::Result<Uuid> {
    sqlx::query_scalar("select id from agency where code = $1")
        .bind(code)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no agency with code {code}"))
}

/// Registers a callback URL for an agency; the secret is in the answer, once.
pub async fn callback_add(
    pool: &PgPool,
    settings: &crate::config::Settings,
    agency: &str,
    url: &str,
    events: &[String],
) -> anyhow::Result<Value> {
    let agency_id = agency_id(pool, agency).await?;
    let url =
        crate::callbacks::check_url(url, settings.callbacks.allow_http).map_err(|e| anyhow::anyhow!("--url: {e}"))?;
    let events = crate::callbacks::check_types(events).map_err(|e| anyhow::anyhow!("--events: {e}"))?;
    let (endpoint, secret) = crate::callbacks::register(pool, agency_id, &url, &events).await?;
    Ok(json!({ "id": endpoint.id, "url": endpoint.url, "events": endpoint.events.join(","), "secret": secret }))
}

pub async fn callback_list(pool: &PgPool, agency: &str) -> anyhow::Result<Value> {
    let agency_id = agency_id(pool, agency).await?;
    let endpoints = crate::callbacks::list(pool, agency_id).await?;
    Ok(Value::Array(
        endpoints
            .into_iter()
            .map(|e| json!({ "id": e.id, "url": e.url, "events": e.events.join(","), "created_at": e.created_at }))
            .collect(),
    ))
}

pub async fn callback_remove(pool: &PgPool, id: &str) -> anyhow::Result<Value> {
    let id = Uuid::parse_str(id).map_err(|_| anyhow::anyhow!("{id} is not an endpoint id"))?;
    let n = sqlx::query("update callback_endpoint set disabled_at = now() where id = $1 and disabled_at is null")
        .bind(id)
        .execute(pool)
        .await?
        .rows_affected();
    anyhow::ensure!(n == 1, "no active endpoint {id}");
    Ok(json!({ "removed": id }))
}
