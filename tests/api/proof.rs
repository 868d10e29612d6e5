//! Proof bundles, checkpoints and offline verification — and every way of tampering with them
//! that must be caught.

use std::sync::OnceLock;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use dalil::merkle;
use dalil::note::VerifierKey;
use dalil::proof::{self, Bundle};
use serde_json::Value;

use crate::helpers::{summons, TestApp};

/// Submits, delivers and opens an item; returns its id.
async fn served_item(app: &TestApp, key: &str, pinfl: &str, token: &str, idem: &str) -> String {
    let v: Value = app.submit(key, idem, &summons(pinfl)).await.json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    app.wait_for_status(key, &id, &["consigned"]).await;
    assert_eq!(app.get(&format!("/v1/inbox/{id}"), token).await.status(), 200);
    id
}

async fn public_json(app: &TestApp, path: &str) -> Value {
    app.client.get(app.url(path)).send().await.unwrap().json().await.unwrap()
}

fn hashes(list: &Value) -> Vec<merkle::Hash> {
    list.as_array().unwrap().iter().map(|h| B64.decode(h.as_str().unwrap()).unwrap().try_into().unwrap()).collect()
}

async fn published_keys(app: &TestApp) -> Vec<VerifierKey> {
    let keys = public_json(app, "/v1/log/keys").await;
    keys.as_array().unwrap().iter().map(|k| VerifierKey::parse(k["verifier_key"].as_str().unwrap()).unwrap()).collect()
}

struct Fixture {
    bundle: Bundle,
    other: Bundle,
    keys: Vec<VerifierKey>,
}

/// Two real bundles from a real deployment, built once for the tamper tests.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        std::thread::spawn(|| {
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(
                async {
                    let app = TestApp::spawn().await;
                    let key = app.agency("court-proof").await;
                    let (pinfl, token) = app.citizen("3120588010031").await;
                    let id = served_item(&app, &key, pinfl.as_str(), &token, "p-1").await;
                    app.post(&format!("/v1/inbox/{id}/acknowledge"), &token).await;
                    let other = served_item(&app, &key, pinfl.as_str(), &token, "p-2").await;
                    let bundle: Bundle =
                        app.get(&format!("/v1/correspondence/{id}/proof"), &key).await.json().await.unwrap();
                    let other: Bundle =
                        app.get(&format!("/v1/correspondence/{other}/proof"), &key).await.json().await.unwrap();
                    Fixture { bundle, other, keys: published_keys(&app).await }
                },
            )
        })
        .join()
        .unwrap()
    })
}

