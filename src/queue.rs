//! RabbitMQ: the topology (`queues/topology.toml`), connections, and the message envelope.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::Lane;

/// What Dalil queues: "do this attempt", "make this callback". It carries ids, never content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Envelope {
    Deliver { version: u32, item_id: Uuid, step_id: Uuid, attempt_id: Uuid, trace_id: Uuid },
    Callback { version: u32, delivery_id: Uuid },
}

/// The routing key (and queue channel) of agency callbacks.
pub const CALLBACKS: &str = "webhooks";

#[derive(Debug, Clone, Deserialize)]
pub struct Topology {
    #[serde(rename = "exchange")]
    pub exchanges: Vec<ExchangeSpec>,
    #[serde(rename = "queue")]
    pub queues: Vec<QueueSpec>,
    /// Applied to every name.
    #[serde(skip)]
    pub prefix: String,
    /// Tests only: queues delete themselves when unused this long.
    #[serde(skip)]
    pub expires_ms: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ExchangeSpec {
    pub name: String,
    pub kind: String,
    pub why: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct QueueSpec {
    pub name: String,
    /// The delivery channel this queue feeds, for delivery queues.
    pub channel: Option<String>,
    /// The lane of a delivery queue; none is the standard lane.
    #[serde(default)]
    pub lane: Option<Lane>,
    /// The delay, for retry queues.
    pub retry_delay_ms: Option<u64>,
    pub bindings: Vec<Binding>,
    pub arguments: BTreeMap<String, toml::Value>,
    pub why: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Binding {
    pub exchange: String,
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

pub const DELIVERY_EXCHANGE: &str = "dalil.delivery";
pub const RETRY_EXCHANGE: &str = "dalil.retry";
/// The header that routes a retry to its delay queue. Not `x-`: RabbitMQ's headers exchange
/// ignores `x-` keys when it matches (`x-match = all`), so a binding on `x-retry-queue`, as
/// before, matched every message, and each retry went to all four delay queues at once.
pub const RETRY_HEADER: &str = "dalil-retry-queue";
/// The header of those earlier bindings, which `declare` removes.
const LEGACY_RETRY_HEADER: &str = "x-retry-queue";

impl Topology {
    pub fn load(path: &Path, prefix: &str, expires_ms: Option<u32>) -> anyhow::Result<Topology> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut t: Topology = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        t.prefix = prefix.to_string();
        t.expires_ms = expires_ms;
        for q in &t.queues {
            if let Some(k) = q.bindings.iter().flat_map(|b| b.headers.keys()).find(|k| k.starts_with("x-")) {
                anyhow::bail!(
                    "{}: queue {}: binding header {k}: RabbitMQ ignores x- keys when it matches headers, so the \
                     binding would match every message; name it without x-",
                    path.display(),
                    q.name
                );
            }
        }
        for q in &t.queues {
            for b in &q.bindings {
                anyhow::ensure!(
                    t.exchanges.iter().any(|e| e.name == b.exchange),
                    "queue {} binds to undeclared exchange {}",
                    q.name,
                    b.exchange
                );
            }
        }
        anyhow::ensure!(t.exchanges.iter().any(|e| e.name == DELIVERY_EXCHANGE), "no {DELIVERY_EXCHANGE} exchange");
        Ok(t)
    }

    pub fn name(&self, raw: &str) -> String {
        format!("{}{raw}", self.prefix)
    }

    /// The queues that feed a channel, one per lane, the standard lane first.
    pub fn channel_queues(&self, channel: &str) -> Vec<(String, Lane)> {
        let mut queues: Vec<(String, Lane)> = self
            .queues
            .iter()
            .filter(|q| q.channel.as_deref() == Some(channel))
            .map(|q| (self.name(&q.name), q.lane.unwrap_or_default()))
            .collect();
        queues.sort_by_key(|(_, lane)| *lane != Lane::Standard);
        queues
    }

    /// Retry queues, shortest delay first: (unprefixed name, delay).
    pub fn retry_ladder(&self) -> Vec<(String, u64)> {
        let mut ladder: Vec<(String, u64)> =
            self.queues.iter().filter_map(|q| q.retry_delay_ms.map(|d| (q.name.clone(), d))).collect();
        ladder.sort_by_key(|(_, d)| *d);
        ladder
    }

    fn queue_arguments(&self, q: &QueueSpec) -> FieldTable {
        let mut table = FieldTable::default();
        for (k, v) in &q.arguments {
            let value = match v {
                toml::Value::Integer(i) => AMQPValue::LongLongInt(*i),
                toml::Value::Boolean(b) => AMQPValue::Boolean(*b),
                toml::Value::String(s) if k == "x-dead-letter-exchange" => {
                    AMQPValue::LongString(LongString::from(self.name(s)))
                }
                other => AMQPValue::LongString(LongString::from(other.as_str().unwrap_or_default().to_string())),
            };
            table.insert(ShortString::from(k.as_str()), value);
        }
        if let Some(ms) = self.expires_ms {
            table.insert(ShortString::from("x-expires"), AMQPValue::LongLongInt(ms as i64));
        }
        table
    }

    /// Declares every exchange, queue and binding. Safe to repeat; a queue declared earlier with
    /// other arguments makes RabbitMQ refuse, which is reported.
    pub async fn declare(&self, ch: &Channel) -> anyhow::Result<()> {
        for e in &self.exchanges {
            ch.exchange_declare(
                ShortString::from(self.name(&e.name)),
                exchange_kind(&e.kind)?,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("declaring exchange {}", self.name(&e.name)))?;
        }
        for q in &self.queues {
            let name = self.name(&q.name);
            ch.queue_declare(
                ShortString::from(name.clone()),
                QueueDeclareOptions { durable: true, ..Default::default() },
                self.queue_arguments(q),
            )
            .await
            .with_context(|| {
                format!("declaring queue {name} (if it exists with other arguments, delete it or migrate it)")
            })?;
            for b in &q.bindings {
                let mut args = FieldTable::default();
                if !b.headers.is_empty() {
                    args.insert(ShortString::from("x-match"), AMQPValue::LongString(LongString::from("all")));
                    for (k, v) in &b.headers {
                        args.insert(ShortString::from(k.as_str()), AMQPValue::LongString(LongString::from(v.as_str())));
                    }
                }
                if let Some(v) = b.headers.get(RETRY_HEADER) {
                    // A deployment declared before the header was renamed has a binding that
                    // matches everything: without removing it, every retry is still copied to
                    // this queue. Removing a binding that does not exist changes nothing.
                    let mut legacy = FieldTable::default();
                    legacy.insert(ShortString::from("x-match"), AMQPValue::LongString(LongString::from("all")));
                    legacy.insert(
                        ShortString::from(LEGACY_RETRY_HEADER),
                        AMQPValue::LongString(LongString::from(v.as_str())),
                    );
                    ch.queue_unbind(
                        ShortString::from(name.clone()),
                        ShortString::from(self.name(&b.exchange)),
                        ShortString::from(b.key.as_str()),
                        legacy,
                    )
                    .await
                    .with_context(|| format!("removing the old retry binding of {name}"))?;
                }
                ch.queue_bind(
                    ShortString::from(name.clone()),
                    ShortString::from(self.name(&b.exchange)),
                    ShortString::from(b.key.as_str()),
                    QueueBindOptions::default(),
                    args,
                )
                .await
                .with_context(|| format!("binding {name} to {}", b.exchange))?;
            }
        }
        Ok(())
    }

    /// Checks that every exchange and queue exists (passive declares), so a role started before
    /// `dalil topology` says so plainly instead of publishing into nothing.
    pub async fn check(&self, conn: &Connection) -> anyhow::Result<()> {
        for e in &self.exchanges {
            let ch = conn.create_channel().await?;
            ch.exchange_declare(
                ShortString::from(self.name(&e.name)),
                exchange_kind(&e.kind)?,
                ExchangeDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("exchange {} is missing: run `dalil topology`", self.name(&e.name)))?;
            let _ = ch.close(200, ShortString::from("ok")).await;
        }
        for q in &self.queues {
            let ch = conn.create_channel().await?;
            ch.queue_declare(
                ShortString::from(self.name(&q.name)),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("queue {} is missing: run `dalil topology`", self.name(&q.name)))?;
            let _ = ch.close(200, ShortString::from("ok")).await;
        }
        Ok(())
    }

    /// Deletes every queue and exchange (tests clean up after themselves with this).
    pub async fn delete(&self, ch: &Channel) -> anyhow::Result<()> {
        for q in &self.queues {
            ch.queue_delete(ShortString::from(self.name(&q.name)), QueueDeleteOptions::default()).await?;
        }
        for e in &self.exchanges {
            ch.exchange_delete(ShortString::from(self.name(&e.name)), Default::default()).await?;
        }
        Ok(())
    }
}

fn exchange_kind(kind: &str) -> anyhow::Result<ExchangeKind> {
    Ok(match kind {
        "topic" => ExchangeKind::Topic,
        "headers" => ExchangeKind::Headers,
        "fanout" => ExchangeKind::Fanout,
        "direct" => ExchangeKind::Direct,
        other => anyhow::bail!("unknown exchange kind {other:?}"),
    })
}

/// How long opening a connection may take. lapin's handshake can wait for ever when the
/// connection breaks half-way (amqp-rs/lapin#470); a role must give up and try again instead.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub async fn connect(url: &str, name: &str) -> anyhow::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(LongString::from(name));
    let redacted = crate::config::redact(url);
    tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, props))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to RabbitMQ at {redacted}: no answer within {CONNECT_TIMEOUT:?}"))?
        .with_context(|| format!("connecting to RabbitMQ at {redacted}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_topology_is_consistent() {
        let t = Topology::load(Path::new("queues/topology.toml"), "p.", None).unwrap();
        for channel in crate::channels::KNOWN_CHANNELS {
            // One queue per lane, each bound with the key that lane's work is published with.
            let queues = t.channel_queues(channel);
            let lanes: Vec<Lane> = queues.iter().map(|(_, lane)| *lane).collect();
            assert_eq!(lanes, vec![Lane::Standard, Lane::Bulk], "{channel}");
            for (name, lane) in queues {
                let spec = t.queues.iter().find(|q| t.name(&q.name) == name).unwrap();
                let keys: Vec<&str> = spec.bindings.iter().map(|b| b.key.as_str()).collect();
                assert_eq!(keys, vec![lane.routing_key(channel).as_str()], "{name}");
                assert_eq!(spec.arguments, t.queues.iter().find(|q| q.name == "delivery.inbox").unwrap().arguments);
            }
        }
        assert_eq!(t.channel_queues("inbox")[0].0, "p.delivery.inbox");
        assert_eq!(t.channel_queues("webhooks"), vec![("p.webhooks".to_string(), Lane::Standard)]);
        let ladder: Vec<u64> = t.retry_ladder().into_iter().map(|(_, d)| d).collect();
        assert_eq!(ladder, vec![5_000, 30_000, 300_000, 3_600_000]);
        for q in t.queues.iter().filter(|q| q.channel.is_some()) {
            assert!(q.arguments.contains_key("x-delivery-limit"), "{} needs a delivery limit", q.name);
            assert!(q.arguments.contains_key("x-dead-letter-exchange"), "{} needs dead-lettering", q.name);
        }
    }

    #[test]
    fn envelopes_are_tagged_and_versioned() {
        let e = Envelope::Deliver {
            version: 1,
            item_id: Uuid::nil(),
            step_id: Uuid::nil(),
            attempt_id: Uuid::nil(),
            trace_id: Uuid::nil(),
        };
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["type"], "deliver");
        assert_eq!(json["version"], 1);
    }
}
