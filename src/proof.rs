//! Proof bundles: one self-contained JSON document that proves, with the log's public key
//! alone and offline, what happened to an item. Format `dalil-proof-bundle/1`, described in
//! `docs/proof-bundle.md`.

use anyhow::Context as _;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chrono::{DateTime, FixedOffset, Utc};
use ed25519_dalek::{Signature, Signer as _};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::log::{self, PublishedKey, Signer};
use crate::merkle::{self, Hash};
use crate::note::{self, VerifierKey};

pub const FORMAT: &str = "dalil-proof-bundle/1";

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Bundle {
    pub format: String,
    pub item: ItemSummary,
    /// Every evidence record of the item, in log order.
    pub records: Vec<BundleRecord>,
    /// The signed note (C2SP checkpoint) every inclusion proof leads to.
    pub checkpoint: String,
    /// The log's public keys with their validity.
    pub keys: Vec<PublishedKey>,
    /// The platform's signature over the rest of the bundle: no record was added or left out.
    pub signature: BundleSignature,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ItemSummary {
    pub id: Uuid,
    pub kind: String,
    pub reference: String,
    pub subject: String,
    pub sender: Party,
    #[schema(value_type = Object)]
    pub recipient: Value,
    pub submitted_at: DateTime<Utc>,
    /// SHA-256 of the content as rendered at submission.
    pub content_sha256: String,
    #[schema(value_type = Vec<Object>)]
    pub attachments: Vec<Value>,
    pub served: Option<ServedSummary>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Party {
    pub agency: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ServedSummary {
    pub at: DateTime<Utc>,
    pub rule: String,
    /// The log index of the record that served the item.
    pub log_index: i64,
    /// The same record's `evidence_id` (bundles made before records v2 do not carry it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence_id: Option<Uuid>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BundleRecord {
    pub log_index: u64,
    /// The record's exact canonical JSON (RFC 8785); its UTF-8 bytes are the Merkle leaf.
    pub canonical: String,
    /// Audit path to the checkpoint's root, base64 hashes (RFC 9162).
    pub inclusion_proof: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BundleSignature {
    pub key_name: String,
    pub key_id: String,
    /// Ed25519 over the RFC 8785 canonical JSON of the bundle without `signature`, base64.
    pub value: String,
}

#[derive(Serialize)]
struct Unsigned<'a> {
    format: &'a str,
    item: &'a ItemSummary,
    records: &'a [BundleRecord],
    checkpoint: &'a str,
    keys: &'a [PublishedKey],
}

fn signed_bytes(b: &Bundle) -> Vec<u8> {
    crate::evidence::canonical(&Unsigned {
        format: &b.format,
        item: &b.item,
        records: &b.records,
        checkpoint: &b.checkpoint,
        keys: &b.keys,
    })
}

#[derive(sqlx::FromRow)]
struct SummaryRow {
    id: Uuid,
    kind: String,
    reference: String,
    subject: String,
    agency_code: String,
    agency_name: String,
    pinfl: Option<String>,
    tin: Option<String>,
    created_at: DateTime<Utc>,
    content_sha256: String,
    served_at: Option<DateTime<Utc>>,
    served_rule: Option<String>,
    served_evidence: Option<Uuid>,
}

/// Builds the bundle of an item (the caller has checked who may see it).
pub async fn build(pool: &PgPool, signer: &Signer, item_id: Uuid) -> anyhow::Result<Bundle> {
    let mut conn = pool.acquire().await?;
    let row: SummaryRow = sqlx::query_as(
        "select i.id, i.kind, i.reference, i.subject, a.code as agency_code, a.name as agency_name, r.pinfl, r.tin,
                i.created_at, i.content_sha256, i.served_at, i.served_rule, i.served_evidence
         from item i join agency a on a.id = i.agency_id join recipient r on r.id = i.recipient_id where i.id = $1",
    )
    .bind(item_id)
    .fetch_one(&mut *conn)
    .await?;
    let attachments = crate::api::correspondence::attachment_digests(&mut conn, item_id).await?;
    // Every record of the item needs its index: sequence what was committed since the last pass.
    // A record committed while this runs may miss the pass; the next one takes it.
    let mut records: Vec<(Uuid, Option<i64>, Vec<u8>)> = Vec::new();
    for _ in 0..5 {
        log::sequence(pool, true).await?;
        records = sqlx::query_as(
            "select e.evidence_id, (select l.log_index from log_entry l where l.evidence_id = e.evidence_id) as log_index,
                        e.canonical
                 from evidence e where e.item_id = $1 order by e.seq",
        )
        .bind(item_id)
        .fetch_all(&mut *conn)
        .await?;
        if records.iter().all(|r| r.1.is_some()) {
            break;
        }
    }
    let mut records: Vec<(Uuid, i64, Vec<u8>)> = records
        .into_iter()
        .map(|(id, index, bytes)| index.map(|i| (id, i, bytes)))
        .collect::<Option<_>>()
        .context("records of the item are still waiting for their log index")?;
    records.sort_by_key(|r| r.1);
    let last = records.iter().map(|r| r.1 as u64).max().unwrap_or(0);
    let cp = log::checkpoint_covering(pool, signer, last + 1).await?;
    let size = cp.size as u64;
    let mut bundle_records = Vec::with_capacity(records.len());
    let served_index = records.iter().find(|r| Some(r.0) == row.served_evidence).map(|r| r.1);
    for (_, index, canonical) in records {
        let proof = log::inclusion_proof(&mut conn, index as u64, size).await?;
        bundle_records.push(BundleRecord {
            log_index: index as u64,
            canonical: String::from_utf8(canonical)?,
            inclusion_proof: proof.iter().map(|h| B64.encode(h)).collect(),
        });
    }
    let recipient = crate::domain::recipient_json(row.pinfl.as_deref(), row.tin.as_deref());
    let mut bundle = Bundle {
        format: FORMAT.into(),
        item: ItemSummary {
            id: row.id,
            kind: row.kind,
            reference: row.reference,
            subject: row.subject,
            sender: Party { agency: row.agency_code, name: row.agency_name },
            recipient,
            submitted_at: row.created_at,
            content_sha256: row.content_sha256,
            attachments: attachments.iter().map(|a| serde_json::to_value(a).expect("plain JSON")).collect(),
            served: match (row.served_at, row.served_rule, served_index) {
                (Some(at), Some(rule), Some(log_index)) => {
                    Some(ServedSummary { at, rule, log_index, evidence_id: row.served_evidence })
                }
                _ => None,
            },
        },
        records: bundle_records,
        checkpoint: cp.note,
        keys: log::published_keys(&mut conn).await?,
        signature: BundleSignature {
            key_name: signer.name.clone(),
            key_id: signer.key_id.clone(),
            value: String::new(),
        },
    };
    bundle.signature.value = B64.encode(signer.key.sign(&signed_bytes(&bundle)).to_bytes());
    Ok(bundle)
}

/// What verification found, for people (`dalil verify`) and programs (`POST /v1/verify`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Verdict {
    pub valid: bool,
    /// Why the bundle does not verify; null when it does.
    pub reason: Option<String>,
    pub item: Option<ItemSummary>,
    pub events: Vec<VerifiedEvent>,
    pub checkpoint: Option<CheckpointInfo>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct VerifiedEvent {
    pub log_index: u64,
    pub event: String,
    pub at: String,
    #[schema(value_type = Object)]
    pub actor: Value,
    pub channel: Option<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CheckpointInfo {
    pub origin: String,
    pub size: u64,
    pub key_name: String,
    pub key_id: String,
}

/// Verifies a bundle, trusting `trusted` keys; with none given, the bundle's own keys are
/// used and a warning says so.
pub fn verify(bundle: &Bundle, trusted: &[VerifierKey]) -> Verdict {
    let mut warnings = Vec::new();
    let keys: Vec<VerifierKey> = if trusted.is_empty() {
        warnings.push(
            "no key was given: the keys inside the bundle were trusted; compare their ids with the ones the platform publishes"
                .into(),
        );
        log::verifier_keys(&bundle.keys)
    } else {
        trusted.to_vec()
    };
    let mut events = Vec::new();
    let mut checkpoint = None;
    let result = check(bundle, &keys, &mut events, &mut checkpoint);
    Verdict {
        valid: result.is_ok(),
        reason: result.err(),
        item: Some(bundle.item.clone()),
        events,
        checkpoint,
        warnings,
    }
}

fn check(
    bundle: &Bundle,
    keys: &[VerifierKey],
    events: &mut Vec<VerifiedEvent>,
    checkpoint: &mut Option<CheckpointInfo>,
) -> Result<(), String> {
    if bundle.format != FORMAT {
        return Err(format!("unknown bundle format {:?}; this verifier reads {FORMAT}", bundle.format));
    }
    let cp = note::verify_checkpoint(&bundle.checkpoint, keys)?;
    *checkpoint = Some(CheckpointInfo {
        origin: cp.origin.clone(),
        size: cp.size,
        key_name: cp.key_name.clone(),
        key_id: hex::encode(cp.key_id),
    });
    if bundle.records.is_empty() {
        return Err("the bundle holds no records".into());
    }
    let mut previous: Option<u64> = None;
    let mut parsed = Vec::with_capacity(bundle.records.len());
    for r in &bundle.records {
        let at = r.log_index;
        if previous.is_some_and(|p| at <= p) {
            return Err(format!("records are duplicated or out of order at log index {at}"));
        }
        previous = Some(at);
        let bytes = r.canonical.as_bytes();
        let record: Value =
            serde_json::from_slice(bytes).map_err(|_| format!("record at log index {at} is not JSON"))?;
        if crate::evidence::canonical(&record) != bytes {
            return Err(format!("record at log index {at} is not in canonical form (RFC 8785)"));
        }
        // Version 1 records name their index; later ones get it from the sequencer, after they
        // were written, and the inclusion proof below fixes it.
        let named = record.get("log_index");
        if (named.is_some() || record["version"] == 1) && named.and_then(Value::as_u64) != Some(at) {
            return Err(format!("record at log index {at} names another log index"));
        }
        if record["item_id"].as_str() != Some(bundle.item.id.to_string().as_str()) {
            return Err(format!("record at log index {at} belongs to another item"));
        }
        if at >= cp.size {
            return Err(format!("record at log index {at} is beyond the checkpoint (size {})", cp.size));
        }
        let proof: Vec<Hash> = r
            .inclusion_proof
            .iter()
            .map(|p| B64.decode(p).ok().and_then(|b| b.try_into().ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| format!("the inclusion proof of log index {at} is malformed"))?;
        if !merkle::verify_inclusion(at, cp.size, &merkle::leaf_hash(bytes), &proof, &cp.root) {
            return Err(format!(
                "record at log index {at} is not in the signed log: its bytes or its inclusion proof were changed"
            ));
        }
        events.push(VerifiedEvent {
            log_index: at,
            event: record["event"].as_str().unwrap_or_default().into(),
            at: record["at"].as_str().unwrap_or_default().into(),
            actor: record["actor"].clone(),
            channel: record["channel"].as_str().map(String::from),
        });
        parsed.push((at, record));
    }

    // The summary must say what the records say.
    let submission = parsed
        .iter()
        .map(|(_, r)| r)
        .find(|r| r["event"] == "SubmissionAcceptance")
        .ok_or("no SubmissionAcceptance record: the submission is not proven")?;
    let digests = &submission["digests"];
    if digests["content"]["sha256"].as_str() != Some(bundle.item.content_sha256.as_str()) {
        return Err("the summary's content digest differs from the one fixed at submission".into());
    }
    let fixed: Vec<&str> =
        digests["attachments"].as_array().into_iter().flatten().filter_map(|a| a["sha256"].as_str()).collect();
    let claimed: Vec<&str> = bundle.item.attachments.iter().filter_map(|a| a["sha256"].as_str()).collect();
    if fixed != claimed {
        return Err("the summary's attachment digests differ from the ones fixed at submission".into());
    }
    if submission["sender"]["agency"].as_str() != Some(bundle.item.sender.agency.as_str())
        || submission["recipient"] != bundle.item.recipient
    {
        return Err("the summary's sender or recipient differs from the submission record".into());
    }
    let serving: Vec<&(u64, Value)> = parsed.iter().filter(|(_, r)| r["details"]["served"].is_object()).collect();
    match (&bundle.item.served, serving.first()) {
        (None, None) => {}
        (Some(s), Some((index, r))) => {
            if *index as i64 != s.log_index
                || s.evidence_id.is_some_and(|id| r["evidence_id"].as_str() != Some(id.to_string().as_str()))
                || r["details"]["served"]["rule"].as_str() != Some(s.rule.as_str())
            {
                return Err("the summary's service (time, rule, record) differs from the record that served it".into());
            }
        }
        (Some(_), None) => return Err("the summary claims the item was served, but no record served it".into()),
        (None, Some(_)) => return Err("a record served the item, but the summary says it was not served".into()),
    }

    // Last, completeness: the platform signed this exact set of records.
    let sig_key = keys
        .iter()
        .find(|k| hex::encode(k.id) == bundle.signature.key_id && k.name == bundle.signature.key_name)
        .ok_or("the bundle is signed by a key that is not trusted")?;
    let sig = B64
        .decode(&bundle.signature.value)
        .ok()
        .and_then(|b| Signature::from_slice(&b).ok())
        .ok_or("the bundle signature is malformed")?;
    sig_key.key.verify_strict(&signed_bytes(bundle), &sig).map_err(|_| {
        "the bundle's signature does not verify: records were added, removed or changed, or the summary was edited"
            .to_string()
    })?;
    Ok(())
}

/// The verdict as people read it.
pub fn describe(v: &Verdict) -> String {
    let tashkent = FixedOffset::east_opt(5 * 3600).expect("offset");
    let local = |s: &str| {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&tashkent).format("%Y-%m-%d %H:%M:%S %:z").to_string())
            .unwrap_or_else(|_| s.to_string())
    };
    let mut out = String::new();
    out.push_str(if v.valid { "VERIFIED: this proof bundle is intact and signed.\n" } else { "NOT VERIFIED.\n" });
    if let Some(reason) = &v.reason {
        out.push_str(&format!("Reason: {reason}\n"));
    }
    if let (false, Some(item)) = (v.valid, &v.item) {
        out.push_str(&format!("The bundle says it concerns item {}; nothing in it can be relied on.\n", item.id));
    }
    if let (true, Some(item)) = (v.valid, &v.item) {
        out.push_str(&format!("\nItem       {} ({}), reference {}\n", item.id, item.kind, item.reference));
        out.push_str(&format!("Subject    {}\n", item.subject));
        out.push_str(&format!("From       {} ({})\n", item.sender.name, item.sender.agency));
        let to = item
            .recipient
            .as_object()
            .and_then(|o| o.iter().next())
            .map(|(k, v)| format!("{} {}", k.to_uppercase(), v.as_str().unwrap_or_default()));
        out.push_str(&format!("To         {}\n", to.unwrap_or_default()));
        out.push_str(&format!("Content    sha256 {}\n", item.content_sha256));
        for a in &item.attachments {
            out.push_str(&format!(
                "Attachment {} ({}, {} bytes) sha256 {}\n",
                a["name"].as_str().unwrap_or_default(),
                a["content_type"].as_str().unwrap_or_default(),
                a["size"],
                a["sha256"].as_str().unwrap_or_default()
            ));
        }
        {
            out.push_str("\nWhat happened (Tashkent time)\n");
            for e in &v.events {
                let who = match (e.actor["type"].as_str(), e.actor["id"].as_str()) {
                    (Some(t), Some(id)) => format!("{t} {id}"),
                    _ => "?".into(),
                };
                let via = e.channel.as_deref().map(|c| format!(" via {c}")).unwrap_or_default();
                out.push_str(&format!("  #{:<6} {}  {:<28} by {who}{via}\n", e.log_index, local(&e.at), e.event));
            }
            match &item.served {
                Some(s) => out.push_str(&format!(
                    "\nServed     {} by rule \"{}\" (record #{})\n",
                    local(&s.at.to_rfc3339()),
                    s.rule,
                    s.log_index
                )),
                None => out.push_str("\nServed     not (yet) served\n"),
            }
        }
    }
    if let (true, Some(cp)) = (v.valid, &v.checkpoint) {
        out.push_str(&format!(
            "Log        {} records checked against checkpoint {} of size {}, signed by {} (key {})\n",
            v.events.len(),
            cp.origin,
            cp.size,
            cp.key_name,
            cp.key_id
        ));
    }
    for w in &v.warnings {
        out.push_str(&format!("Warning    {w}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE_KEY: &str = "dalil.local/evidence+023223d5+AeuPOr8bvdkqPMu3nPbGmbVdwPPQHSDacD4gzxQdf9bI";

    #[test]
    fn the_documented_example_verifies() {
        let bundle: Bundle = serde_json::from_str(include_str!("../docs/proof-bundle.example.json")).unwrap();
        let v = verify(&bundle, &[VerifierKey::parse(EXAMPLE_KEY).unwrap()]);
        assert!(v.valid, "{:?}", v.reason);
        let doc = include_str!("../docs/proof-bundle.md");
        assert!(doc.contains(EXAMPLE_KEY));
        for line in describe(&v).lines() {
            assert!(doc.contains(line), "docs/proof-bundle.md does not show: {line}");
        }
        let mut tampered = bundle.clone();
        tampered.records[1].canonical = tampered.records[1].canonical.replacen("portal", "portaI", 1);
        let v = verify(&tampered, &[VerifierKey::parse(EXAMPLE_KEY).unwrap()]);
        assert_eq!(
            v.reason.as_deref(),
            Some("record at log index 1 is not in the signed log: its bytes or its inclusion proof were changed")
        );
        for line in describe(&v).lines() {
            assert!(doc.contains(line), "docs/proof-bundle.md does not show: {line}");
        }
    }
}