fn reason(b: &Bundle) -> String {
    let v = proof::verify(b, &fixture().keys);
    assert!(!v.valid, "tampering went unnoticed");
    v.reason.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_verifies_offline_with_the_published_key_and_tells_what_happened() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-bundle").await;
    let stranger = app.agency("court-stranger").await;
    let (pinfl, token) = app.citizen("3120588010032").await;
    let id = served_item(&app, &key, pinfl.as_str(), &token, "b-1").await;

    let resp = app.get(&format!("/v1/correspondence/{id}/proof"), &key).await;
    assert_eq!(resp.status(), 200);
    let bundle: Bundle = resp.json().await.unwrap();
    assert_eq!(bundle.format, "dalil-proof-bundle/1");
    assert_eq!(bundle.records.len(), 3);
    let keys = published_keys(&app).await;
    let verdict = proof::verify(&bundle, &keys);
    assert!(verdict.valid, "{:?}", verdict.reason);
    assert!(verdict.warnings.is_empty());
    let events: Vec<&str> = verdict.events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(events, ["SubmissionAcceptance", "ContentConsignment", "ContentAccessTracking"]);
    assert_eq!(bundle.item.served.as_ref().unwrap().rule, "accessed");

    // The recipient gets the same proof; nobody else gets any.
    let mine: Bundle = app.get(&format!("/v1/inbox/{id}/proof"), &token).await.json().await.unwrap();
    assert!(proof::verify(&mine, &keys).valid);
    assert_eq!(app.get(&format!("/v1/correspondence/{id}/proof"), &stranger).await.status(), 404);

    // The command line, offline, with the published key; and the public verify endpoint.
    let dir = std::env::temp_dir().join(format!("dalil-bundle-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bundle.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&bundle).unwrap()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dalil"))
        .args(["verify", file.to_str().unwrap(), "--key", &keys[0].encode()])
        .env_clear()
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("VERIFIED") && text.contains("Served") && text.contains("accessed"), "{text}");
    assert!(text.contains(pinfl.as_str()));

    let mut tampered = bundle.clone();
    tampered.records[1].canonical = tampered.records[1].canonical.replace("inbox", "inbux");
    std::fs::write(&file, serde_json::to_vec(&tampered).unwrap()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dalil"))
        .args(["verify", file.to_str().unwrap(), "--key", &keys[0].encode()])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("not in the signed log"));
    std::fs::remove_dir_all(dir).unwrap();

    let verdict: Value =
        app.client.post(app.url("/v1/verify")).json(&bundle).send().await.unwrap().json().await.unwrap();
    assert_eq!(verdict["valid"], true);
    let verdict: Value =
        app.client.post(app.url("/v1/verify")).json(&tampered).send().await.unwrap().json().await.unwrap();
    assert_eq!(verdict["valid"], false);
    assert!(verdict["reason"].as_str().unwrap().contains("not in the signed log"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_and_proofs_are_served_and_verify() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-log").await;
    let (pinfl, token) = app.citizen("3120588010033").await;
    served_item(&app, &key, pinfl.as_str(), &token, "l-1").await;
    let keys = published_keys(&app).await;
    let first = dalil::log::sign_checkpoint(
        &app.pool,
        &dalil::log::signer(&app.pool, &app.settings.log).await.unwrap().unwrap(),
    )
    .await
    .unwrap();
    served_item(&app, &key, pinfl.as_str(), &token, "l-2").await;
    let latest = public_json(&app, "/v1/log/checkpoint").await;
    let cp = dalil::note::verify_checkpoint(latest["note"].as_str().unwrap(), &keys).unwrap();
    assert!(cp.size as i64 >= first.size);
    let size = cp.size;

    for index in [0, size / 2, size - 1] {
        let p = public_json(&app, &format!("/v1/log/proof/inclusion?index={index}&size={size}")).await;
        let leaf: merkle::Hash = B64.decode(p["leaf_hash"].as_str().unwrap()).unwrap().try_into().unwrap();
        assert!(merkle::verify_inclusion(index, size, &leaf, &hashes(&p["proof"]), &cp.root), "index {index}");
    }
    let old = dalil::note::verify_checkpoint(&first.note, &keys).unwrap();
    let c = public_json(&app, &format!("/v1/log/proof/consistency?from={}&to={size}", old.size)).await;
    assert!(merkle::verify_consistency(old.size, size, &old.root, &cp.root, &hashes(&c["proof"])));
    let stored = public_json(&app, &format!("/v1/log/checkpoints/{}", old.size)).await;
    assert_eq!(stored["note"], first.note.as_str());
    let bad =
        app.client.get(app.url(&format!("/v1/log/proof/inclusion?index={size}&size={size}"))).send().await.unwrap();
    assert_eq!(bad.status(), 422);
    let beyond = app.client.get(app.url("/v1/log/proof/consistency?from=1&to=999999")).send().await.unwrap();
    assert_eq!(beyond.status(), 422);
    // Checkpoints are never rewritten.
    let err = sqlx::query("update checkpoint set note = 'x'").execute(&app.pool).await.unwrap_err();
    assert!(err.to_string().contains("append-only"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_key_rotation_old_checkpoints_still_verify() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-rotate").await;
    let (pinfl, token) = app.citizen("3120588010034").await;
    let id = served_item(&app, &key, pinfl.as_str(), &token, "r-1").await;
    let before: Bundle = app.get(&format!("/v1/correspondence/{id}/proof"), &key).await.json().await.unwrap();

    let (ok, out, err) = crate::admin::dalil(&app, &["admin", "signing-key", "rotate", "--json"]);
    assert!(ok, "{err}");
    let new_key: Value = serde_json::from_str(&out).unwrap();
    let keys = public_json(&app, "/v1/log/keys").await;
    assert_eq!(keys.as_array().unwrap().len(), 2);
    assert!(keys[0]["not_after"].is_string(), "the old key's validity ended");
    assert_eq!(keys[1]["key_id"], new_key["key_id"]);

    let published = published_keys(&app).await;
    assert!(proof::verify(&before, &published).valid, "a bundle signed before the rotation still verifies");
    let after: Bundle = app.get(&format!("/v1/correspondence/{id}/proof"), &key).await.json().await.unwrap();
    assert_eq!(after.signature.key_id, new_key["key_id"].as_str().unwrap());
    assert!(proof::verify(&after, &published).valid);
    // The private key is a file, never in the database.
    let n: i64 = sqlx::query_scalar("select count(*) from information_schema.columns where table_name = 'signing_key' and column_name like '%private%'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_raises_an_alarm_when_the_log_is_rewritten() {
    // No scheduler of its own: the test runs the jobs itself, in the order it needs.
    let roles = dalil::app::Roles { scheduler: false, ..dalil::app::Roles::ALL };
    let app = TestApp::spawn_with(crate::helpers::Options { roles, ..Default::default() }).await;
    let key = app.agency("court-monitor").await;
    let (pinfl, token) = app.citizen("3120588010035").await;
    served_item(&app, &key, pinfl.as_str(), &token, "m-1").await;
    let signer = dalil::log::signer(&app.pool, &app.settings.log).await.unwrap().unwrap();
    dalil::log::sign_checkpoint(&app.pool, &signer).await.unwrap();
    assert_eq!(dalil::log::monitor(&app.pool).await.unwrap().1, 0, "an honest log raises nothing");

    // Someone with the database's superuser rights back-dates a record behind the triggers.
    sqlx::query("alter table evidence disable trigger evidence_no_update").execute(&app.pool).await.unwrap();
    sqlx::query(
        "update evidence set leaf_hash = sha256('forged'::bytea)
         where evidence_id = (select evidence_id from log_entry where log_index = 1)",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query("alter table evidence enable trigger evidence_no_update").execute(&app.pool).await.unwrap();
    served_item(&app, &key, pinfl.as_str(), &token, "m-2").await;
    // The next checkpoint is built over the rewritten leaves; the monitor catches it.
    sqlx::query("alter table merkle_node disable trigger merkle_node_no_update").execute(&app.pool).await.unwrap();
    sqlx::query("delete from merkle_node").execute(&app.pool).await.unwrap();
    sqlx::query("update log_state set integrated_size = 0").execute(&app.pool).await.unwrap();
    dalil::log::sign_checkpoint(&app.pool, &signer).await.unwrap();
    let (checked, alarms) = dalil::log::monitor(&app.pool).await.unwrap();
    assert_eq!(checked, 1);
    assert!(alarms >= 1);
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("dalil_log_consistency_alarms_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
}

#[test]
fn one_byte_changed_in_a_record_is_detected() {
    let mut b = fixture().bundle.clone();
    b.records[0].canonical = b.records[0].canonical.replacen("summons", "summonz", 1);
    assert!(reason(&b).contains("not in the signed log"));
}

#[test]
fn a_changed_digest_is_detected() {
    let mut b = fixture().bundle.clone();
    let digest = b.item.content_sha256.clone();
    let forged = format!("{}{}", if digest.starts_with('0') { '1' } else { '0' }, &digest[1..]);
    b.records[0].canonical = b.records[0].canonical.replace(&digest, &forged);
    assert!(reason(&b).contains("not in the signed log"));
    let mut b = fixture().bundle.clone();
    b.item.content_sha256 = forged;
    assert!(reason(&b).contains("content digest differs"));
}

#[test]
fn a_changed_proof_path_is_detected() {
    let mut b = fixture().bundle.clone();
    let mut h = B64.decode(&b.records[1].inclusion_proof[0]).unwrap();
    h[0] ^= 0x80;
    b.records[1].inclusion_proof[0] = B64.encode(h);
    assert!(reason(&b).contains("not in the signed log"));
}

#[test]
fn a_changed_checkpoint_root_is_detected() {
    let mut b = fixture().bundle.clone();
    let lines: Vec<&str> = b.checkpoint.lines().collect();
    let mut root = B64.decode(lines[2]).unwrap();
    root[5] ^= 1;
    b.checkpoint = b.checkpoint.replace(lines[2], &B64.encode(root));
    assert!(reason(&b).contains("signature does not verify"));
}

#[test]
fn a_changed_checkpoint_signature_is_detected() {
    let mut b = fixture().bundle.clone();
    let sig_line = b.checkpoint.lines().last().unwrap().to_string();
    let (head, sig) = sig_line.rsplit_once(' ').unwrap();
    let mut raw = B64.decode(sig).unwrap();
    raw[40] ^= 1;
    b.checkpoint = b.checkpoint.replace(&sig_line, &format!("{head} {}", B64.encode(raw)));
    assert!(reason(&b).contains("signature does not verify"));
}

#[test]
fn a_removed_record_is_detected() {
    let mut b = fixture().bundle.clone();
    b.records.remove(3); // the acknowledgement, say
    assert!(reason(&b).contains("records were added, removed or changed"));
}

#[test]
fn a_duplicated_record_is_detected() {
    let mut b = fixture().bundle.clone();
    let dup = b.records[1].clone();
    b.records.insert(2, dup);
    assert!(reason(&b).contains("duplicated or out of order"));
}

#[test]
fn reordered_records_are_detected() {
    let mut b = fixture().bundle.clone();
    b.records.swap(1, 2);
    assert!(reason(&b).contains("duplicated or out of order"));
}

#[test]
fn a_record_from_another_items_bundle_is_detected() {
    let mut b = fixture().bundle.clone();
    let foreign = fixture().other.records.last().unwrap().clone();
    b.records.push(foreign);
    assert!(reason(&b).contains("belongs to another item"));
}

#[test]
fn a_checkpoint_signed_by_an_unknown_key_is_detected() {
    let mut b = fixture().bundle.clone();
    let cp = dalil::note::verify_checkpoint(&b.checkpoint, &fixture().keys).unwrap();
    let impostor = ed25519_dalek::SigningKey::from_bytes(&[42u8; 32]);
    b.checkpoint = dalil::note::sign_checkpoint(&cp.origin, cp.size, &cp.root, &cp.key_name, &impostor);
    assert!(reason(&b).contains("not signed by any trusted key"));
    // Trusting the impostor's key because the bundle carries it would be the mistake: a
    // verifier given the real key refuses, and one given none is warned.
    let v = proof::verify(&fixture().bundle, &[]);
    assert!(v.valid && !v.warnings.is_empty());
}

#[test]
fn a_summary_that_claims_service_no_record_supports_is_detected() {
    let mut b = fixture().bundle.clone();
    b.item.served.as_mut().unwrap().rule = "deemed".into();
    assert!(reason(&b).contains("service"));
}

#[test]
fn the_untouched_fixture_verifies() {
    let v = proof::verify(&fixture().bundle, &fixture().keys);
    assert!(v.valid, "{:?}", v.reason);
    assert_eq!(v.events.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sequencer_indexes_every_committed_record_once_densely_and_in_order() {
    use dalil::evidence::{self, Actor, Event, ItemContext, NewEvidence};
    // No scheduler: the test runs the sequencer itself, between commits it chooses.
    let roles = dalil::app::Roles { scheduler: false, ..dalil::app::Roles::ALL };
    let app = TestApp::spawn_with(crate::helpers::Options { roles, ..Default::default() }).await;
    let key = app.agency("court-sequencer").await;
    let (pinfl, _) = app.citizen("3120588010036").await;
    let v: Value = app.submit(&key, "s-1", &summons(pinfl.as_str())).await.json().await.unwrap();
    let id: uuid::Uuid = v["id"].as_str().unwrap().parse().unwrap();
    app.wait_for_status(&key, &id.to_string(), &["consigned"]).await;
    let mut conn = app.pool.acquire().await.unwrap();
    let ctx = ItemContext::load(&mut conn, id).await.unwrap();
    drop(conn);
    let record = |n: usize| NewEvidence {
        event: Event::ContentAccessTracking,
        at: evidence::now(),
        actor: Actor::Platform("test".into()),
        channel: Some("inbox".into()),
        details: serde_json::json!({ "n": n }),
        digests: None,
    };
    let before = app.count("select count(*) from evidence").await;

    // A transaction that writes first and commits last.
    let mut slow = app.pool.begin().await.unwrap();
    evidence::append(&mut slow, &ctx, vec![record(0), record(1)]).await.unwrap();
    let slow_xid: String = sqlx::query_scalar("select pg_current_xact_id()::text").fetch_one(&mut *slow).await.unwrap();
    // Twenty writers in parallel, five records each, while the sequencer runs between them.
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..20 {
        let (pool, ctx) = (app.pool.clone(), ctx.clone());
        writers.spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            evidence::append(&mut tx, &ctx, (0..5).map(|i| record(100 * (w + 1) + i)).collect()).await.unwrap();
            tx.commit().await.unwrap();
            dalil::log::sequence(&pool, false).await.unwrap();
        });
    }
    while let Some(r) = writers.join_next().await {
        r.unwrap();
    }
    dalil::log::sequence(&app.pool, true).await.unwrap();
    let total = before + 100;
    assert_eq!(app.count("select count(*) from log_entry").await, total);
    assert_eq!(app.count("select max(log_index) + 1 from log_entry").await, total, "dense from 0");
    assert_eq!(app.count("select size from evidence_log_head").await, total);
    // The uncommitted records were not skipped: they get the next indexes once committed.
    assert_eq!(app.count("select count(*) from evidence e where not exists (select 1 from log_entry l where l.evidence_id = e.evidence_id)").await, 0, "not visible yet");
    // The head remembers the transaction still running, and only it, below the floor.
    let remembered: bool =
        sqlx::query_scalar("select $1::xid8 = any(xid_pending) and $1::xid8 < xid_floor from evidence_log_head")
            .bind(&slow_xid)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(remembered, "the running writer {slow_xid} is not in the head's pending list");
    slow.commit().await.unwrap();
    assert_eq!(dalil::log::sequence(&app.pool, true).await.unwrap(), 2);
    // A pass looks at what is new, not at the whole log: the writers are behind the floor now.
    let behind = app.count(
        "select count(*) from evidence, evidence_log_head h where xid >= h.xid_floor or xid = any(h.xid_pending)",
    );
    assert!(behind.await < total, "the sequencer's floor did not rise");
    let rows: Vec<(i64, i64, Value)> = sqlx::query_as(
        "select l.log_index, e.seq, convert_from(e.canonical, 'UTF8')::jsonb
         from log_entry l join evidence e on e.evidence_id = l.evidence_id order by l.log_index",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(rows.len() as i64, total + 2);
    assert!(rows.iter().enumerate().all(|(i, r)| r.0 == i as i64), "every index once, none missing");
    let last: Vec<i64> = rows[rows.len() - 2..].iter().map(|r| r.2["details"]["n"].as_i64().unwrap()).collect();
    assert_eq!(last, [0, 1], "the late commit comes last, in its own order");
    // Each transaction's records keep the order they were written in (concurrent writers may
    // interleave).
    for w in 0..20 {
        let ns: Vec<(i64, i64)> = rows
            .iter()
            .filter(|r| r.2["details"]["n"].as_i64().is_some_and(|n| n / 100 == w + 1))
            .map(|r| (r.0, r.2["details"]["n"].as_i64().unwrap()))
            .collect();
        assert_eq!(ns.len(), 5);
        assert!(ns.windows(2).all(|p| p[1].0 > p[0].0 && p[1].1 == p[0].1 + 1), "{ns:?}");
    }
    // Records v2 do not name their index; the signed tree and the bundle fix it.
    assert!(rows.iter().all(|r| r.2["version"] == 2 && r.2.get("log_index").is_none()));
    let bundle: Bundle = app.get(&format!("/v1/correspondence/{id}/proof"), &key).await.json().await.unwrap();
    assert_eq!(bundle.records.len() as i64, total + 2);
    let verdict = proof::verify(&bundle, &published_keys(&app).await);
    assert!(verdict.valid, "{:?}", verdict.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_sequences_records_the_scheduler_has_not_indexed_yet() {
    let roles = dalil::app::Roles { scheduler: false, ..dalil::app::Roles::ALL };
    let app = TestApp::spawn_with(crate::helpers::Options { roles, ..Default::default() }).await;
    let key = app.agency("court-unsequenced").await;
    let (pinfl, token) = app.citizen("3120588010037").await;
    let id = served_item(&app, &key, pinfl.as_str(), &token, "u-1").await;
    let item: Value = app.get(&format!("/v1/correspondence/{id}"), &key).await.json().await.unwrap();
    assert!(item["evidence"].as_array().unwrap().iter().all(|e| e["log_index"].is_null()), "{item}");
    assert_eq!(item["served"]["evidence"], item["evidence"][2]["evidence_id"]);
    let bundle: Bundle = app.get(&format!("/v1/correspondence/{id}/proof"), &key).await.json().await.unwrap();
    let verdict = proof::verify(&bundle, &published_keys(&app).await);
    assert!(verdict.valid, "{:?}", verdict.reason);
    let served = bundle.item.served.unwrap();
    assert_eq!(served.log_index, 2);
    assert_eq!(served.evidence_id.unwrap().to_string(), item["served"]["evidence"].as_str().unwrap());
}
