//! `dalil bench`, briefly: the harness starts Dalil, drives items end to end and reports. A
//! smoke test that every item arrived, not a speed (speed targets live in the benchmark).

use crate::helpers::{amqp_base, test_settings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_benchmark_drives_every_item_to_the_inbox_and_the_sms_gateway() {
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let dir = std::env::temp_dir().join(format!("dalil-bench-test-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let settings = test_settings(&id, &dir, &amqp_base());
    let json = dir.join("bench.json");
    let report = dalil::bench::run(
        &settings,
        dalil::bench::Options {
            items: 200,
            seconds: None,
            clients: 8,
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
    assert!(report.accept_latency.p99_ms > 0.0 && report.consign_latency.p99_ms > 0.0);
    assert!((1..=200).contains(&report.backlog_peak), "{report:?}");
    assert_eq!(report.worker_processes, 1);
    assert!(report.peak_rss_mib > 1.0 && report.cpu_seconds > 0.0, "{report:?}");
    assert!(report.pg_three_row_tx_per_second > 0.0 && report.rabbitmq_confirmed_publishes_per_second > 0.0);
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(written["consigned"], 200);
    assert!(dalil::bench::table(&report).contains("end-to-end items/s"));
    let _ = std::fs::remove_dir_all(&dir);
}
