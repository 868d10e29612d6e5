//! `dalil bench`, briefly: the harness starts Dalil, drives items end to end and reports. A
//! smoke test that every item arrived, not a speed (speed targets live in the benchmark).

use crate::helpers::scratch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_benchmark_drives_every_item_to_the_inbox_and_the_sms_gateway() {
    let (_, dir, settings) = scratch("bench-test");
    let json = dir.join("bench.json");
    let report = dalil::bench::run(
        &settings,
        dalil::bench::Options {
            items: 200,
            seconds: None,
            rate: None,
            clients: 8,
            batch: 1,
            // Separate serve, relay, scheduler and worker processes, as in production.
            workers: 1,
            ceiling_seconds: 1,
            json: Some(json.clone()),
            keep: false,
            binary: env!("CARGO_BIN_EXE_dalil").into(),
            print: false,
        },
    )
    .await
    .expect("the benchmark runs");
    assert_eq!(report.accepted, 200, "{report:?}");
    assert_eq!(report.refused, 0);
    assert_eq!(report.consigned, 200);
    assert_eq!(report.sms_sent, 200);
    assert_eq!((report.evidence_records, report.evidence_in_log), (800, 800), "{report:?}");
    assert!(report.accept_latency.p99_ms > 0.0 && report.consign_latency.p99_ms > 0.0);
    assert!((1..=200).contains(&report.backlog_peak), "{report:?}");
    assert_eq!(report.worker_processes, 1);
    assert!(report.peak_rss_mib > 1.0 && report.cpu_seconds > 0.0, "{report:?}");
    let machine = report.machine_cpu_seconds.expect("Linux has /proc/stat");
    assert!(machine > 0.0, "{report:?}");
    assert_eq!(report.machine_cpu_ms_per_item, Some(machine * 1000.0 / 200.0));
    // An item's four evidence records alone are over 2 KiB of canonical JSON.
    let wal = report.wal_bytes_per_item.expect("PostgreSQL reports its WAL insert position");
    assert!(wal > 2048.0, "{wal} bytes of WAL per item");
    assert!(report.pg_three_row_tx_per_second > 0.0 && report.rabbitmq_confirmed_publishes_per_second > 0.0);
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(written["consigned"], 200);
    assert!(dalil::bench::table(&report).contains("end-to-end items/s"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_a_fixed_rate_the_benchmark_sends_for_the_time_given_and_every_item_arrives() {
    let (_, dir, settings) = scratch("bench-test");
    let report = dalil::bench::run(
        &settings,
        dalil::bench::Options {
            items: 1,
            // 2 s at 50 items/s: 100 items, whatever --items says.
            seconds: Some(2),
            rate: Some(50.0),
            clients: 16,
            // In batches of 10 through `POST /v1/correspondence/batch`, one due every 0.2 s.
            batch: 10,
            workers: 0,
            ceiling_seconds: 1,
            json: None,
            keep: false,
            binary: env!("CARGO_BIN_EXE_dalil").into(),
            print: false,
        },
    )
    .await
    .expect("the benchmark runs");
    assert_eq!((report.items, report.accepted, report.refused), (100, 100, 0), "{report:?}");
    assert_eq!((report.consigned, report.sms_sent), (100, 100));
    assert_eq!((report.evidence_records, report.evidence_in_log), (400, 400), "{report:?}");
    assert_eq!(report.offered_per_second, Some(50.0));
    // Offered at 50/s for 2 s: accepted at about that rate, not as fast as the server could.
    // The last batch is due 1.8 s after the first, so a harness that keeps to the due times
    // reports at most 100 / 1.8 ≈ 55.6 items/s, reached when answers take no time at all.
    assert!((30.0..=100.0 / 1.8).contains(&report.accepted_per_second), "{report:?}");
    assert_eq!(report.batch, 10);
    let table = dalil::bench::table(&report);
    assert!(table.contains("offered at 50/s") && table.contains("10 items per request"), "{table}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_benchmark_that_cannot_start_leaves_no_database_behind() {
    let (_, dir, mut settings) = scratch("bench-test");
    settings.topology_file = dir.join("no-such-topology.toml");
    let options = dalil::bench::Options {
        items: 10,
        seconds: None,
        rate: None,
        clients: 1,
        batch: 1,
        workers: 0,
        ceiling_seconds: 1,
        json: None,
        keep: false,
        binary: env!("CARGO_BIN_EXE_dalil").into(),
        print: false,
    };
    let err = format!("{:#}", dalil::bench::run(&settings, options).await.expect_err("no topology, no run"));
    assert!(err.contains("no-such-topology.toml"), "{err}");
    // The database it created for the run (named in the error) is gone again.
    let name = err.split_whitespace().find(|w| w.starts_with("dalil_bench_")).expect("the error names the database");
    let mut c: sqlx::PgConnection =
        sqlx::Connection::connect(&format!("{}/postgres", crate::helpers::postgres_base())).await.unwrap();
    let left: i64 = sqlx::query_scalar("select count(*) from pg_database where datname = $1")
        .bind(name)
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(left, 0, "{name} was left behind");
    let _ = std::fs::remove_dir_all(&dir);
}
