//! Settings: `config/default.toml` (every key documented there), then `DALIL_*` variables.
//!
//! The defaults are compiled into the binary, so `dalil` runs from any directory; a file named
//! by `DALIL_CONFIG` (or `config/default.toml` in the working directory) replaces them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

const BUILT_IN: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub database_url: SecretString,
    pub amqp_url: SecretString,
    pub listen: String,
    pub public_url: String,
    pub queue_prefix: String,
    pub templates_dir: PathBuf,
    pub policies_file: PathBuf,
    pub topology_file: PathBuf,
    pub log_format: String,
    pub database: DatabaseSettings,
    pub api: ApiSettings,
    pub relay: RelaySettings,
    pub worker: WorkerSettings,
    pub identity: IdentitySettings,
    pub log: LogSettings,
    pub scheduler: SchedulerSettings,
    pub sms: SmsSettings,
    pub email: EmailSettings,
    pub postal: PostalSettings,
    pub callbacks: CallbackSettings,
    pub web: WebSettings,
    pub retention: RetentionSettings,
    /// Not in the file: tests set it so that their queues disappear when unused.
    #[serde(default)]
    pub queue_expires_ms: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
    /// PostgreSQL settings for Dalil's own sessions, sent as each connection opens.
    #[serde(default)]
    pub session: BTreeMap<String, toml::Value>,
}

impl DatabaseSettings {
    /// `session` as PostgreSQL's startup `options`: `-c name=value` each, spaces and
    /// backslashes in a value escaped with a backslash (as `options` requires).
    pub fn session_options(&self) -> Vec<(String, String)> {
        self.session
            .iter()
            .filter_map(|(name, value)| Some((name.clone(), scalar(value)?)))
            .map(|(name, value)| (name, value.replace('\\', "\\\\").replace(' ', "\\ ")))
            .collect()
    }
}

