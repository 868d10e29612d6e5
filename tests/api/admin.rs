use std::process::Command;

use secrecy::ExposeSecret;
use serde_json::Value;

use crate::helpers::TestApp;

/// Runs the real `dalil` binary against the test's database and keys.
pub fn dalil(app: &TestApp, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dalil"))
        .args(args)
        .env("DALIL_DATABASE_URL", app.settings.database_url.expose_secret())
        .env("DALIL_TEMPLATES_DIR", crate::helpers::repo_path("templates"))
        .env("DALIL_IDENTITY__PUBLIC_KEY_FILE", &app.settings.identity.public_key_file)
        .env("DALIL_IDENTITY__DEV_PRIVATE_KEY_FILE", &app.settings.identity.dev_private_key_file)
        .env("DALIL_LOG__KEY_DIR", &app.settings.log.key_dir)
        .env("DALIL_LOG__KEY_NAME", &app.settings.log.key_name)
        .env("DALIL_LOG__ORIGIN", &app.settings.log.origin)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_create_agencies_keys_and_citizen_tokens_from_the_command_line() {
    let app = TestApp::spawn().await;
    let (ok, out, _) =
        dalil(&app, &["admin", "agency", "create", "--code", "Samarkand-Tax", "--name", "Samarqand soliq boshqarmasi"]);
    assert!(ok);
    assert!(out.contains("code: samarkand-tax"), "{out}");
    let (ok, _, err) = dalil(&app, &["admin", "agency", "create", "--code", "samarkand-tax", "--name", "again"]);
    assert!(!ok);
    assert!(err.contains("exists already"), "{err}");

    let (ok, out, _) = dalil(&app, &["admin", "api-key", "create", "--agency", "samarkand-tax", "--json"]);
    assert!(ok);
    let key: Value = serde_json::from_str(&out).unwrap();
    let key = key["key"].as_str().unwrap();
    assert_eq!(app.get("/v1/correspondence", key).await.status(), 200);
    // Only the hash is stored.
    assert_eq!(app.count(&format!("select count(*) from api_key where prefix = '{}'", &key[..14])).await, 1);
    let stored: Vec<u8> = sqlx::query_scalar("select key_hash from api_key").fetch_one(&app.pool).await.unwrap();
    assert_ne!(stored, key.as_bytes());

    let pinfl = dalil::domain::Pinfl::with_check_digit("3120588010027");
    let (ok, _, err) = dalil(
        &app,
        &["admin", "recipient", "upsert", "--pinfl", pinfl.as_str(), "--name", "Aziz", "--phone", "+99890"],
    );
    assert!(!ok);
    assert!(err.contains("--phone"), "{err}");
    assert_eq!(app.count("select count(*) from recipient").await, 0);
    let (ok, _, _) = dalil(
        &app,
        &["admin", "recipient", "upsert", "--pinfl", pinfl.as_str(), "--name", "Aziz", "--phone", "+998901234567"],
    );
    assert!(ok);

    let (ok, out, _) = dalil(&app, &["admin", "citizen-token", pinfl.as_str(), "--json"]);
    assert!(ok);
    let token: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(app.get("/v1/inbox", token["token"].as_str().unwrap()).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipient_imports_are_all_or_nothing() {
    let app = TestApp::spawn().await;
    let dir = std::env::temp_dir().join(format!("dalil-import-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let p1 = dalil::domain::Pinfl::with_check_digit("3120588010028");
    let p2 = dalil::domain::Pinfl::with_check_digit("3120588010029");
    let header = "pinfl,tin,name,phone,email,region,district,street,house,apartment,postcode,digital_consent";
    let bad = dir.join("bad.csv");
    std::fs::write(
        &bad,
        format!(
            "{header}\n{p1},,Aliyev Aziz,+998901234567,aziz@example.uz,UZ-TK,Yunusobod,Amir Temur,12,5,100084,true\n\
             ,301234567,OOO Misol,,bad-email,,,,,,,false\n"
        ),
    )
    .unwrap();
    let (ok, _, err) = dalil(&app, &["admin", "recipients", "import", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("line 3") && err.contains("email"), "{err}");
    assert_eq!(app.count("select count(*) from recipient").await, 0, "nothing imported");

    let good = dir.join("good.jsonl");
    std::fs::write(
        &good,
        format!(
            "{{\"pinfl\":\"{p1}\",\"name\":\"Aliyev Aziz\",\"phone\":\"+998901234567\",\"region\":\"UZ-TK\",\"district\":\"Yunusobod\",\"street\":\"Amir Temur\",\"house\":\"12\",\"postcode\":\"100084\",\"digital_consent\":true}}\n\
             {{\"pinfl\":\"{p2}\",\"name\":\"Karimova Malika\"}}\n\
             {{\"tin\":\"301234567\",\"name\":\"OOO Misol\",\"email\":\"info@misol.uz\"}}\n"
        ),
    )
    .unwrap();
    let (ok, out, err) = dalil(&app, &["admin", "recipients", "import", good.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["created"], 3);
    let address: Value = sqlx::query_scalar("select address from recipient where pinfl = $1")
        .bind(p1.as_str())
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(address["region"], "UZ-TK");
    let (ok, out, _) = dalil(&app, &["admin", "recipients", "import", good.to_str().unwrap(), "--json"]);
    assert!(ok);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["updated"], 3, "importing again updates");
    std::fs::remove_dir_all(dir).unwrap();
}
