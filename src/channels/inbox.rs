//! The portal inbox: the deposit is a row, and the unique item id makes a second deposit of
//! the same item impossible whatever the broker redelivers.

use futures_util::future::BoxFuture;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{Channel, ChannelError, Job, Sent};
use crate::evidence::Event;

pub struct Inbox;

impl Channel for Inbox {
    fn name(&self) -> &'static str {
        "inbox"
    }

    fn send<'a>(&'a self, _job: &'a Job) -> BoxFuture<'a, Result<Sent, ChannelError>> {
        Box::pin(async { Ok(Sent::event(Event::ContentConsignment, serde_json::json!({ "mailbox": "portal" }))) })
    }

    fn record<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        job: &'a Job,
        _sent: &'a Sent,
    ) -> BoxFuture<'a, Result<bool, ChannelError>> {
        Box::pin(async move {
            let inserted = sqlx::query(
                "insert into inbox_entry (item_id, recipient_id, attempt_id, deposited_at)
                 values ($1, $2, $3, now()) on conflict (item_id) do nothing",
            )
            .bind(job.item.item_id)
            .bind(job.recipient_id)
            .bind(job.attempt_id)
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
            let items: Vec<Uuid> = jobs.iter().map(|(j, _)| j.item.item_id).collect();
            let recipients: Vec<Uuid> = jobs.iter().map(|(j, _)| j.recipient_id).collect();
            let attempts: Vec<Uuid> = jobs.iter().map(|(j, _)| j.attempt_id).collect();
            let deposited: Vec<Uuid> = sqlx::query_scalar(
                "insert into inbox_entry (item_id, recipient_id, attempt_id, deposited_at)
                 select i, r, a, now() from unnest($1::uuid[], $2::uuid[], $3::uuid[]) as x(i, r, a)
                 on conflict (item_id) do nothing returning attempt_id",
            )
            .bind(&items)
            .bind(&recipients)
            .bind(&attempts)
            .fetch_all(&mut *conn)
            .await?;
            Ok(attempts.iter().map(|a| deposited.contains(a)).collect())
        })
    }

    fn failure_event(&self) -> Event {
        Event::ContentConsignmentFailure
    }
}
