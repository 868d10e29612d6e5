use serde_json::Value;

use crate::helpers::{summons, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agency_never_sees_another_agencys_items() {
    let app = TestApp::spawn().await;
    let court = app.agency("court-own").await;
    let police = app.agency("police-other").await;
    let (pinfl, _) = app.citizen("3120588010018").await;
    let v: Value = app.submit(&court, "t1", &summons(pinfl.as_str())).await.json().await.unwrap();
    let id = v["id"].as_str().unwrap();

    assert_eq!(app.get(&format!("/v1/correspondence/{id}"), &court).await.status(), 200);
    let other = app.get(&format!("/v1/correspondence/{id}"), &police).await;
    assert_eq!(other.status(), 404, "404, not 403: existence is not disclosed");
    let missing = app.get(&format!("/v1/correspondence/{}", uuid::Uuid::now_v7()), &police).await;
    assert_eq!(missing.status(), 404);
    let list: Value = app.get("/v1/correspondence", &police).await.json().await.unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_citizen_sees_only_their_own_inbox() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-x").await;
    let (aziz, aziz_token) = app.citizen("3120588010019").await;
    let (_, malika_token) = app.citizen("4120588010020").await;
    let v: Value = app.submit(&key, "c1", &summons(aziz.as_str())).await.json().await.unwrap();
    let id = v["id"].as_str().unwrap();
    app.wait_for_status(&key, id, &["consigned"]).await;

    let mine: Value = app.get("/v1/inbox", &aziz_token).await.json().await.unwrap();
    assert_eq!(mine["items"].as_array().unwrap().len(), 1);
    let theirs: Value = app.get("/v1/inbox", &malika_token).await.json().await.unwrap();
    assert_eq!(theirs["items"].as_array().unwrap().len(), 0);
    for path in [format!("/v1/inbox/{id}"), format!("/v1/inbox/{id}/attachments/0")] {
        assert_eq!(app.get(&path, &malika_token).await.status(), 404, "{path}");
    }
    assert_eq!(app.post(&format!("/v1/inbox/{id}/acknowledge"), &malika_token).await.status(), 404);
    // Nothing the other citizen did counts as access.
    assert_eq!(
        app.count(
            "select count(*) from evidence where event <> 'SubmissionAcceptance' and event <> 'ContentConsignment'"
        )
        .await,
        0
    );
    let item: Value = app.get(&format!("/v1/correspondence/{id}"), &key).await.json().await.unwrap();
    assert_eq!(item["served"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_are_refused_with_401() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-y").await;
    let (pinfl, token) = app.citizen("3120588010021").await;
    let no_auth = app.client.get(app.url("/v1/correspondence")).send().await.unwrap();
    assert_eq!(no_auth.status(), 401);
    assert_eq!(no_auth.headers()["content-type"], "application/problem+json");
    assert_eq!(app.get("/v1/correspondence", "dalil_not-a-key").await.status(), 401);
    // A citizen token is not an agency key, and the other way round.
    assert_eq!(app.get("/v1/correspondence", &token).await.status(), 401);
    assert_eq!(app.get("/v1/inbox", &key).await.status(), 401);
    // A revoked key stops working at once.
    let prefix = &key[..14];
    dalil::admin::api_key_revoke(&app.pool, prefix).await.unwrap();
    assert_eq!(app.submit(&key, "r", &summons(pinfl.as_str())).await.status(), 401);
    assert_eq!(app.count("select count(*) from item").await, 0);
}

/// An unknown or revoked key is a 401 before anything else is said about a submission (its
/// body is not even read), and the same faults with a valid key get their own 4xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_key_is_refused_before_any_fault_of_the_submission() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-k401").await;
    let revoked = app.agency("court-k401r").await;
    dalil::admin::api_key_revoke(&app.pool, &revoked[..14]).await.unwrap();
    let (pinfl, _) = app.citizen("3120588010025").await;
    let unregistered = dalil::domain::Pinfl::with_check_digit("3120588010026").to_string();
    let mut bad_field = summons(pinfl.as_str());
    bad_field["recipient"]["pinfl"] = "123".into();
    let valid = serde_json::to_vec(&summons(pinfl.as_str())).unwrap();
    let cases: [(&str, Vec<u8>, Option<&str>, u16); 5] = [
        ("no Idempotency-Key", valid.clone(), None, 400),
        ("malformed JSON", b"{\"kind\": ".to_vec(), Some("k2"), 400),
        ("an invalid PINFL", serde_json::to_vec(&bad_field).unwrap(), Some("k3"), 422),
        ("an unregistered recipient", serde_json::to_vec(&summons(&unregistered)).unwrap(), Some("k4"), 422),
        ("nothing wrong", valid, Some("k5"), 202),
    ];
    for (what, body, idempotency_key, with_valid_key) in cases {
        for (api_key, expected) in
            [("dalil_0000000000000000", 401), (revoked.as_str(), 401), (key.as_str(), with_valid_key)]
        {
            let mut request = app
                .client
                .post(app.url("/v1/correspondence"))
                .bearer_auth(api_key)
                .header("content-type", "application/json")
                .body(body.clone());
            if let Some(k) = idempotency_key {
                request = request.header("Idempotency-Key", k);
            }
            let answer = request.send().await.unwrap();
            assert_eq!(answer.status(), expected, "{what} with {}", &api_key[..14]);
            if expected == 401 {
                let problem: Value = answer.json().await.unwrap();
                assert_eq!(problem["detail"], "the API key is unknown or revoked", "{what}");
            }
        }
    }
    // Nor does a retry of a finished request answer as the first time without a valid key.
    for api_key in ["dalil_0000000000000000", revoked.as_str()] {
        let retry = app.submit(api_key, "k5", &summons(pinfl.as_str())).await;
        assert_eq!(retry.status(), 401);
        let form = app.client.post(app.url("/v1/correspondence")).bearer_auth(api_key);
        let form = form.header("Idempotency-Key", "k6").header("content-type", "text/plain").body("summons");
        assert_eq!(form.send().await.unwrap().status(), 401);
    }
    assert_eq!(app.count("select count(*) from item").await, 1);
}
