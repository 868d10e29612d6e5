//! Group commit of submissions.
//!
//! Every accepted item is committed before its `202`, with its idempotency claim, attachments,
//! notices, steps, timers, attempts, outbox rows, SubmissionAcceptance record and callbacks.
//! Written one transaction per request, each item paid for its own statement start-up, plan,
//! round trip and commit, and those, not the rows, were most of PostgreSQL's work.
//!
//! So submissions that arrive together are written together ([`crate::group`]): one statement,
//! one transaction, for up to `api.group_items` items.
//!
//! Each item is claimed by its own key: an item whose key another request holds is not
//! written, and that request answers as a replay. If the shared statement fails, each item is
//! written again alone, so one item's fault is its own request's error and no other's.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::correspondence::{AttachmentDigest, Notice};
use crate::db::Kept;
use crate::domain::Lane;
use crate::evidence::{self, Appended, ItemContext, NewEvidence};
use crate::group::{self, Group, Limits, Pending};
use crate::queue::{Envelope, DELIVERY_EXCHANGE};

/// An item ready to be written: everything a submission decided before the database.
pub struct Row {
    pub key: String,
    pub request_sha256: String,
    pub item: ItemContext,
    pub recipient_id: Uuid,
    pub template: String,
    pub language: &'static str,
    pub personalisation: Value,
    pub subject: String,
    pub content_html: String,
    pub content_sha256: String,
    pub respond_by: Option<DateTime<Utc>>,
    pub digital_consent: bool,
    /// The deemed-delivery period, as PostgreSQL interval text.
    pub deemed_after: Option<String>,
    pub deemed_rule: Option<Value>,
    pub respond_by_warning: Option<String>,
    /// Which delivery queues its attempts travel in.
    pub lane: Lane,
    pub attachments: Vec<(AttachmentDigest, Vec<u8>)>,
    pub notices: Vec<Notice>,
    pub steps: Vec<Step>,
    pub attempts: Vec<Attempt>,
    pub acceptance: NewEvidence,
}

/// A step of the item's policy.
pub struct Step {
    pub id: Uuid,
    pub seq: i32,
    pub channel: String,
    /// When a timed step is due; `None` starts it now.
    pub due_at: Option<DateTime<Utc>>,
    pub unless: Option<&'static str>,
}

/// The first attempt of a step that starts now, and the message that makes a worker take it.
pub struct Attempt {
    pub id: Uuid,
    pub step_id: Uuid,
    pub channel: String,
    pub envelope: Envelope,
}

/// What writing a row came to: its SubmissionAcceptance record, or `None` when its key was
/// already claimed (by a finished request or one in flight).
pub type Outcome = sqlx::Result<Option<Appended>>;

impl crate::group::Job for Row {
    fn weight(&self) -> usize {
        self.content_html.len()
            + self.attachments.iter().map(|(_, data)| data.len()).sum::<usize>()
            + self
                .notices
                .iter()
                .map(|n| n.fixed.text.len() + n.fixed.html.as_ref().map_or(0, String::len))
                .sum::<usize>()
    }

    /// The same key twice is for the claim to decide, one statement after the other.
    fn conflicts(&self, other: &Self) -> bool {
        self.key == other.key && self.item.agency_id == other.item.agency_id
    }
}

/// The handle requests write through; cheap to clone.
#[derive(Clone)]
pub struct Intake(Group<Row, Outcome>);

impl Intake {
    /// Starts the intake's task on the current runtime. It ends when the last handle is dropped.
    pub fn start(pool: PgPool, limits: Limits) -> Intake {
        let conns = Kept::new(pool, limits.concurrency);
        Intake(Group::start(limits, move |batch| write_batch(conns.clone(), batch)))
    }

    /// Writes one item, with whatever else is waiting, and returns when it is committed.
    pub async fn write(&self, row: Row) -> Outcome {
        self.0.run(row).await.unwrap_or(Err(sqlx::Error::PoolClosed))
    }
}

