use serde_json::{json, Value};

use crate::helpers::{summons, TestApp};

/// (what is wrong, body change, expected status, expected field)
type Case = (&'static str, Box<dyn Fn(&mut Value)>, u16, Option<&'static str>);

fn cases(stranger: &str) -> Vec<Case> {
    let stranger = stranger.to_string();
    vec![
        ("unknown kind", Box::new(|b| b["kind"] = "fine".into()), 422, Some("kind")),
        ("kind not a string", Box::new(|b| b["kind"] = 5.into()), 422, Some("kind")),
        (
            "no recipient",
            Box::new(|b| {
                b.as_object_mut().unwrap().remove("recipient");
            }),
            422,
            None,
        ),
        ("PINFL too short", Box::new(|b| b["recipient"] = json!({ "pinfl": "1234" })), 422, Some("recipient.pinfl")),
        (
            "PINFL check digit",
            Box::new(|b| b["recipient"] = json!({ "pinfl": "31205880100120" })),
            422,
            Some("recipient.pinfl"),
        ),
        ("TIN with letters", Box::new(|b| b["recipient"] = json!({ "tin": "30123456x" })), 422, Some("recipient.tin")),
        ("both PINFL and TIN", Box::new(|b| b["recipient"]["tin"] = "301234567".into()), 422, Some("recipient")),
        (
            "unknown recipient",
            Box::new(move |b| b["recipient"] = json!({ "pinfl": stranger })),
            422,
            Some("recipient.pinfl"),
        ),
        (
            "unknown recipient field",
            Box::new(|b| b["recipient"]["passport"] = "AA123".into()),
            422,
            Some("recipient.passport"),
        ),
        ("unknown template", Box::new(|b| b["template"] = "no-such".into()), 422, Some("template")),
        ("template not for the kind", Box::new(|b| b["kind"] = "letter".into()), 422, Some("kind")),
        ("unknown language", Box::new(|b| b["language"] = "de".into()), 422, Some("language")),
        (
            "missing personalisation variable",
            Box::new(|b| {
                b["personalisation"].as_object_mut().unwrap().remove("hearing_at");
            }),
            422,
            Some("personalisation.hearing_at"),
        ),
        (
            "extra personalisation variable",
            Box::new(|b| b["personalisation"]["typo_var"] = "x".into()),
            422,
            Some("personalisation.typo_var"),
        ),
        (
            "personalisation value an object",
            Box::new(|b| b["personalisation"]["courtroom"] = json!({ "n": 3 })),
            422,
            Some("personalisation.courtroom"),
        ),
        (
            "empty personalisation value",
            Box::new(|b| b["personalisation"]["courtroom"] = "  ".into()),
            422,
            Some("personalisation.courtroom"),
        ),
        ("empty reference", Box::new(|b| b["reference"] = " ".into()), 422, Some("reference")),
        ("reference too long", Box::new(|b| b["reference"] = "R".repeat(101).into()), 422, Some("reference")),
        (
            "respond_by in the past",
            Box::new(|b| b["respond_by"] = "2020-01-01T00:00:00Z".into()),
            422,
            Some("respond_by"),
        ),
        ("respond_by not a time", Box::new(|b| b["respond_by"] = "next week".into()), 422, Some("respond_by")),
        (
            "attachment not base64",
            Box::new(|b| b["attachments"][0]["content"] = "%%%".into()),
            422,
            Some("attachments[0].content"),
        ),
        (
            "attachment without a name",
            Box::new(|b| b["attachments"][0]["name"] = "".into()),
            422,
            Some("attachments[0].name"),
        ),
        (
            "attachment name with a path",
            Box::new(|b| b["attachments"][0]["name"] = "../../etc/passwd".into()),
            422,
            Some("attachments[0].name"),
        ),
        (
            "attachment media type",
            Box::new(|b| b["attachments"][0]["content_type"] = "pdf".into()),
            422,
            Some("attachments[0].content_type"),
        ),
        (
            // Readable, but for arrays nested deeper than lopdf's recursion survives on a
            // runtime thread: refused, and the server lives on.
            "attachment a PDF nested 10,000 deep",
            Box::new(|b| b["attachments"][0]["content"] = base64_of(&deeply_nested_pdf()).into()),
            422,
            Some("attachments[0].content"),
        ),
        ("unknown top-level field", Box::new(|b| b["priority"] = "high".into()), 422, None),
        (
            "attachments over 10 MiB",
            Box::new(|b| {
                let big = base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    vec![b'x'; 10 * 1024 * 1024 + 1],
                );
                b["attachments"][0]["content"] = big.into();
            }),
            413,
            None,
        ),
        ("body not an object", Box::new(|b| *b = json!([1, 2])), 422, None),
    ]
}

