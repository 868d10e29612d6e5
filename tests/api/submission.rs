use serde_json::Value;

use crate::helpers::{summons, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summons_is_served_when_the_citizen_opens_it() {
    let app = TestApp::spawn().await;
    let key = app.agency("yunusobod-court").await;
    let (pinfl, token) = app.citizen("3120588010012").await;

    let resp = app.submit(&key, "k-1", &summons(pinfl.as_str())).await;
    assert_eq!(resp.status(), 202);
    assert!(resp.headers()["location"].to_str().unwrap().starts_with("/v1/correspondence/"));
    let accepted: Value = resp.json().await.unwrap();
    let id = accepted["id"].as_str().unwrap().to_string();
    let record = &accepted["evidence"]["record"];
    assert_eq!(record["event"], "SubmissionAcceptance");
    assert_eq!(record["recipient"]["pinfl"], pinfl.as_str());
    let pdf = crate::helpers::sample_pdf().to_vec();
    assert_eq!(record["digests"]["attachments"][0]["sha256"], dalil::evidence::sha256_hex(&pdf));

    let item = app.wait_for_status(&key, &id, &["consigned"]).await;
    assert_eq!(item["served"], Value::Null);
    assert_eq!(item["steps"][0]["channel"], "inbox");
    assert_eq!(item["steps"][0]["attempts"][0]["status"], "done");

    // The citizen sees it, unread, with the deadline.
    let inbox: Value = app.get("/v1/inbox", &token).await.json().await.unwrap();
    assert_eq!(inbox["items"][0]["id"], id.as_str());
    assert_eq!(inbox["items"][0]["opened_at"], Value::Null);

    // Opening shows exactly what was digested at submission, and serves the summons.
    let opened: Value = app.get(&format!("/v1/inbox/{id}"), &token).await.json().await.unwrap();
    let html = opened["content_html"].as_str().unwrap();
    assert!(html.contains("Karimov Anvar"));
    assert_eq!(dalil::evidence::sha256_hex(html.as_bytes()), record["digests"]["content"]["sha256"].as_str().unwrap());
    assert!(opened["served_at"].is_string());

    let file = app.get(&format!("/v1/inbox/{id}/attachments/0"), &token).await;
    assert_eq!(file.status(), 200);
    assert_eq!(file.headers()["content-type"], "application/pdf");
    assert_eq!(file.bytes().await.unwrap().to_vec(), pdf);

    let ack = app.post(&format!("/v1/inbox/{id}/acknowledge"), &token).await;
    assert_eq!(ack.status(), 200);
    // A second open, download and acknowledgement add no evidence.
    app.get(&format!("/v1/inbox/{id}"), &token).await;
    app.get(&format!("/v1/inbox/{id}/attachments/0"), &token).await;
    app.post(&format!("/v1/inbox/{id}/acknowledge"), &token).await;

    let item: Value = app.get(&format!("/v1/correspondence/{id}"), &key).await.json().await.unwrap();
    assert_eq!(item["status"], "served");
    assert_eq!(item["served"]["rule"], "accessed");
    let events: Vec<&str> = item["evidence"].as_array().unwrap().iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(
        events,
        [
            "SubmissionAcceptance",
            "ContentConsignment",
            "ContentAccessTracking",
            "ContentHandover",
            "ConsignmentAcceptance"
        ]
    );
    let access = &item["evidence"][2];
    assert_eq!(item["served"]["evidence"], access["evidence_id"]);
    // Every record is stored as canonical JSON with its hash; once sequenced, indexes are dense
    // from 0, in the order the records were written.
    dalil::log::sequence(&app.pool, true).await.unwrap();
    let item: Value = app.get(&format!("/v1/correspondence/{id}"), &key).await.json().await.unwrap();
    for (i, e) in item["evidence"].as_array().unwrap().iter().enumerate() {
        assert_eq!(e["log_index"], i as i64);
        let canonical = dalil::evidence::canonical(&e["record"]);
        assert_eq!(dalil::evidence::sha256_hex(&canonical), e["sha256"].as_str().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agencies_list_their_items_with_filters_and_cursor_pagination() {
    let app = TestApp::spawn().await;
    let key = app.agency("tax-yunusobod").await;
    let (pinfl, _) = app.citizen("3120588010013").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut body = summons(pinfl.as_str());
        body["reference"] = format!("REF-{i}").into();
        let v: Value = app.submit(&key, &format!("list-{i}"), &body).await.json().await.unwrap();
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let page1: Value = app.get("/v1/correspondence?limit=2", &key).await.json().await.unwrap();
    assert_eq!(page1["items"].as_array().unwrap().len(), 2);
    assert_eq!(page1["items"][0]["id"], ids[4].as_str(), "newest first");
    let cursor = page1["next_cursor"].as_str().unwrap();
    let page2: Value =
        app.get(&format!("/v1/correspondence?limit=2&cursor={cursor}"), &key).await.json().await.unwrap();
    assert_eq!(page2["items"][0]["id"], ids[2].as_str());
    let page3: Value = app
        .get(&format!("/v1/correspondence?limit=2&cursor={}", page2["next_cursor"].as_str().unwrap()), &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page3["items"].as_array().unwrap().len(), 1);
    assert_eq!(page3["next_cursor"], Value::Null);

    let by_ref: Value = app.get("/v1/correspondence?reference=REF-3", &key).await.json().await.unwrap();
    assert_eq!(by_ref["items"].as_array().unwrap().len(), 1);
    assert_eq!(by_ref["items"][0]["id"], ids[3].as_str());
    let by_kind: Value = app.get("/v1/correspondence?kind=decision", &key).await.json().await.unwrap();
    assert_eq!(by_kind["items"].as_array().unwrap().len(), 0);
    let future: Value =
        app.get("/v1/correspondence?created_after=2099-01-01T00:00:00Z", &key).await.json().await.unwrap();
    assert_eq!(future["items"].as_array().unwrap().len(), 0);
    for id in &ids {
        app.wait_for_status(&key, id, &["consigned"]).await;
    }
    let consigned: Value = app.get("/v1/correspondence?status=consigned&limit=10", &key).await.json().await.unwrap();
    assert_eq!(consigned["items"].as_array().unwrap().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_is_rendered_in_the_requested_language_with_values_escaped() {
    let app = TestApp::spawn().await;
    let key = app.agency("tax-chilonzor").await;
    let (pinfl, token) = app.citizen("3120588010014").await;
    let body = serde_json::json!({
        "kind": "notification",
        "recipient": { "pinfl": pinfl.as_str() },
        "template": "notice",
        "language": "ru",
        "reference": "N-1",
        "personalisation": { "title": "Уведомление", "body": "<script>alert(1)</script> текст" }
    });
    let v: Value = app.submit(&key, "esc-1", &body).await.json().await.unwrap();
    let id = v["id"].as_str().unwrap();
    app.wait_for_status(&key, id, &["consigned"]).await;
    let opened: Value = app.get(&format!("/v1/inbox/{id}"), &token).await.json().await.unwrap();
    let html = opened["content_html"].as_str().unwrap();
    assert!(!html.contains("<script>"), "{html}");
    assert!(html.contains("&lt;script&gt;"));
    assert_eq!(opened["subject"], "Уведомление");
}