async fn write_batch(conns: Kept, mut batch: Vec<Pending<Row, Outcome>>) {
    // Claims in one order, so two batches that share keys wait for each other, not deadlock.
    batch.sort_by(|a, b| (a.job.item.agency_id, &a.job.key).cmp(&(b.job.item.agency_id, &b.job.key)));
    group::together_or_alone(&conns, batch, "submissions", |conns, rows| Box::pin(write(conns, rows))).await
}

/// Writes rows in one statement; for each, its acceptance record if its key was claimed.
async fn write(conns: &Kept, rows: &[&Row]) -> sqlx::Result<Vec<Option<Appended>>> {
    let batch: Vec<(&ItemContext, Vec<NewEvidence>)> =
        rows.iter().map(|r| (&r.item, vec![r.acceptance.clone()])).collect();
    let mut evidence = evidence::prepare(&batch);
    let cols = Columns::of(rows);
    let q = sqlx::query(&SUBMIT_SQL)
        .bind(&cols.item_ids)
        .bind(&cols.agency_ids)
        .bind(&cols.keys)
        .bind(&cols.request_sha256)
        .bind(&cols.recipient_ids)
        .bind(&cols.kinds)
        .bind(&cols.templates)
        .bind(&cols.languages)
        .bind(&cols.references)
        .bind(&cols.personalisation)
        .bind(&cols.subjects)
        .bind(&cols.content_html)
        .bind(&cols.content_sha256)
        .bind(&cols.respond_by)
        .bind(&cols.policy_ids)
        .bind(&cols.policy_versions)
        .bind(&cols.digital_consent)
        .bind(&cols.deemed_after)
        .bind(&cols.deemed_rule)
        .bind(&cols.respond_by_warning)
        .bind(&cols.att_item)
        .bind(&cols.att_n)
        .bind(&cols.att_name)
        .bind(&cols.att_type)
        .bind(&cols.att_size)
        .bind(&cols.att_sha256)
        .bind(&cols.att_data)
        .bind(&cols.nt_item)
        .bind(&cols.nt_channel)
        .bind(&cols.nt_address)
        .bind(&cols.nt_subject)
        .bind(&cols.nt_text)
        .bind(&cols.nt_html)
        .bind(&cols.nt_encoding)
        .bind(&cols.nt_segments)
        .bind(&cols.st_id)
        .bind(&cols.st_item)
        .bind(&cols.st_seq)
        .bind(&cols.st_channel)
        .bind(&cols.st_due)
        .bind(&cols.st_unless)
        .bind(&cols.at_id)
        .bind(&cols.at_step)
        .bind(&cols.at_item)
        .bind(&cols.at_channel)
        .bind(&cols.at_envelope)
        .bind(DELIVERY_EXCHANGE)
        .bind(&cols.lanes)
        .bind(&cols.at_route);
    let mut conn = conns.acquire().await?;
    let claimed: Vec<Uuid> =
        evidence.bind(q).fetch_all(&mut *conn).await?.iter().map(|r| sqlx::Row::get(r, 0)).collect();
    conn.keep();
    let appended = std::mem::take(&mut evidence.appended);
    Ok(rows.iter().zip(appended).map(|(row, a)| claimed.contains(&row.item.item_id).then_some(a)).collect())
}

