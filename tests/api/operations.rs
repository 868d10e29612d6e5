use serde_json::Value;

use crate::helpers::{scratch, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_the_openapi_document() {
    let app = TestApp::spawn().await;
    assert_eq!(app.client.get(app.url("/healthz")).send().await.unwrap().status(), 200);
    let ready: Value = app.client.get(app.url("/readyz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["rabbitmq"], "ok");
    assert_eq!(ready["postgres"], "ok");
    let doc: Value = app.client.get(app.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    for path in [
        "/v1/correspondence",
        "/v1/correspondence/batch",
        "/v1/correspondence/{id}",
        "/v1/inbox",
        "/v1/inbox/{id}/acknowledge",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing from the OpenAPI document");
    }
    assert!(doc["components"]["schemas"]["SubmitRequest"].is_object());
    let nowhere = app.client.get(app.url("/v2/nothing")).send().await.unwrap();
    assert_eq!(nowhere.status(), 404);
    assert_eq!(nowhere.headers()["content-type"], "application/problem+json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_started_before_the_topology_exists_says_so() {
    let (id, dir, settings) = scratch("notopo");
    dalil::db::migrate(&settings).await.unwrap();
    let err = dalil::app::App::build(settings).await.err().expect("must refuse to start");
    assert!(format!("{err:#}").contains("run `dalil topology`"), "{err:#}");
    let mut c: sqlx::PgConnection =
        sqlx::Connection::connect(&format!("{}/postgres", crate::helpers::postgres_base())).await.unwrap();
    sqlx::query(&format!("drop database dalil_test_{id} with (force)")).execute(&mut c).await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_and_stops_every_role() {
    let mut app = TestApp::spawn().await;
    let key = app.agency("court-stop").await;
    let (pinfl, _) = app.citizen("3120588010030").await;
    let v: Value = app.submit(&key, "s-1", &crate::helpers::summons(pinfl.as_str())).await.json().await.unwrap();
    app.wait_for_status(&key, v["id"].as_str().unwrap(), &["consigned"]).await;
    app.stop().await;
    assert!(app.client.get(app.url("/healthz")).send().await.is_err(), "the listener is closed");
}