/// A TOML string, number or boolean as PostgreSQL reads a setting's value; `None` otherwise.
fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(if *b { "on" } else { "off" }.into()),
        _ => None,
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ApiSettings {
    pub max_body_bytes: usize,
    pub max_page_size: i64,
    /// Writes of concurrent requests (submissions, SMS delivery reports) done in one statement,
    /// at most (group commit).
    pub group_items: usize,
    /// Bytes of content in one such statement, at most; a bigger submission is written alone.
    pub group_bytes: usize,
    /// Such statements in flight at once, per kind of write.
    pub group_concurrency: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RelaySettings {
    pub batch_size: i64,
    pub poll_interval_ms: u64,
    /// How long rows gather before a round once they are coming (milliseconds; 0, or missing
    /// from an older configuration file: no wait).
    #[serde(default)]
    pub batch_wait_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WorkerSettings {
    pub prefetch: u16,
    pub concurrency: usize,
    /// Batches in flight for the inbox queue, whose work is database writes only.
    pub inbox_concurrency: usize,
    /// Deliveries of one queue recorded together, at most.
    pub batch_size: usize,
    /// How long a batch that began on an idle queue waits for more deliveries (milliseconds;
    /// 0, or missing from an older configuration file: it does not wait).
    #[serde(default)]
    pub batch_wait_ms: u64,
    pub channels: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct IdentitySettings {
    pub public_key_file: PathBuf,
    pub issuer: String,
    pub audience: String,
    pub dev_keys: bool,
    pub dev_private_key_file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    pub origin: String,
    pub key_name: String,
    pub key_dir: PathBuf,
    pub signing_key_pem: SecretString,
    pub generate_key_if_missing: bool,
    /// How often a scheduler gives newly committed records their log indexes (milliseconds).
    pub sequence_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SmsSettings {
    pub provider: String,
    pub base_url: String,
    pub token: SecretString,
    pub report_secret: SecretString,
    pub sender: String,
    pub rate_per_second: u32,
    pub timeout_ms: u64,
    pub max_segments: usize,
    pub start_simulator: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EmailSettings {
    pub transport: String,
    pub file_dir: PathBuf,
    pub smtp_host: String,
    pub smtp_port: u16,
    pub tls: String,
    pub username: String,
    pub password: SecretString,
    pub from: String,
    pub pool_size: u32,
    pub timeout_ms: u64,
    pub dkim_domain: String,
    pub dkim_selector: String,
    pub dkim_private_key_file: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PostalSettings {
    pub unconfirmed_after_days: i32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSettings {
    pub secure_cookies: bool,
    pub session_idle_minutes: i32,
    pub session_max_hours: i32,
    pub code_ttl_seconds: i32,
    pub code_attempts: i32,
    pub codes_per_pinfl_per_hour: i64,
    pub codes_per_address_per_hour: i64,
    /// Behind a reverse proxy: the header it sets with the client's address (e.g.
    /// "x-forwarded-for"; its last entry is taken, the one the proxy added). Empty: the peer.
    pub client_address_header: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CallbackSettings {
    pub timeout_ms: u64,
    pub allow_http: bool,
    pub replay_limit: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    pub outbox_days: i32,
    pub callback_days: i32,
    pub timer_days: i32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSettings {
    pub escalation: String,
    pub deemed_delivery: String,
    pub retention: String,
    pub outbox_sweep: String,
    /// How often a scheduler looks for jobs that are due (milliseconds).
    pub tick_ms: u64,
    pub checkpoint: String,
    pub log_monitor: String,
    pub unconfirmed_letters: String,
}

impl SchedulerSettings {
    /// Every recurring job with its cron expression.
    pub fn jobs(&self) -> [(&'static str, &String); 7] {
        [
            ("escalation", &self.escalation),
            ("deemed_delivery", &self.deemed_delivery),
            ("checkpoint", &self.checkpoint),
            ("log_monitor", &self.log_monitor),
            ("unconfirmed_letters", &self.unconfirmed_letters),
            ("retention", &self.retention),
            ("outbox_sweep", &self.outbox_sweep),
        ]
    }
}

impl Settings {
    /// Defaults (file or built-in), then the process environment.
    pub fn load() -> anyhow::Result<Settings> {
        let text = match std::env::var_os("DALIL_CONFIG") {
            Some(path) => std::fs::read_to_string(&path)
                .with_context(|| format!("reading DALIL_CONFIG={}", PathBuf::from(&path).display()))?,
            None => std::fs::read_to_string("config/default.toml").unwrap_or_else(|_| BUILT_IN.into()),
        };
        Self::from_sources(&text, std::env::vars())
    }

    /// The built-in defaults with the given overrides: what tests use.
    pub fn from_sources(toml_text: &str, env: impl IntoIterator<Item = (String, String)>) -> anyhow::Result<Settings> {
        let mut root: toml::Value = toml::from_str(toml_text).context("parsing configuration")?;
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("DALIL_") else { continue };
            if rest == "CONFIG" {
                continue;
            }
            let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
            set_path(&mut root, &path, &value).with_context(|| format!("in {name}"))?;
        }
        let settings: Settings = root.try_into().context("configuration")?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if !self.database_url.expose_secret().starts_with("postgres") {
            bail!("database_url must be a postgres:// URL");
        }
        if !self.amqp_url.expose_secret().starts_with("amqp") {
            bail!("amqp_url must be an amqp:// URL");
        }
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            bail!("listen must be host:port with an IP address, got {:?}", self.listen);
        }
        if self.worker.concurrency == 0 || self.worker.inbox_concurrency == 0 || self.worker.prefetch == 0 {
            bail!("worker.concurrency, worker.inbox_concurrency and worker.prefetch must be at least 1");
        }
        // They gather a batch; a longer wait would only hold every item up under light load.
        if self.worker.batch_wait_ms > 1000 || self.relay.batch_wait_ms > 1000 {
            bail!("worker.batch_wait_ms and relay.batch_wait_ms must be at most 1000 (milliseconds)");
        }
        for (name, expr) in self.scheduler.jobs() {
            if let Err(e) = expr.parse::<cron::Schedule>() {
                bail!("scheduler.{name}: not a cron expression with seconds ({e})");
            }
        }
        if self.scheduler.tick_ms == 0 || self.callbacks.timeout_ms == 0 {
            bail!("scheduler.tick_ms and callbacks.timeout_ms must be at least 1");
        }
        if self.retention.outbox_days < 1 || self.retention.callback_days < 1 || self.retention.timer_days < 1 {
            bail!("retention: every period must be at least 1 day");
        }
        if !matches!(self.email.transport.as_str(), "smtp" | "file") {
            bail!("email.transport must be \"smtp\" or \"file\"");
        }
        if self.log.origin.trim().is_empty() || self.log.origin.contains('\n') {
            bail!("log.origin must be one non-empty line");
        }
        if self.log.key_name.is_empty() || self.log.key_name.contains([' ', '+', '\n']) {
            bail!("log.key_name must be non-empty, without spaces or +");
        }
        if !matches!(self.email.tls.as_str(), "none" | "starttls" | "tls") {
            bail!("email.tls must be \"none\", \"starttls\" or \"tls\"");
        }
        if self.email.from.parse::<lettre::message::Mailbox>().is_err() {
            bail!("email.from is not a mailbox, e.g. \"Dalil <noreply@dalil.uz>\"");
        }
        if self.sms.rate_per_second == 0 || self.sms.max_segments == 0 {
            bail!("sms.rate_per_second and sms.max_segments must be at least 1");
        }
        for (name, value) in &self.database.session {
            let plain_name = name.starts_with(|c: char| c.is_ascii_alphabetic())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
            if !plain_name {
                bail!("database.session: {name:?} is not a PostgreSQL setting's name");
            }
            match scalar(value) {
                Some(v) if !v.chars().any(char::is_control) => {}
                _ => bail!("database.session.{name}: expected a string, number or boolean on one line"),
            }
        }
        if !matches!(self.log_format.as_str(), "pretty" | "json") {
            bail!("log_format must be \"pretty\" or \"json\"");
        }
        Ok(())
    }

    /// The database URL with its password hidden, for logs.
    pub fn database_url_redacted(&self) -> String {
        redact(self.database_url.expose_secret())
    }

    pub fn amqp_url_redacted(&self) -> String {
        redact(self.amqp_url.expose_secret())
    }

    /// These settings with another database on the same server (the benchmark's, the demo's,
    /// `postgres` to create and drop them). The URL's options (`?host=/run/postgresql`,
    /// `?sslmode=…`) are kept.
    pub fn with_database(&self, name: &str) -> anyhow::Result<Settings> {
        let url = with_database(self.database_url.expose_secret(), name)?;
        Ok(Settings { database_url: SecretString::from(url), ..self.clone() })
    }
}

/// `postgres://u@h:5432/dalil?host=/run/postgresql` → `postgres://u@h:5432/NAME?host=/run/postgresql`.
pub fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let (_, rest) = base.split_once("://").context("database_url is not a URL")?;
    let server = match rest.find('/') {
        Some(at) => &base[..base.len() - rest.len() + at],
        None => base,
    };
    Ok(match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    })
}

/// `scheme://user:secret@host` → `scheme://user:***@host`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return "***".into() };
    match rest.split_once('@') {
        Some((auth, host)) => match auth.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => format!("{scheme}://{auth}@{host}"),
        },
        None => url.to_string(),
    }
}

/// Sets `path` in the document to `raw`, typed like the default it replaces. Unknown keys are
/// an error, so a misspelt variable does not silently do nothing.
fn set_path(root: &mut toml::Value, path: &[String], raw: &str) -> anyhow::Result<()> {
    // PostgreSQL's settings for Dalil's sessions: any name, the value as PostgreSQL reads it
    // (it checks both when the pool opens), whether or not the file has the section.
    if let [section, sub, name] = path {
        if section == "database" && sub == "session" {
            let database = root
                .as_table_mut()
                .and_then(|t| t.get_mut("database"))
                .and_then(toml::Value::as_table_mut)
                .context("unknown section \"database\"")?;
            let session = database.entry("session").or_insert_with(|| toml::Value::Table(Default::default()));
            let session = session.as_table_mut().context("database.session is not a section")?;
            session.insert(name.clone(), toml::Value::String(raw.into()));
            return Ok(());
        }
    }
    let mut node = root;
    for (i, key) in path.iter().enumerate() {
        let table = node.as_table_mut().context("not a section")?;
        if i + 1 < path.len() {
            node = table.get_mut(key).with_context(|| format!("unknown section {key:?}"))?;
            continue;
        }
        let new = match table.get(key) {
            Some(toml::Value::Integer(_)) => toml::Value::Integer(raw.parse().context("expected a whole number")?),
            Some(toml::Value::Boolean(_)) => toml::Value::Boolean(raw.parse().context("expected true or false")?),
            Some(toml::Value::Float(_)) => toml::Value::Float(raw.parse().context("expected a number")?),
            Some(toml::Value::Array(_)) => toml::Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.into()))
                    .collect(),
            ),
            Some(toml::Value::String(_)) => toml::Value::String(raw.into()),
            // Keys that an older file may lack but that the program knows (its default: 0).
            None if matches!(
                path.iter().map(String::as_str).collect::<Vec<_>>()[..],
                ["queue_expires_ms"] | ["worker" | "relay", "batch_wait_ms"]
            ) =>
            {
                toml::Value::Integer(raw.parse().context("expected a whole number")?)
            }
            _ => bail!("unknown configuration key {key:?}"),
        };
        table.insert(key.clone(), new);
        return Ok(());
    }
    bail!("empty variable name")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn another_database_keeps_the_server_and_the_options() {
        assert_eq!(with_database("postgres://u:pw@db:5432/dalil", "b").unwrap(), "postgres://u:pw@db:5432/b");
        assert_eq!(
            with_database("postgres://postgres@localhost/dalil?host=/run/postgresql", "b").unwrap(),
            "postgres://postgres@localhost/b?host=/run/postgresql"
        );
        assert_eq!(with_database("postgres://db?sslmode=require", "b").unwrap(), "postgres://db/b?sslmode=require");
        assert_eq!(with_database("postgres://db:5432", "b").unwrap(), "postgres://db:5432/b");
        assert!(with_database("dalil", "b").is_err());
    }

    #[test]
    fn environment_overrides_top_level_and_section_keys() {
        let s = Settings::from_sources(
            BUILT_IN,
            env(&[
                ("DALIL_DATABASE_URL", "postgres://u:pw@db:5432/x"),
                ("DALIL_LISTEN", "0.0.0.0:9000"),
                ("DALIL_WORKER__PREFETCH", "7"),
                ("DALIL_WORKER__CHANNELS", "inbox, sms"),
                ("OTHER", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(s.listen, "0.0.0.0:9000");
        assert_eq!(s.worker.prefetch, 7);
        assert_eq!(s.worker.channels, vec!["inbox", "sms"]);
        assert_eq!(s.database_url_redacted(), "postgres://u:***@db:5432/x");
    }

    #[test]
    fn misspelt_or_mistyped_variables_are_refused() {
        assert!(Settings::from_sources(BUILT_IN, env(&[("DALIL_LISTN", "x")])).is_err());
        assert!(Settings::from_sources(BUILT_IN, env(&[("DALIL_WORKER__PREFETCH", "many")])).is_err());
        assert!(Settings::from_sources(BUILT_IN, env(&[("DALIL_LISTEN", "nowhere")])).is_err());
    }

    #[test]
    fn session_settings_are_sent_escaped_and_checked() {
        let s = Settings::from_sources(BUILT_IN, env(&[])).unwrap();
        assert_eq!(s.database.session_options(), [("random_page_cost".to_string(), "1.1".to_string())]);
        let s = Settings::from_sources(
            BUILT_IN,
            env(&[
                ("DALIL_DATABASE__SESSION__RANDOM_PAGE_COST", "4"),
                ("DALIL_DATABASE__SESSION__SEARCH_PATH", r"dalil a\b"),
            ]),
        )
        .unwrap();
        assert_eq!(
            s.database.session_options(),
            [
                ("random_page_cost".to_string(), "4".to_string()),
                ("search_path".to_string(), r"dalil\ a\\b".to_string())
            ]
        );
        // A file without the section (an operator's own, older one) still takes the variables,
        // and a variable's value is PostgreSQL's to read, whatever type the file gave the key.
        let without = BUILT_IN.replace("[database.session]", "").replace("random_page_cost = 1.1", "");
        let s = Settings::from_sources(&without, env(&[])).unwrap();
        assert!(s.database.session_options().is_empty());
        let s = Settings::from_sources(&without, env(&[("DALIL_DATABASE__SESSION__WORK_MEM", "64MB")])).unwrap();
        assert_eq!(s.database.session_options(), [("work_mem".to_string(), "64MB".to_string())]);
        let with_number = BUILT_IN.replace("random_page_cost = 1.1", "work_mem = 4096");
        let s = Settings::from_sources(&with_number, env(&[("DALIL_DATABASE__SESSION__WORK_MEM", "64MB")])).unwrap();
        assert_eq!(s.database.session_options(), [("work_mem".to_string(), "64MB".to_string())]);
        let file = BUILT_IN.replace("random_page_cost = 1.1", "jit = false\nwork_mem = 4096");
        let s = Settings::from_sources(&file, env(&[])).unwrap();
        let sent = s.database.session_options();
        assert_eq!(sent, [("jit".to_string(), "off".to_string()), ("work_mem".to_string(), "4096".to_string())]);
        let tab = env(&[("DALIL_DATABASE__SESSION__RANDOM_PAGE_COST", "1.1\t")]);
        assert!(Settings::from_sources(BUILT_IN, tab).is_err(), "a control character");
        let bad_name = BUILT_IN.replace("random_page_cost = 1.1", "\"work mem\" = 1");
        assert!(Settings::from_sources(&bad_name, env(&[])).is_err());
        let not_scalar = BUILT_IN.replace("random_page_cost = 1.1", "random_page_cost = [1]");
        assert!(Settings::from_sources(&not_scalar, env(&[])).is_err());
    }

    #[test]
    fn batch_waits_default_to_none_in_an_older_file_and_are_bounded() {
        let s = Settings::from_sources(BUILT_IN, env(&[])).unwrap();
        assert_eq!((s.worker.batch_wait_ms, s.relay.batch_wait_ms), (50, 20));
        let older = BUILT_IN.replace("batch_wait_ms = 50", "").replace("batch_wait_ms = 20", "");
        assert_ne!(older, BUILT_IN);
        let s = Settings::from_sources(&older, env(&[])).unwrap();
        assert_eq!((s.worker.batch_wait_ms, s.relay.batch_wait_ms), (0, 0));
        let vars = env(&[("DALIL_WORKER__BATCH_WAIT_MS", "30"), ("DALIL_RELAY__BATCH_WAIT_MS", "10")]);
        let s = Settings::from_sources(&older, vars).unwrap();
        assert_eq!((s.worker.batch_wait_ms, s.relay.batch_wait_ms), (30, 10));
        // Only where the program knows the key.
        assert!(Settings::from_sources(&older, env(&[("DALIL_API__BATCH_WAIT_MS", "30")])).is_err());
        assert!(Settings::from_sources(BUILT_IN, env(&[("DALIL_WORKER__BATCH_WAIT_MS", "1001")])).is_err());
        assert!(Settings::from_sources(BUILT_IN, env(&[("DALIL_RELAY__BATCH_WAIT_MS", "5000")])).is_err());
    }

    #[test]
    fn secrets_are_not_in_debug_output() {
        let s = Settings::from_sources(BUILT_IN, env(&[("DALIL_AMQP_URL", "amqp://u:hunter2@h/%2f")])).unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
