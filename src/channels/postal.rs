//! Hybrid mail: the letter is rendered to PDF (see [`crate::letter`]) and made ready for the
//! postal operator that covers the recipient's region. Handing it over is recorded when the
//! operator claims it (RelayToNonERDS), and its fate when the operator reports it
//! (`crate::api::postal`). No address, or no operator for the region, is a permanent failure:
//! the item shows it at once instead of stalling.

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{Channel, ChannelError, Job, Sent};
use crate::config::Settings;
use crate::domain::PostalAddress;
use crate::evidence::Event;
use crate::letter::{self, LetterInput};

pub struct Postal {
    pool: PgPool,
    public_url: String,
}

impl Postal {
    pub fn new(settings: &Settings, pool: PgPool) -> Postal {
        Postal { pool, public_url: settings.public_url.trim_end_matches('/').to_string() }
    }
}

#[derive(sqlx::FromRow)]
struct Source {
    agency_name: String,
    recipient_name: String,
    address: Option<sqlx::types::Json<PostalAddress>>,
    reference: String,
    subject: String,
    content_html: String,
    created_at: DateTime<Utc>,
}

impl Channel for Postal {
    fn name(&self) -> &'static str {
        "postal"
    }

    fn send<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<Sent, ChannelError>> {
        Box::pin(async move {
            let src: Source = sqlx::query_as(
                "select a.name as agency_name, r.name as recipient_name, r.address, i.reference, i.subject,
                        i.content_html, i.created_at
                 from item i join agency a on a.id = i.agency_id join recipient r on r.id = i.recipient_id
                 where i.id = $1",
            )
            .bind(job.item.item_id)
            .fetch_one(&self.pool)
            .await?;
            let address = src
                .address
                .map(|a| a.0)
                .ok_or_else(|| ChannelError::Permanent("the recipient has no postal address on record".into()))?;
            let operator: Option<(Uuid, String)> = sqlx::query_as(
                "select id, code from postal_operator where $1 = any(regions) order by created_at limit 1",
            )
            .bind(&address.region)
            .fetch_optional(&self.pool)
            .await?;
            let (operator_id, operator_code) = operator.ok_or_else(|| {
                ChannelError::Permanent(format!("no postal operator covers region {}", address.region))
            })?;
            let input = LetterInput {
                agency_name: src.agency_name,
                recipient_name: src.recipient_name.clone(),
                address: address.clone(),
                reference: src.reference,
                date: crate::templates::local_time(src.created_at).chars().take(10).collect(),
                subject: src.subject,
                content_html: src.content_html,
                item_id: job.item.item_id.to_string(),
                verify_url: format!("{}/verify/{}", self.public_url, job.item.item_id),
            };
            let lines = letter::address_lines(&src.recipient_name, &address);
            let enclosures: Vec<(String, Vec<u8>)> = sqlx::query_as(
                "select name, data from attachment where item_id = $1 and content_type = 'application/pdf' order by n",
            )
            .bind(job.item.item_id)
            .fetch_all(&self.pool)
            .await?;
            let pdf = tokio::task::spawn_blocking(move || {
                letter::render(&input).and_then(|l| letter::append_pdfs(l, &enclosures))
            })
            .await
            .map_err(|e| ChannelError::Transient(format!("rendering the letter: {e}")))?
            .map_err(|e| ChannelError::Permanent(format!("rendering the letter: {e:#}")))?;
            let sha256 = crate::evidence::sha256_hex(&pdf);
            Ok(Sent {
                event: None,
                details: serde_json::json!({
                    "operator": operator_code,
                    "operator_id": operator_id,
                    "pdf_sha256": sha256,
                    "address_lines": lines,
                }),
                provider_ref: Some(operator_code),
                segments: None,
                document: Some(pdf),
            })
        })
    }

    fn record<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        job: &'a Job,
        sent: &'a Sent,
    ) -> BoxFuture<'a, Result<bool, ChannelError>> {
        Box::pin(async move {
            let operator_id: Uuid = sent.details["operator_id"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| ChannelError::Permanent("no operator".into()))?;
            let lines: Vec<String> = serde_json::from_value(sent.details["address_lines"].clone()).unwrap_or_default();
            let inserted = sqlx::query(
                "insert into letter (item_id, attempt_id, operator_id, pdf, pdf_sha256, address_lines, status, lane)
                 values ($1, $2, $3, $4, $5, $6, 'ready', $7) on conflict (item_id) do nothing",
            )
            .bind(job.item.item_id)
            .bind(job.attempt_id)
            .bind(operator_id)
            .bind(sent.document.as_deref().unwrap_or_default())
            .bind(sent.details["pdf_sha256"].as_str().unwrap_or_default())
            .bind(&lines)
            .bind(job.lane)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            Ok(inserted == 1)
        })
    }

    fn failure_event(&self) -> Event {
        Event::RelayFailure
    }
}
