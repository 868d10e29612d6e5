//! Email notices over SMTP (lettre's async pooled transport), or as `.eml` files in a folder
//! where no SMTP server is configured (development, `dalil demo`). Every send is wrapped in a
//! timeout, since lettre's own covers connecting only. SMTP 5xx is permanent; 4xx, connection
//! errors and timeouts are transient. The Message-ID is derived from the attempt id, so the
//! evidence names the exact message and a resend after a crash carries the same id.

use std::time::Duration;

use anyhow::Context;
use futures_util::future::BoxFuture;
use lettre::message::dkim::{DkimConfig, DkimSigningAlgorithm, DkimSigningKey};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::ExposeSecret;
use sqlx::PgConnection;

use super::{Channel, ChannelError, Job, Sent};
use crate::config::Settings;
use crate::evidence::Event;

/// Where messages go: an SMTP relay, or `.eml` files in a folder (`email.transport = "file"`).
enum Transport {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    File(lettre::AsyncFileTransport<Tokio1Executor>, std::path::PathBuf),
}

pub struct Email {
    transport: Transport,
    from: Mailbox,
    timeout: Duration,
    dkim: Option<DkimConfig>,
}

impl Email {
    pub fn new(settings: &Settings) -> anyhow::Result<Email> {
        let e = &settings.email;
        let builder = match e.tls.as_str() {
            "tls" => AsyncSmtpTransport::<Tokio1Executor>::relay(&e.smtp_host)?,
            "starttls" => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&e.smtp_host)?,
            _ => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&e.smtp_host),
        };
        let mut builder = builder
            .port(e.smtp_port)
            .timeout(Some(Duration::from_millis(e.timeout_ms)))
            .pool_config(PoolConfig::new().max_size(e.pool_size));
        if !e.username.is_empty() {
            builder = builder.credentials(Credentials::new(e.username.clone(), e.password.expose_secret().to_string()));
        }
        let dkim = if e.dkim_private_key_file.is_empty() {
            None
        } else {
            let pem = std::fs::read_to_string(&e.dkim_private_key_file)
                .with_context(|| format!("reading the DKIM key {}", e.dkim_private_key_file))?;
            let algorithm =
                if pem.contains("RSA PRIVATE KEY") { DkimSigningAlgorithm::Rsa } else { DkimSigningAlgorithm::Ed25519 };
            let key = DkimSigningKey::new(&pem, algorithm).map_err(|e| anyhow::anyhow!("DKIM key: {e:?}"))?;
            Some(DkimConfig::default_config(e.dkim_selector.clone(), e.dkim_domain.clone(), key))
        };
        let transport = if e.transport == "file" {
            std::fs::create_dir_all(&e.file_dir)
                .with_context(|| format!("creating email.file_dir {}", e.file_dir.display()))?;
            Transport::File(lettre::AsyncFileTransport::new(&e.file_dir), e.file_dir.clone())
        } else {
            Transport::Smtp(builder.build())
        };
        Ok(Email {
            transport,
            from: e.from.parse().context("email.from")?,
            timeout: Duration::from_millis(e.timeout_ms),
            dkim,
        })
    }
}

impl Channel for Email {
    fn name(&self) -> &'static str {
        "email"
    }

    fn send<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<Sent, ChannelError>> {
        Box::pin(async move {
            let notice = job
                .notice
                .clone()
                .ok_or_else(|| ChannelError::Permanent("no email notice was fixed at submission".into()))?;
            let (to, subject, text, html) = (notice.address, notice.subject, notice.text, notice.html);
            let to_box: Mailbox =
                to.parse().map_err(|e| ChannelError::Permanent(format!("the address {to} is not valid: {e}")))?;
            let domain = self.from.email.domain().to_string();
            let message_id = format!("<{}@{domain}>", job.attempt_id);
            let mut message = Message::builder()
                .from(self.from.clone())
                .to(to_box)
                .subject(subject.unwrap_or_default())
                .message_id(Some(message_id.clone()))
                .multipart(MultiPart::alternative_plain_html(text, html.unwrap_or_default()))
                .map_err(|e| ChannelError::Permanent(format!("building the message: {e}")))?;
            if let Some(dkim) = &self.dkim {
                message.sign(dkim);
            }
            let smtp = match &self.transport {
                Transport::Smtp(smtp) => smtp,
                Transport::File(files, dir) => {
                    let id = tokio::time::timeout(self.timeout, files.send(message))
                        .await
                        .map_err(|_| ChannelError::Transient("writing the .eml file timed out".into()))?
                        .map_err(|e| ChannelError::Transient(format!("writing the .eml file: {e}")))?;
                    let path = dir.join(format!("{id}.eml"));
                    tracing::info!(to, file = %path.display(), "email written to a file (email.transport = \"file\")");
                    return Ok(Sent {
                        event: Some(Event::ConsignmentNotification),
                        details: serde_json::json!({ "to": to, "message_id": message_id, "file": path.display().to_string() }),
                        provider_ref: Some(message_id),
                        segments: None,
                        document: None,
                    });
                }
            };
            match tokio::time::timeout(self.timeout, smtp.send(message)).await {
                Err(_) => Err(ChannelError::Transient(format!("SMTP send timed out after {:?}", self.timeout))),
                Ok(Err(e)) if e.is_permanent() => Err(ChannelError::Permanent(format!("SMTP refused: {e}"))),
                Ok(Err(e)) => Err(ChannelError::Transient(format!("SMTP: {e}"))),
                Ok(Ok(response)) => Ok(Sent {
                    event: Some(Event::ConsignmentNotification),
                    details: serde_json::json!({
                        "to": to,
                        "message_id": message_id,
                        "smtp_response": response.message().collect::<Vec<_>>().join(" "),
                    }),
                    provider_ref: Some(message_id),
                    segments: None,
                    document: None,
                }),
            }
        })
    }

    fn record<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        job: &'a Job,
        sent: &'a Sent,
    ) -> BoxFuture<'a, Result<bool, ChannelError>> {
        Box::pin(async move {
            let inserted = sqlx::query(
                "insert into email_message (attempt_id, item_id, message_id) values ($1, $2, $3) on conflict do nothing",
            )
            .bind(job.attempt_id)
            .bind(job.item.item_id)
            .bind(sent.provider_ref.as_deref().unwrap_or_default())
            .execute(&mut *conn)
            .await?
            .rows_affected();
            Ok(inserted == 1)
        })
    }
}
