//! SMS notices through an HTTP gateway: a JSON API with token auth, the provider's message id
//! in the answer, delivery reports posted back to us. The attempt id goes to the gateway as
//! `client_ref`, its idempotency key: a retried request never sends a second message.

use std::time::Duration;

use futures_util::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use tokio::sync::Mutex;
use tokio::time::Instant;
use uuid::Uuid;

use super::{Channel, ChannelError, Job, Sent};
use crate::config::Settings;
use crate::domain::Lane;
use crate::evidence::Event;

pub struct Sms {
    http: reqwest::Client,
    provider: String,
    url: String,
    token: SecretString,
    sender: String,
    callback_url: String,
    /// Spacing between sends, so the provider's rate is never exceeded.
    interval: Duration,
    /// When the next send may go. A send waits for its slot holding this lock, so slots are
    /// given one at a time, in the order sends queue for them (tokio's mutex is fair).
    pacer: Mutex<Instant>,
    /// Sends of the bulk lane queue here first, one at a time, so that at most one of them is
    /// ever queued for the pacer: a send of the standard lane waits for that one and the
    /// standard sends before it, never for a whole bulk batch (DESIGN invariant 5). The lanes
    /// share the provider's rate; the standard lane takes it first.
    bulk_turn: Mutex<()>,
}

/// What we send the gateway.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendRequest {
    pub to: String,
    pub from: String,
    pub text: String,
    pub client_ref: String,
    pub callback_url: String,
}

/// What the gateway answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendResponse {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub segments: Option<i32>,
}

impl Sms {
    pub fn new(settings: &Settings) -> anyhow::Result<Sms> {
        let s = &settings.sms;
        Ok(Sms {
            http: reqwest::Client::builder().timeout(Duration::from_millis(s.timeout_ms)).build()?,
            provider: s.provider.clone(),
            url: format!("{}/api/v1/messages", s.base_url.trim_end_matches('/')),
            token: s.token.clone(),
            sender: s.sender.clone(),
            callback_url: format!(
                "{}/v1/providers/sms/{}/reports",
                settings.public_url.trim_end_matches('/'),
                s.provider
            ),
            interval: Duration::from_secs_f64(1.0 / s.rate_per_second as f64),
            pacer: Mutex::new(Instant::now()),
            bulk_turn: Mutex::new(()),
        })
    }

    async fn wait_for_slot(&self, lane: Lane) {
        // The rate has room now and nobody is waiting for it (the lock is free): go, whatever
        // the lane. Only sends that must wait for a slot queue, in the order below.
        if let Ok(mut next) = self.pacer.try_lock() {
            let now = Instant::now();
            if *next <= now + Duration::from_millis(1) {
                *next = (*next).max(now) + self.interval;
                return;
            }
        }
        let _turn = match lane {
            Lane::Bulk => Some(self.bulk_turn.lock().await),
            Lane::Standard => None,
        };
        let mut next = self.pacer.lock().await;
        let now = Instant::now();
        let at = (*next).max(now);
        // The next slot counts from this one's time, not from when the timer woke: a timer
        // that fires late does not slow the rate. A slot less than the timer's millisecond
        // away is not slept for (a sleep would take a whole millisecond, and sends made one
        // after the other would be held to about a thousand a second).
        *next = at + self.interval;
        if at > now + Duration::from_millis(1) {
            tokio::time::sleep_until(at).await;
        }
    }
}