/// The rows of a batch as the arrays its statement binds, a column each.
#[derive(Default)]
struct Columns<'a> {
    item_ids: Vec<Uuid>,
    agency_ids: Vec<Uuid>,
    keys: Vec<&'a str>,
    request_sha256: Vec<&'a str>,
    recipient_ids: Vec<Uuid>,
    kinds: Vec<&'a str>,
    templates: Vec<&'a str>,
    languages: Vec<&'a str>,
    references: Vec<&'a str>,
    personalisation: Vec<sqlx::types::Json<&'a Value>>,
    subjects: Vec<&'a str>,
    content_html: Vec<&'a str>,
    content_sha256: Vec<&'a str>,
    respond_by: Vec<Option<DateTime<Utc>>>,
    policy_ids: Vec<&'a str>,
    policy_versions: Vec<i32>,
    digital_consent: Vec<bool>,
    deemed_after: Vec<Option<&'a str>>,
    deemed_rule: Vec<Option<sqlx::types::Json<&'a Value>>>,
    respond_by_warning: Vec<Option<&'a str>>,
    lanes: Vec<&'static str>,
    att_item: Vec<Uuid>,
    att_n: Vec<i32>,
    att_name: Vec<&'a str>,
    att_type: Vec<&'a str>,
    att_size: Vec<i32>,
    att_sha256: Vec<&'a str>,
    att_data: Vec<&'a [u8]>,
    nt_item: Vec<Uuid>,
    nt_channel: Vec<&'a str>,
    nt_address: Vec<&'a str>,
    nt_subject: Vec<Option<&'a str>>,
    nt_text: Vec<&'a str>,
    nt_html: Vec<Option<&'a str>>,
    nt_encoding: Vec<Option<&'a str>>,
    nt_segments: Vec<Option<i32>>,
    st_id: Vec<Uuid>,
    st_item: Vec<Uuid>,
    st_seq: Vec<i32>,
    st_channel: Vec<&'a str>,
    st_due: Vec<Option<DateTime<Utc>>>,
    st_unless: Vec<Option<&'a str>>,
    at_id: Vec<Uuid>,
    at_step: Vec<Uuid>,
    at_item: Vec<Uuid>,
    at_channel: Vec<&'a str>,
    at_envelope: Vec<sqlx::types::Json<&'a Envelope>>,
    at_route: Vec<String>,
}

