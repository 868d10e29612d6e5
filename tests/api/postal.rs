//! Hybrid mail: letters rendered to PDF, claimed by the postal operator of the region, and
//! confirmed — handed over, refused or returned.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{summons, TestApp};

/// A recipient without digital consent, living in `region`: items reach them on paper.
async fn paper_recipient(app: &TestApp, first13: &str, region: &str) -> String {
    let pinfl = dalil::domain::Pinfl::with_check_digit(first13);
    let input = dalil::admin::RecipientInput {
        pinfl: Some(pinfl.to_string()),
        name: Some("Karimova Malika Ravshanovna".into()),
        region: Some(region.into()),
        district: Some("Yunusobod tumani".into()),
        street: Some("Amir Temur shoh koʻchasi".into()),
        house: Some("12".into()),
        apartment: Some("45".into()),
        postcode: Some("100084".into()),
        digital_consent: Some(false),
        ..Default::default()
    };
    dalil::admin::recipient_upsert(&app.pool, &input).await.unwrap();
    pinfl.to_string()
}

async fn operator(app: &TestApp, code: &str, regions: &str) -> String {
    let v = dalil::admin::postal_operator_create(&app.pool, code, &format!("Operator {code}"), &[regions.to_string()])
        .await
        .unwrap();
    v["key"].as_str().unwrap().to_string()
}

