//! `dalil bench-log`: what the evidence log costs as it grows. Fills a scratch database with
//! N records, then measures, at that size, the rate of ordinary appends (one record per
//! transaction, several writers, the real code path), integration and checkpoint signing, and
//! the time to build inclusion and consistency proofs.

use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::PgPool;
use uuid::Uuid;

use crate::config::Settings;
use crate::evidence::{self, Actor, Event, ItemContext, NewEvidence};
use crate::{db, log};

pub struct Options {
    pub records: u64,
    pub writers: usize,
    pub appends: u64,
    pub proofs: u64,
    pub keep: bool,
}

fn record() -> NewEvidence {
    NewEvidence {
        event: Event::ContentAccessTracking,
        at: evidence::now(),
        actor: Actor::Platform("bench".into()),
        channel: Some("inbox".into()),
        details: serde_json::json!({ "via": "bench" }),
        digests: Some(serde_json::json!({ "content": { "sha256": "00".repeat(32) } })),
    }
}

pub async fn run(settings: &Settings, o: Options) -> anyhow::Result<()> {
    let name = format!("dalil_bench_log_{}", Uuid::new_v4().simple().to_string().get(..8).unwrap_or("x"));
    let mut s = settings.with_database(&name)?;
    s.database.max_connections = (o.writers as u32 + 2).max(4);
    let key_dir = std::env::temp_dir().join(&name);
    s.log.key_dir = key_dir.clone();
    s.log.generate_key_if_missing = true;
    db::migrate(&s).await?;
    let pool = db::connect(&s).await?;
    let result = measure(&pool, &s, &o).await;
    pool.close().await;
    if !o.keep {
        let admin = db::connect(&s.with_database("postgres")?).await?;
        sqlx::query(&format!("drop database {name} with (force)")).execute(&admin).await?;
        let _ = std::fs::remove_dir_all(key_dir);
    } else {
        println!("kept database {name}");
    }
    result
}

async fn measure(pool: &PgPool, s: &Settings, o: &Options) -> anyhow::Result<()> {
    let item = fixture_item(pool).await?;
    println!("filling the log with {} records (1,000 per transaction)…", o.records);
    let started = Instant::now();
    let mut filled = 0;
    while filled < o.records {
        let n = (o.records - filled).min(1000);
        let mut tx = pool.begin().await?;
        evidence::append(&mut tx, &item, (0..n).map(|_| record()).collect()).await?;
        tx.commit().await?;
        filled += n;
    }
    let fill = started.elapsed();
    println!(
        "  filled in {:.1} s ({:.0} records/s in batches)",
        fill.as_secs_f64(),
        o.records as f64 / fill.as_secs_f64()
    );

    let signer = log::signer(pool, &s.log).await?.context("no signer")?;
    let t = Instant::now();
    let first = log::sign_checkpoint(pool, &signer).await?;
    println!(
        "  sequenced, integrated and signed a checkpoint of size {} in {:.1} s",
        first.size,
        t.elapsed().as_secs_f64()
    );

    println!("appending {} records one per transaction with {} writers, at size {}…", o.appends, o.writers, first.size);
    let t = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..o.writers {
        let (pool, item) = (pool.clone(), item.clone());
        let share = o.appends / o.writers as u64 + u64::from((w as u64) < o.appends % o.writers as u64);
        writers.spawn(async move {
            for _ in 0..share {
                let mut tx = pool.begin().await?;
                evidence::append(&mut tx, &item, vec![record()]).await?;
                tx.commit().await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = writers.join_next().await {
        r??;
    }
    let append = t.elapsed();
    let rate = o.appends as f64 / append.as_secs_f64();
    println!(
        "  append rate: {rate:.0} records/s ({:.2} ms per transaction per writer)",
        append.as_secs_f64() * 1000.0 * o.writers as f64 / o.appends as f64
    );

    let t = Instant::now();
    let cp = log::sign_checkpoint(pool, &signer).await?;
    println!(
        "  sequenced and integrated {} new records and signed size {} in {:.0} ms",
        cp.size - first.size,
        cp.size,
        t.elapsed().as_secs_f64() * 1000.0
    );

    let size = cp.size as u64;
    let mut conn = pool.acquire().await?;
    let mut total = Duration::ZERO;
    let mut worst = Duration::ZERO;
    let root: [u8; 32] = cp.root.as_slice().try_into()?;
    for i in 0..o.proofs {
        let index = (i * 7_919_993 + 12_345) % size;
        let t = Instant::now();
        let proof = log::inclusion_proof(&mut conn, index, size).await?;
        let took = t.elapsed();
        total += took;
        worst = worst.max(took);
        let leaf = log::leaf_hash(&mut conn, index).await?;
        anyhow::ensure!(
            crate::merkle::verify_inclusion(index, size, &leaf.try_into().expect("32"), &proof, &root),
            "proof for {index} did not verify"
        );
    }
    println!(
        "  inclusion proof at size {size}: {:.2} ms mean, {:.2} ms worst over {} proofs (all verified)",
        total.as_secs_f64() * 1000.0 / o.proofs as f64,
        worst.as_secs_f64() * 1000.0,
        o.proofs
    );
    let t = Instant::now();
    let proof = log::consistency_proof(&mut conn, first.size as u64, size).await?;
    println!(
        "  consistency proof {} → {size}: {:.2} ms, {} hashes",
        first.size,
        t.elapsed().as_secs_f64() * 1000.0,
        proof.len()
    );
    let bytes: i64 = sqlx::query_scalar("select pg_database_size(current_database())").fetch_one(&mut *conn).await?;
    println!(
        "  database size: {:.0} MiB ({:.0} bytes per record, all tables)",
        bytes as f64 / 1048576.0,
        bytes as f64 / size as f64
    );
    Ok(())
}

async fn fixture_item(pool: &PgPool) -> anyhow::Result<ItemContext> {
    let agency = Uuid::now_v7();
    let recipient = Uuid::now_v7();
    let item = Uuid::now_v7();
    sqlx::query("insert into agency (id, code, name) values ($1, 'bench', 'Bench')").bind(agency).execute(pool).await?;
    sqlx::query("insert into recipient (id, pinfl, name) values ($1, '31205880100121', 'Bench')")
        .bind(recipient)
        .execute(pool)
        .await?;
    sqlx::query(
        "insert into item (id, agency_id, recipient_id, kind, template, language, reference, personalisation, subject,
                           content_html, content_sha256, policy_id, policy_version, status)
         values ($1, $2, $3, 'notification', 'notice', 'en', 'bench', '{}', 'bench', '', '', 'notification', 1, 'accepted')",
    )
    .bind(item)
    .bind(agency)
    .bind(recipient)
    .execute(pool)
    .await?;
    Ok(ItemContext {
        item_id: item,
        agency_id: agency,
        agency_code: "bench".into(),
        kind: "notification".into(),
        reference: "bench".into(),
        recipient_scheme: "pinfl".into(),
        recipient_value: "31205880100121".into(),
        policy_id: "notification".into(),
        policy_version: 1,
    })
}
