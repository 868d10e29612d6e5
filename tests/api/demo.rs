//! `dalil demo`, the README's first command, runs to the end: every item is served by the
//! rule its story calls for and every proof bundle verifies offline.

use crate::helpers::scratch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_plays_the_whole_story_and_every_bundle_verifies() {
    let (_, dir, mut settings) = scratch("demo-test");
    // No SMTP server here: the demo must fall back to .eml files.
    settings.email.smtp_port = 9;
    let before = std::fs::read_dir("var/demo").map(|d| d.count()).unwrap_or(0);
    dalil::demo::run(&settings, dalil::demo::Options { keep: false }).await.expect("the demo finishes and verifies");
    // It left its files: bundles, printed letters and the email it could not send by SMTP.
    let runs: Vec<_> = std::fs::read_dir("var/demo").unwrap().map(|e| e.unwrap().path()).collect();
    assert!(runs.len() > before);
    let latest = runs.iter().max().unwrap();
    let names: Vec<String> =
        std::fs::read_dir(latest).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    for expected in ["bundle-opens.json", "bundle-never.json", "bundle-notification.json", "bundle-paper.json"] {
        assert!(names.iter().any(|n| n == expected), "{expected} in {names:?}");
    }
    assert_eq!(names.iter().filter(|n| n.starts_with("letter-")).count(), 2, "{names:?}");
    let mails = std::fs::read_dir(latest.join("mail")).unwrap().count();
    assert_eq!(mails, 2, "one email notice per summons");
    // Each bundle also verifies with the offline verifier's own code path.
    let bundle: dalil::proof::Bundle =
        serde_json::from_slice(&std::fs::read(latest.join("bundle-never.json")).unwrap()).unwrap();
    let verdict = dalil::proof::verify(&bundle, &[]);
    assert!(verdict.valid, "{:?}", verdict.reason);
    assert_eq!(bundle.item.served.as_ref().unwrap().rule, "deemed");
    let _ = std::fs::remove_dir_all(latest);
    let _ = std::fs::remove_dir_all(&dir);
}