async fn letter_ready(app: &TestApp, id: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n: i64 = sqlx::query_scalar("select count(*) from letter where item_id = $1::uuid")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
        if n == 1 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the letter of {id} was never made ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn post_json(app: &TestApp, path: &str, key: &str, body: Value) -> reqwest::Response {
    app.client.post(app.url(path)).bearer_auth(key).json(&body).send().await.unwrap()
}

fn delivered(event_id: &str) -> Value {
    json!({
        "event_id": event_id, "event": "delivered", "at": "2026-11-20T10:15:00Z",
        "received_by": { "name": "Karimova Malika", "relation": "addressee" },
        "courier_id": "TK-0042", "signature_sha256": "a".repeat(64)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_letter_is_printed_claimed_delivered_and_serves_the_item() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-paper").await;
    let op = operator(&app, "uzpost-tashkent", "UZ-TK,UZ-TO").await;
    let pinfl = paper_recipient(&app, "3120588010043", "UZ-TK").await;
    let v: Value = app.submit(&key, "p-1", &summons(&pinfl)).await.json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    letter_ready(&app, &id).await;

    let manifest: Value =
        post_json(&app, "/v1/postal/batches", &op, json!({ "batch_key": "2026-11-28-a", "limit": 50 }))
            .await
            .json()
            .await
            .unwrap();
    assert_eq!(manifest["letters"].as_array().unwrap().len(), 1);
    let letter = &manifest["letters"][0];
    assert_eq!(letter["item_id"], id.as_str());
    assert_eq!(letter["address_lines"][0], "Karimova Malika Ravshanovna");
    // Claiming again with the same batch key is the same batch.
    let again: Value = post_json(&app, "/v1/postal/batches", &op, json!({ "batch_key": "2026-11-28-a", "limit": 50 }))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again["batch_id"], manifest["batch_id"]);

    let pdf = app.get(letter["pdf_url"].as_str().unwrap(), &op).await.bytes().await.unwrap();
    assert_eq!(dalil::evidence::sha256_hex(&pdf), letter["pdf_sha256"].as_str().unwrap());
    let dir = std::env::temp_dir().join(format!("dalil-letter-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("letter.pdf");
    std::fs::write(&file, &pdf).unwrap();
    // The text of the PDF names the recipient and the reference, in Uzbek Latin with its oʻ.
    let text = Command::new("pdftotext").arg(&file).arg("-").output().expect("pdftotext (poppler-utils)");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("Karimova Malika Ravshanovna") && text.contains("2-1234/2026"), "{text}");
    assert!(text.contains("koʻchasi"), "{text}");
    assert!(text.contains("Enclosure: ruling 2-1234/2026"), "the PDF attachment follows the letter: {text}");
    // The QR code on the rendered page decodes to the item's verification link.
    let status = Command::new("pdftoppm")
        .args(["-r", "150", "-f", "1", "-l", "1", "-png"])
        .arg(&file)
        .arg(dir.join("page"))
        .status()
        .unwrap();
    assert!(status.success());
    let page = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "png"))
        .unwrap();
    let qr = Command::new("zbarimg").args(["-q", "--raw"]).arg(&page).output().expect("zbarimg (zbar-tools)");
    assert_eq!(String::from_utf8_lossy(&qr.stdout).trim(), format!("{}/verify/{id}", app.settings.public_url));
    std::fs::remove_dir_all(dir).unwrap();

    let r = post_json(
        &app,
        &format!("/v1/postal/letters/{id}/events"),
        &op,
        json!({ "event_id": "e1", "event": "printed", "at": "2026-11-20T08:00:00Z" }),
    )
    .await;
    assert_eq!(r.status(), 200);
    let r = post_json(&app, &format!("/v1/postal/letters/{id}/events"), &op, delivered("e2")).await;
    assert_eq!(r.status(), 200);
    let item: Value = app.get(&format!("/v1/correspondence/{id}"), &key).await.json().await.unwrap();
    assert_eq!(item["status"], "served");
    assert_eq!(item["served"]["rule"], "postal_handover");
    assert_eq!(item["letter"]["status"], "delivered");
    let events: Vec<&str> = item["evidence"].as_array().unwrap().iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert!(events.contains(&"RelayToNonERDS") && events.contains(&"ContentHandover"), "{events:?}");
    let handover = item["evidence"].as_array().unwrap().iter().find(|e| e["event"] == "ContentHandover").unwrap();
    assert_eq!(handover["record"]["details"]["received_by"]["name"], "Karimova Malika");
    assert_eq!(handover["record"]["digests"]["letter_pdf"]["sha256"], letter["pdf_sha256"]);

    // The same event again changes nothing; an impossible one is refused with the reason.
    let r: Value =
        post_json(&app, &format!("/v1/postal/letters/{id}/events"), &op, delivered("e2")).await.json().await.unwrap();
    assert_eq!(r["result"], "duplicate");
    let before = app.count("select count(*) from evidence").await;
    let r = post_json(&app, &format!("/v1/postal/letters/{id}/events"), &op,
        json!({ "event_id": "e3", "event": "undeliverable", "at": "2026-11-21T08:00:00Z", "reason": "address unknown" })).await;
    assert_eq!(r.status(), 409);
    let problem: Value = r.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("undeliverable after delivered"), "{problem}");
    assert_eq!(app.count("select count(*) from evidence").await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_returns_and_a_bulk_upload_with_a_bad_row() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-bulk").await;
    let op = operator(&app, "uzpost-bulk", "UZ-TK").await;
    let pinfl = paper_recipient(&app, "3120588010044", "UZ-TK").await;
    let mut ids = Vec::new();
    for i in 0..2 {
        let mut body = summons(&pinfl);
        body["reference"] = format!("B-{i}").into();
        let v: Value = app.submit(&key, &format!("b-{i}"), &body).await.json().await.unwrap();
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        letter_ready(&app, id).await;
    }
    post_json(&app, "/v1/postal/batches", &op, json!({ "batch_key": "day-1", "limit": 10 })).await;
    let at = "2026-11-20T12:00:00Z";
    let results: Value = post_json(
        &app,
        "/v1/postal/events",
        &op,
        json!({ "events": [
            { "item_id": ids[0], "event_id": "r1", "event": "refused", "at": at, "courier_id": "TK-7" },
            { "item_id": ids[1], "event_id": "u1", "event": "undeliverable", "at": at },
            { "item_id": ids[1], "event_id": "u2", "event": "undeliverable", "at": at, "reason": "addressee moved" },
            { "item_id": uuid::Uuid::now_v7(), "event_id": "x1", "event": "delivered", "at": at,
              "received_by": { "name": "Someone", "relation": "neighbour" } },
        ]}),
    )
    .await
    .json()
    .await
    .unwrap();
    let statuses: Vec<u64> = results.as_array().unwrap().iter().map(|r| r["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, [200, 422, 200, 404], "{results}");
    assert!(results[1]["detail"].as_str().unwrap().contains("reason"));

    let refused: Value = app.get(&format!("/v1/correspondence/{}", ids[0]), &key).await.json().await.unwrap();
    assert_eq!(refused["served"]["rule"], "refused");
    assert!(refused["evidence"].as_array().unwrap().iter().any(|e| e["event"] == "ConsignmentRejection"));
    let returned: Value = app.get(&format!("/v1/correspondence/{}", ids[1]), &key).await.json().await.unwrap();
    assert_eq!(returned["status"], "undeliverable");
    assert_eq!(returned["served"], Value::Null);
    let undeliverable =
        returned["evidence"].as_array().unwrap().iter().find(|e| e["event"] == "Undeliverable").unwrap();
    assert_eq!(undeliverable["record"]["details"]["reason"], "addressee moved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_sees_only_its_own_letters() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-cross").await;
    let tashkent = operator(&app, "uzpost-tk", "UZ-TK").await;
    let samarkand = operator(&app, "uzpost-sa", "UZ-SA").await;
    let pinfl = paper_recipient(&app, "3120588010045", "UZ-TK").await;
    let v: Value = app.submit(&key, "c-1", &summons(&pinfl)).await.json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    letter_ready(&app, &id).await;
    // Before the claim, no event is possible.
    let r = post_json(&app, &format!("/v1/postal/letters/{id}/events"), &tashkent, delivered("early")).await;
    assert_eq!(r.status(), 409);
    let other: Value = post_json(&app, "/v1/postal/batches", &samarkand, json!({ "batch_key": "sa-1", "limit": 10 }))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(other["letters"].as_array().unwrap().len(), 0);
    post_json(&app, "/v1/postal/batches", &tashkent, json!({ "batch_key": "tk-1", "limit": 10 })).await;
    assert_eq!(app.get(&format!("/v1/postal/letters/{id}.pdf"), &samarkand).await.status(), 404);
    assert_eq!(
        post_json(&app, &format!("/v1/postal/letters/{id}/events"), &samarkand, delivered("x")).await.status(),
        404
    );
    assert_eq!(app.get(&format!("/v1/postal/letters/{id}.pdf"), &tashkent).await.status(), 200);
    // Agencies' and operators' keys do not open each other's doors.
    assert_eq!(app.get(&format!("/v1/postal/letters/{id}.pdf"), &key).await.status(), 401);
    assert_eq!(app.get("/v1/correspondence", &tashkent).await.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_operator_for_the_region_fails_the_letter_clearly_and_unconfirmed_letters_are_flagged() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-region").await;
    let op = operator(&app, "uzpost-only-tk", "UZ-TK").await;
    let far = paper_recipient(&app, "3120588010046", "UZ-XO").await;
    let v: Value = app.submit(&key, "f-1", &summons(&far)).await.json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let item: Value = app.get(&format!("/v1/correspondence/{id}"), &key).await.json().await.unwrap();
        if let Some(e) = item["evidence"].as_array().unwrap().iter().find(|e| e["event"] == "RelayFailure") {
            assert!(e["record"]["details"]["reason"]
                .as_str()
                .unwrap()
                .contains("no postal operator covers region UZ-XO"));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no RelayFailure");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let near = paper_recipient(&app, "3120588010047", "UZ-TK").await;
    let v: Value = app.submit(&key, "f-2", &summons(&near)).await.json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    letter_ready(&app, &id).await;
    post_json(&app, "/v1/postal/batches", &op, json!({ "batch_key": "k", "limit": 10 })).await;
    assert_eq!(dalil::api::postal::flag_unconfirmed(&app.pool, 10).await.unwrap(), 0, "claimed just now");
    sqlx::query("update letter set claimed_at = now() - interval '11 days'").execute(&app.pool).await.unwrap();
    assert_eq!(dalil::api::postal::flag_unconfirmed(&app.pool, 10).await.unwrap(), 1);
    let item: Value = app.get(&format!("/v1/correspondence/{id}"), &key).await.json().await.unwrap();
    assert!(item["letter"]["unconfirmed_flagged_at"].is_string());
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("dalil_postal_unconfirmed_letters 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_claims_the_standard_lanes_letters_before_the_bulk_lanes() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-paper-lanes").await;
    let op = operator(&app, "uzpost-lanes", "UZ-TK").await;
    let pinfl = paper_recipient(&app, "3120588010045", "UZ-TK").await;
    // Two letters of a bulk mailing made ready first, then a summons sent on its own.
    let mut ids = Vec::new();
    for (idem, lane) in [("pl-1", "bulk"), ("pl-2", "bulk"), ("pl-3", "standard")] {
        let mut body = summons(&pinfl);
        body["reference"] = idem.into();
        body["lane"] = lane.into();
        let v: Value = app.submit(&key, idem, &body).await.json().await.unwrap();
        let id = v["id"].as_str().unwrap().to_string();
        letter_ready(&app, &id).await;
        ids.push(id);
    }
    let lanes: Vec<String> =
        sqlx::query_scalar("select lane from letter order by created_at").fetch_all(&app.pool).await.unwrap();
    assert_eq!(lanes, ["bulk", "bulk", "standard"]);

    let claimed = |m: Value| -> Vec<String> {
        m["letters"].as_array().unwrap().iter().map(|l| l["item_id"].as_str().unwrap().to_string()).collect()
    };
    let first = post_json(&app, "/v1/postal/batches", &op, json!({ "batch_key": "l-1", "limit": 1 })).await;
    assert_eq!(claimed(first.json().await.unwrap()), [ids[2].clone()]);
    let rest = post_json(&app, "/v1/postal/batches", &op, json!({ "batch_key": "l-2", "limit": 10 })).await;
    let mut rest = claimed(rest.json().await.unwrap());
    rest.sort();
    let mut bulk = vec![ids[0].clone(), ids[1].clone()];
    bulk.sort();
    assert_eq!(rest, bulk);
}