impl Channel for Sms {
    fn name(&self) -> &'static str {
        "sms"
    }

    fn send<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<Sent, ChannelError>> {
        Box::pin(async move {
            let notice = job
                .notice
                .clone()
                .ok_or_else(|| ChannelError::Permanent("no SMS notice was fixed at submission".into()))?;
            let (to, text, segments, encoding) = (notice.address, notice.text, notice.segments, notice.encoding);
            self.wait_for_slot(job.lane).await;
            let request = SendRequest {
                to: to.clone(),
                from: self.sender.clone(),
                text,
                client_ref: job.attempt_id.to_string(),
                callback_url: self.callback_url.clone(),
            };
            let response = self
                .http
                .post(&self.url)
                .bearer_auth(self.token.expose_secret())
                .json(&request)
                .send()
                .await
                .map_err(|e| ChannelError::Transient(format!("SMS gateway unreachable: {e}")))?;
            let status = response.status();
            if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
                return Err(ChannelError::Transient(format!("SMS gateway answered {status}")));
            }
            if !status.is_success() {
                let body = response.text().await.unwrap_or_default();
                return Err(ChannelError::Permanent(format!("SMS gateway refused the message ({status}): {body}")));
            }
            let accepted: SendResponse = response
                .json()
                .await
                .map_err(|e| ChannelError::Transient(format!("SMS gateway answer unreadable: {e}")))?;
            Ok(Sent {
                event: Some(Event::ConsignmentNotification),
                details: serde_json::json!({
                    "provider": self.provider,
                    "provider_message_id": accepted.id,
                    "to": to,
                    "segments": segments,
                    "encoding": encoding,
                }),
                provider_ref: Some(accepted.id),
                segments,
                document: None,
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
            let inserted = sqlx::query(
                "insert into sms_message (attempt_id, item_id, provider, provider_id, segments)
                 values ($1, $2, $3, $4, $5) on conflict do nothing",
            )
            .bind(job.attempt_id)
            .bind(job.item.item_id)
            .bind(&self.provider)
            .bind(sent.provider_ref.as_deref().unwrap_or_default())
            .bind(sent.segments.unwrap_or(0))
            .execute(&mut *conn)
            .await?
            .rows_affected();
            Ok(inserted == 1)
        })
    }

    fn record_many<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        jobs: &'a [(&'a Job, &'a Sent)],
    ) -> BoxFuture<'a, Result<Vec<bool>, ChannelError>> {
        Box::pin(async move {
            let attempts: Vec<Uuid> = jobs.iter().map(|(j, _)| j.attempt_id).collect();
            let items: Vec<Uuid> = jobs.iter().map(|(j, _)| j.item.item_id).collect();
            let refs: Vec<&str> = jobs.iter().map(|(_, s)| s.provider_ref.as_deref().unwrap_or_default()).collect();
            let segments: Vec<i32> = jobs.iter().map(|(_, s)| s.segments.unwrap_or(0)).collect();
            let inserted: Vec<Uuid> = sqlx::query_scalar(
                "insert into sms_message (attempt_id, item_id, provider, provider_id, segments)
                 select a, i, $3, p, s from unnest($1::uuid[], $2::uuid[], $4::text[], $5::int[]) as x(a, i, p, s)
                 on conflict do nothing returning attempt_id",
            )
            .bind(&attempts)
            .bind(&items)
            .bind(&self.provider)
            .bind(&refs)
            .bind(&segments)
            .fetch_all(&mut *conn)
            .await?;
            Ok(attempts.iter().map(|a| inserted.contains(a)).collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sends_are_spaced_to_the_providers_rate() {
        let mut settings = Settings::from_sources(include_str!("../../config/default.toml"), Vec::new()).unwrap();
        settings.sms.rate_per_second = 20;
        let sms = Sms::new(&settings).unwrap();
        let started = Instant::now();
        for lane in [Lane::Standard, Lane::Bulk].into_iter().cycle().take(11) {
            sms.wait_for_slot(lane).await;
        }
        // Eleven sends at 20/s: the last may go no earlier than 500 ms after the first.
        assert!(started.elapsed() >= Duration::from_millis(495), "{:?}", started.elapsed());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_standard_send_goes_ahead_of_a_bulk_batch_waiting_for_the_rate() {
        let mut settings = Settings::from_sources(include_str!("../../config/default.toml"), Vec::new()).unwrap();
        settings.sms.rate_per_second = 20;
        let sms = std::sync::Arc::new(Sms::new(&settings).unwrap());
        let started = Instant::now();
        // Twenty bulk sends queue at once: 950 ms of slots at 20/s.
        let bulk: Vec<_> = (0..20)
            .map(|_| {
                let sms = sms.clone();
                tokio::spawn(async move {
                    sms.wait_for_slot(Lane::Bulk).await;
                    started.elapsed()
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        sms.wait_for_slot(Lane::Standard).await;
        let standard = started.elapsed();
        let mut bulk_times = Vec::new();
        for b in bulk {
            bulk_times.push(b.await.unwrap());
        }
        // It waits for the slot being waited for and the one bulk send queued behind it (two
        // slots, 100 ms), not for the twenty; and the rate still holds for all 21.
        assert!(standard < Duration::from_millis(300), "the standard send waited {standard:?}");
        let ahead = bulk_times.iter().filter(|t| **t < standard).count();
        assert!(ahead <= 3, "{ahead} bulk sends went first");
        let last = bulk_times.iter().max().unwrap();
        assert!(*last >= Duration::from_millis(995), "21 sends at 20/s took {last:?}");
    }
}
