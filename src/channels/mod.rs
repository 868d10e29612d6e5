//! Delivery channels, behind one trait. A channel's errors say whether trying again can help
//! (`Transient`) or not (`Permanent`); the worker decides retry or failure from that alone.

use futures_util::future::BoxFuture;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::config::Settings;
use crate::domain::Lane;
use crate::evidence::{Event, ItemContext};

pub mod email;
pub mod inbox;
pub mod postal;
pub mod sms;

/// Channels a policy may name.
pub const KNOWN_CHANNELS: &[&str] = &["inbox", "sms", "email", "postal"];

/// One attempt to deliver, as the worker loaded it.
#[derive(Debug, Clone)]
pub struct Job {
    pub attempt_id: Uuid,
    pub step_id: Uuid,
    pub recipient_id: Uuid,
    pub item: ItemContext,
    /// The item's lane: a provider's rate is given to the standard lane first.
    pub lane: Lane,
    /// The notice fixed at submission for this channel (SMS and email), loaded with the job.
    pub notice: Option<Notice>,
}

/// A notice as submission fixed it: where it goes and what it says.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Notice {
    pub address: String,
    pub subject: Option<String>,
    pub text: String,
    pub html: Option<String>,
    pub encoding: Option<String>,
    pub segments: Option<i32>,
}

/// What a channel did, to be recorded as evidence (when there is an event to record: a letter
/// made ready for the postal operator is recorded only when the operator takes it).
#[derive(Debug, Clone)]
pub struct Sent {
    pub event: Option<Event>,
    pub details: Value,
    /// The provider's id for what it accepted (SMS message id, email Message-ID).
    pub provider_ref: Option<String>,
    pub segments: Option<i32>,
    /// A document the channel produced for the record (the letter's PDF).
    pub document: Option<Vec<u8>>,
}

impl Sent {
    pub fn event(event: Event, details: Value) -> Sent {
        Sent { event: Some(event), details, provider_ref: None, segments: None, document: None }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ChannelError {
    #[error("transient: {0}")]
    Transient(String),
    #[error("permanent: {0}")]
    Permanent(String),
}

impl From<sqlx::Error> for ChannelError {
    fn from(e: sqlx::Error) -> Self {
        ChannelError::Transient(format!("database: {e}"))
    }
}

pub trait Channel: Send + Sync {
    fn name(&self) -> &'static str;

    /// Does the channel's work outside any transaction (a provider call), when it has any.
    fn send<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<Sent, ChannelError>>;

    /// Records the effect in the worker's transaction, idempotently: `Ok(false)` when this
    /// attempt's effect was recorded before (a redelivered message), so no second evidence.
    fn record<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        job: &'a Job,
        sent: &'a Sent,
    ) -> BoxFuture<'a, Result<bool, ChannelError>>;

    /// Records several sent jobs in the caller's transaction; one `fresh` flag per job, in
    /// order. Channels whose record is a single insert do it in one statement.
    fn record_many<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        jobs: &'a [(&'a Job, &'a Sent)],
    ) -> BoxFuture<'a, Result<Vec<bool>, ChannelError>> {
        Box::pin(async move {
            let mut fresh = Vec::with_capacity(jobs.len());
            for (job, sent) in jobs {
                fresh.push(self.record(&mut *conn, job, sent).await?);
            }
            Ok(fresh)
        })
    }

    /// The event that records this channel's permanent failure.
    fn failure_event(&self) -> Event {
        Event::ConsignmentNotificationFailure
    }
}

/// The channel of that name, wired to its provider.
pub fn build(name: &str, settings: &Settings, pool: &PgPool) -> anyhow::Result<Box<dyn Channel>> {
    Ok(match name {
        "inbox" => Box::new(inbox::Inbox),
        "sms" => Box::new(sms::Sms::new(settings)?),
        "email" => Box::new(email::Email::new(settings)?),
        "postal" => Box::new(postal::Postal::new(settings, pool.clone())),
        other => anyhow::bail!("unknown channel {other:?}; known: {}", KNOWN_CHANNELS.join(", ")),
    })
}
