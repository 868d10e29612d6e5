//! A real SMTP server for the email tests: aiosmtpd (from PyPI, installed by .ci/services),
//! storing what it receives in a Maildir that the tests read back, decoded by Python's own
//! email parser.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct SmtpServer {
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

impl SmtpServer {
    pub fn start() -> SmtpServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("dalil-smtp-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("python3")
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}"), "-c", "aiosmtpd.handlers.Mailbox"])
            .arg(dir.join("maildir"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m aiosmtpd (run .ci/services to install it)");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(15), "aiosmtpd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        SmtpServer { port, dir, child }
    }

    /// Every message received, decoded: subject, from, to, message_id, and the parts.
    pub fn messages(&self) -> Vec<Value> {
        let script = r#"
import email, email.policy, json, mailbox, sys
out = []
for key, msg in mailbox.Maildir(sys.argv[1], factory=None).items():
    m = email.message_from_bytes(msg.as_bytes(), policy=email.policy.default)
    parts = [{"content_type": p.get_content_type(), "body": p.get_content()} for p in m.walk() if not p.is_multipart()]
    out.append({"subject": m["subject"], "from": m["from"], "to": m["to"], "message_id": m["message-id"],
                "dkim": m["dkim-signature"] is not None, "parts": parts})
print(json.dumps(out))
"#;
        let out = Command::new("python3").args(["-c", script]).arg(self.dir.join("maildir")).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
    }

    pub fn wait_for(&self, n: usize) -> Vec<Value> {
        let started = Instant::now();
        loop {
            let m = self.messages();
            if m.len() >= n {
                return m;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "{} of {n} emails arrived", m.len());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