impl<'a> Columns<'a> {
    fn of(rows: &[&'a Row]) -> Columns<'a> {
        let mut c = Columns::default();
        for r in rows {
            let id = r.item.item_id;
            c.item_ids.push(id);
            c.agency_ids.push(r.item.agency_id);
            c.keys.push(&r.key);
            c.request_sha256.push(&r.request_sha256);
            c.recipient_ids.push(r.recipient_id);
            c.kinds.push(&r.item.kind);
            c.templates.push(&r.template);
            c.languages.push(r.language);
            c.references.push(&r.item.reference);
            c.personalisation.push(sqlx::types::Json(&r.personalisation));
            c.subjects.push(&r.subject);
            c.content_html.push(&r.content_html);
            c.content_sha256.push(&r.content_sha256);
            c.respond_by.push(r.respond_by);
            c.policy_ids.push(&r.item.policy_id);
            c.policy_versions.push(r.item.policy_version);
            c.digital_consent.push(r.digital_consent);
            c.deemed_after.push(r.deemed_after.as_deref());
            c.deemed_rule.push(r.deemed_rule.as_ref().map(sqlx::types::Json));
            c.respond_by_warning.push(r.respond_by_warning.as_deref());
            c.lanes.push(r.lane.as_str());
            for (d, data) in &r.attachments {
                c.att_item.push(id);
                c.att_n.push(d.n);
                c.att_name.push(&d.name);
                c.att_type.push(&d.content_type);
                c.att_size.push(d.size);
                c.att_sha256.push(&d.sha256);
                c.att_data.push(data);
            }
            for n in &r.notices {
                c.nt_item.push(id);
                c.nt_channel.push(n.channel);
                c.nt_address.push(&n.fixed.address);
                c.nt_subject.push(n.fixed.subject.as_deref());
                c.nt_text.push(&n.fixed.text);
                c.nt_html.push(n.fixed.html.as_deref());
                c.nt_encoding.push(n.fixed.encoding.as_deref());
                c.nt_segments.push(n.fixed.segments);
            }
            for s in &r.steps {
                c.st_id.push(s.id);
                c.st_item.push(id);
                c.st_seq.push(s.seq);
                c.st_channel.push(&s.channel);
                c.st_due.push(s.due_at);
                c.st_unless.push(s.unless);
            }
            for a in &r.attempts {
                c.at_id.push(a.id);
                c.at_step.push(a.step_id);
                c.at_item.push(id);
                c.at_channel.push(&a.channel);
                c.at_envelope.push(sqlx::types::Json(&a.envelope));
                c.at_route.push(r.lane.routing_key(&a.channel));
            }
        }
        c
    }
}

/// Submissions in one statement: the keys' claims, then, for each item whose key it claimed,
/// the item and what it needs, and (after these 49 parameters) its evidence and callbacks.
/// When a concurrent request with the same key committed first (the claim waited on its row
/// lock), or the same key came twice in this batch, the claim returns nothing for that item,
/// and so does every insert that reads from it.
static SUBMIT_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "with claim as (
            insert into idempotency (agency_id, key, request_sha256, item_id)
            select * from unnest($2::uuid[], $3::text[], $4::text[], $1::uuid[])
            on conflict do nothing returning item_id
         ), it as (
            insert into item (id, agency_id, recipient_id, kind, template, language, reference, personalisation,
                              subject, content_html, content_sha256, respond_by, policy_id, policy_version, status,
                              digital_consent, deemed_after, deemed_rule, respond_by_warning, lane)
            select x.id, x.agency_id, x.recipient_id, x.kind, x.template, x.language, x.reference, x.personalisation,
                   x.subject, x.html, x.sha, x.respond_by, x.policy_id, x.policy_version, 'accepted', x.consent,
                   x.deemed_after::interval, x.deemed_rule, x.warning, x.lane
            from unnest($1::uuid[], $2::uuid[], $5::uuid[], $6::text[], $7::text[], $8::text[], $9::text[],
                        $10::jsonb[], $11::text[], $12::text[], $13::text[], $14::timestamptz[], $15::text[],
                        $16::int[], $17::bool[], $18::text[], $19::jsonb[], $20::text[], $48::text[])
                 as x(id, agency_id, recipient_id, kind, template, language, reference, personalisation, subject,
                      html, sha, respond_by, policy_id, policy_version, consent, deemed_after, deemed_rule, warning,
                      lane)
            where x.id in (select item_id from claim)
            returning id
         ), att as (
            insert into attachment (item_id, n, name, content_type, size, sha256, data)
            select * from unnest($21::uuid[], $22::int[], $23::text[], $24::text[], $25::int[], $26::text[],
                                 $27::bytea[]) as x(item_id)
            where x.item_id in (select id from it)
         ), nt as (
            insert into notice (item_id, channel, address, subject, body_text, body_html, encoding, segments)
            select * from unnest($28::uuid[], $29::text[], $30::text[], $31::text[], $32::text[], $33::text[],
                                 $34::text[], $35::int[]) as x(item_id)
            where x.item_id in (select id from it)
         ), st as (
            insert into step (id, item_id, seq, channel, status, due_at, unless_condition)
            select x.id, x.item_id, x.seq, x.channel, case when x.due_at is null then 'queued' else 'scheduled' end,
                   x.due_at, x.u
            from unnest($36::uuid[], $37::uuid[], $38::int[], $39::text[], $40::timestamptz[], $41::text[])
                 as x(id, item_id, seq, channel, due_at, u)
            where x.item_id in (select id from it)
            returning id, item_id, due_at
         ), tm as (
            insert into timer (id, kind, item_id, step_id, due_at)
            select gen_random_uuid(), 'escalate', item_id, id, due_at from st where due_at is not null
         ), att2 as (
            insert into attempt (id, step_id, item_id, channel, status)
            select x.id, x.step_id, x.item_id, x.channel, 'queued'
            from unnest($42::uuid[], $43::uuid[], $44::uuid[], $45::text[]) as x(id, step_id, item_id, channel)
            where x.item_id in (select id from it)
         ), ob as (
            insert into outbox (exchange, routing_key, message_id, payload)
            select $47, x.route, x.id, x.payload
            from unnest($42::uuid[], $44::uuid[], $49::text[], $46::jsonb[]) as x(id, item_id, route, payload)
            where x.item_id in (select id from it)
         ), {}
         select item_id from claim",
        evidence::ctes(49, "x.item_id in (select it.id from it)")
    )
});