fn base64_of(bytes: &[u8]) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes)
}

/// A PDF that parses, its catalogue's page tree holding 10,000 arrays one inside the next.
fn deeply_nested_pdf() -> Vec<u8> {
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_string(),
        format!("<< /Type /Pages /Kids [] /Count 0 /Deep {}{} >>", "[".repeat(10_000), "]".repeat(10_000)),
    ];
    let mut pdf = String::from("%PDF-1.7\n");
    let mut offsets = Vec::new();
    for (n, object) in objects.iter().enumerate() {
        offsets.push(pdf.len());
        pdf += &format!("{} 0 obj\n{object}\nendobj\n", n + 1);
    }
    let xref = pdf.len();
    pdf += "xref\n0 3\n0000000000 65535 f \n";
    for offset in offsets {
        pdf += &format!("{offset:010} 00000 n \n");
    }
    pdf += &format!("trailer\n<< /Size 3 /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n");
    pdf.into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_submissions_get_a_clear_4xx_and_write_nothing() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-bad").await;
    let (pinfl, _) = app.citizen("3120588010022").await;
    let stranger = dalil::domain::Pinfl::with_check_digit("5120588010099");
    let all = cases(stranger.as_str());
    assert!(all.len() >= 20);
    for (i, (what, change, status, field)) in all.into_iter().enumerate() {
        let mut body = summons(pinfl.as_str());
        change(&mut body);
        let resp = app.submit(&key, &format!("bad-{i}"), &body).await;
        assert_eq!(resp.status().as_u16(), status, "{what}");
        assert_eq!(resp.headers()["content-type"], "application/problem+json", "{what}");
        let problem: Value = resp.json().await.unwrap();
        assert_eq!(problem["status"], status, "{what}");
        assert!(problem["detail"].as_str().is_some_and(|d| !d.is_empty()), "{what}");
        if let Some(field) = field {
            assert_eq!(problem["field"], field, "{what}: {problem}");
        }
        assert_eq!(app.written().await, 0, "{what} wrote something");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_400_415_or_413_never_500() {
    let app = TestApp::spawn().await;
    let key = app.agency("court-malformed").await;
    let post = |body: Vec<u8>, ct: &'static str, idem: Option<&'static str>| {
        let mut req =
            app.client.post(app.url("/v1/correspondence")).bearer_auth(&key).header("content-type", ct).body(body);
        if let Some(k) = idem {
            req = req.header("Idempotency-Key", k);
        }
        req.send()
    };
    let r = post(b"{\"kind\": ".to_vec(), "application/json", Some("m1")).await.unwrap();
    assert_eq!(r.status(), 400);
    let r = post(b"kind=summons".to_vec(), "application/x-www-form-urlencoded", Some("m2")).await.unwrap();
    assert_eq!(r.status(), 415);
    let r = post(b"{}".to_vec(), "application/json", None).await.unwrap();
    assert_eq!(r.status(), 400);
    let problem: Value = r.json().await.unwrap();
    assert_eq!(problem["field"], "Idempotency-Key");
    // The server answers 413 from the Content-Length alone, without reading the body, and
    // closes the connection. A client still writing 17 MiB then sees a broken pipe instead of
    // the answer, so this one sends the head only, over a socket of its own, and reads.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let authority = app.address.trim_start_matches("http://");
        let mut socket = tokio::net::TcpStream::connect(authority).await.unwrap();
        let head = format!(
            "POST /v1/correspondence HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nIdempotency-Key: m3\r\nContent-Length: {}\r\n\r\n",
            17 * 1024 * 1024
        );
        socket.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 1024];
        let n =
            tokio::time::timeout(std::time::Duration::from_secs(10), socket.read(&mut answer)).await.unwrap().unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }
    let r = app.get("/v1/correspondence?limit=0", &key).await;
    assert_eq!(r.status(), 422);
    let r = app.get("/v1/correspondence?created_after=yesterday", &key).await;
    assert_eq!(r.status(), 422);
    let r = app.get("/v1/correspondence/not-a-uuid", &key).await;
    assert_eq!(r.status(), 404);
    let r = app.client.delete(app.url("/v1/correspondence")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(app.written().await, 0);
}
