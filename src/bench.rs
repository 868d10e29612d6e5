//! `dalil bench`: end-to-end throughput, like `pgbench` or `redis-benchmark`.
//!
//! It starts Dalil as separate processes of this binary (`dalil all`, or `serve`, `relay`,
//! `scheduler` and K `worker`s) on a fresh database and queue prefix of its own, with an SMS
//! gateway simulator in this process. It creates an agency and recipients, drives N items
//! through the HTTP API with C concurrent clients, and measures:
//!
//! - accepted items/s and the latency of `POST /v1/correspondence` (to the `202`);
//! - end-to-end items/s and latency from submission to ContentConsignment in the inbox, and to
//!   the SMS notice accepted by the gateway;
//! - peak RSS and CPU seconds of the Dalil processes;
//! - the raw ceilings of the same machine in the same run: three-row insert transactions/s on
//!   the same PostgreSQL, and confirmed 1 KB publishes/s on the same RabbitMQ.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Settings;

pub struct Options {
    pub items: usize,
    /// Send for this long instead of a number of items (`items` is then ignored).
    pub seconds: Option<u64>,
    /// Send at this rate (items/s), with at most `clients` requests in flight, instead of
    /// `clients` clients each sending as fast as it is answered.
    pub rate: Option<f64>,
    pub clients: usize,
    /// Items per request: 1 through `POST /v1/correspondence`, more through its batch.
    pub batch: usize,
    /// Worker processes; 0 runs everything in one `dalil all` process.
    pub workers: usize,
    /// Seconds each raw ceiling is measured for.
    pub ceiling_seconds: u64,
    pub json: Option<PathBuf>,
    pub keep: bool,
    /// The `dalil` binary to start (this one, normally).
    pub binary: PathBuf,
    /// Print the progress bar and the table.
    pub print: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

fn latency(mut ms: Vec<f64>) -> Latency {
    if ms.is_empty() {
        return Latency { p50_ms: 0.0, p95_ms: 0.0, p99_ms: 0.0, max_ms: 0.0 };
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
    Latency { p50_ms: at(0.50), p95_ms: at(0.95), p99_ms: at(0.99), max_ms: ms[ms.len() - 1] }
}

/// The backlog of a run from each item's acceptance and delivery times: its peak, and its
/// growth per second over the second half of the sending (least squares over 100-ms samples;
/// the first half holds the warm-up, while the backlog rises to its working level).
pub fn backlog(pairs: &[(DateTime<Utc>, DateTime<Utc>)]) -> (usize, f64) {
    let mut accepted: Vec<DateTime<Utc>> = pairs.iter().map(|(a, _)| *a).collect();
    let mut delivered: Vec<DateTime<Utc>> = pairs.iter().map(|(_, d)| *d).collect();
    accepted.sort();
    delivered.sort();
    let (Some(first), Some(last)) = (accepted.first().copied(), accepted.last().copied()) else { return (0, 0.0) };
    let at =
        |t: DateTime<Utc>| accepted.partition_point(|a| *a <= t) as f64 - delivered.partition_point(|d| *d <= t) as f64;
    let step = chrono::Duration::milliseconds(100);
    let mut samples: Vec<(f64, f64)> = Vec::new();
    let mut t = first;
    while t <= last {
        samples.push(((t - first).num_milliseconds() as f64 / 1000.0, at(t)));
        t += step;
    }
    let peak = samples.iter().map(|(_, b)| *b).fold(at(last), f64::max).max(0.0) as usize;
    let half = samples.len() / 2;
    let samples = &samples[half..];
    if samples.len() < 2 {
        return (peak, 0.0);
    }
    let n = samples.len() as f64;
    let (mx, my) = samples.iter().fold((0.0, 0.0), |(x, y), (a, b)| (x + a / n, y + b / n));
    let (sxy, sxx) =
        samples.iter().fold((0.0, 0.0), |(xy, xx), (a, b)| (xy + (a - mx) * (b - my), xx + (a - mx).powi(2)));
    (peak, if sxx > 0.0 { sxy / sxx } else { 0.0 })
}

/// The records a benchmark item leaves: SubmissionAcceptance, ContentConsignment,
/// ConsignmentNotification and NotificationDelivered.
const EVIDENCE_PER_ITEM: usize = 4;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Items sent (with --seconds, as many as the clients managed).
    pub items: usize,
    /// How long items were sent for, when the run was given a time.
    pub seconds: Option<u64>,
    /// The rate items were offered at (items/s), when the run was given one.
    pub offered_per_second: Option<f64>,
    pub clients: usize,
    /// Items per request (1: each alone; more: `POST /v1/correspondence/batch`). Each item's
    /// accept latency is its request's.
    pub batch: usize,
    pub worker_processes: usize,
    pub accepted: usize,
    pub refused: usize,
    pub accepted_per_second: f64,
    pub accept_latency: Latency,
    pub consigned: usize,
    pub sms_sent: usize,
    /// Evidence records written, and how many of them the log holds (all of them: the run
    /// waits for the sequencer and fails if it does not catch up).
    pub evidence_records: usize,
    pub evidence_in_log: usize,
    pub end_to_end_per_second: f64,
    pub consign_latency: Latency,
    pub sms_latency: Latency,
    /// Items accepted and not yet in the inbox: the most at any moment of the run.
    pub backlog_peak: usize,
    /// How fast that backlog grew in the second half of the sending (least squares over 100-ms
    /// samples); about 0 when delivery keeps up, the shortfall in items/s when it does not.
    pub backlog_growth_per_second: f64,
    pub peak_rss_mib: f64,
    pub cpu_seconds: f64,
    /// CPU the whole machine was busy for from the first item sent until the last record was
    /// in the log (every process: Dalil, PostgreSQL, RabbitMQ, this load generator, the SMS
    /// simulator, anything else running), in CPU-seconds, and per accepted item in ms. What
    /// an item costs the machine end to end; `None` where /proc/stat is not there to read.
    pub machine_cpu_seconds: Option<f64>,
    pub machine_cpu_ms_per_item: Option<f64>,
    /// Bytes of WAL the PostgreSQL server wrote over the same span, per accepted item: what an
    /// item costs the database in writes (rows, index entries, their headers), which the
    /// machine's speed does not move. The whole server's (its WAL insert position), so other
    /// databases' writes count too; `None` if the server does not say.
    pub wal_bytes_per_item: Option<f64>,
    pub pg_three_row_tx_per_second: f64,
    pub rabbitmq_confirmed_publishes_per_second: f64,
    pub accepted_ratio_to_pg: f64,
    pub end_to_end_ratio_to_pg: f64,
}

/// The Dalil processes under test, stopped (SIGTERM, then SIGKILL) on drop.
struct Fleet {
    children: Vec<(String, Child)>,
}

impl Fleet {
    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|(_, c)| c.id()).collect()
    }

    fn alive(&mut self) -> anyhow::Result<()> {
        for (role, c) in &mut self.children {
            if let Some(status) = c.try_wait()? {
                bail!("dalil {role} exited during the benchmark: {status}");
            }
        }
        Ok(())
    }

    async fn stop(&mut self) {
        for (_, c) in &self.children {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        }
        for _ in 0..100 {
            if self.children.iter_mut().all(|(_, c)| c.try_wait().ok().flatten().is_some()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The server's WAL insert position, in bytes. Not `pg_stat_wal`: each backend adds its WAL to
/// those statistics only when it reports them (at most once a second, later when idle), so a
/// run of a few seconds read only part of its own WAL there (1.5 KiB per item of about 12).
async fn wal_bytes(pool: &PgPool) -> Option<f64> {
    sqlx::query_scalar::<_, f64>("select (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::float8")
        .fetch_one(pool)
        .await
        .ok()
}

/// CPU-seconds the machine has been busy since boot (all CPUs: user, nice, system, irq and
/// softirq time from /proc/stat; idle, I/O wait and time stolen by a hypervisor are not).
fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    busy_seconds(stat.lines().next()?)
}

/// The busy CPU-seconds of /proc/stat's first line (`cpu  user nice system idle iowait irq
/// softirq steal …`, in clock ticks of 1/100 s).
fn busy_seconds(cpu_line: &str) -> Option<f64> {
    let mut fields = cpu_line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let ticks: Vec<u64> = fields.take(7).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    let [user, nice, system, _idle, _iowait, irq, softirq] = ticks[..] else { return None };
    Some((user + nice + system + irq + softirq) as f64 / 100.0)
}

/// Peak resident set (VmHWM, KiB) and CPU seconds (utime + stime) of a process, from /proc.
fn usage(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name; clock ticks
    // are 100 per second on Linux (USER_HZ).
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    (hwm, ticks as f64 / 100.0)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub async fn run(base: &Settings, o: Options) -> anyhow::Result<Report> {
    anyhow::ensure!(o.items > 0 && o.clients > 0, "--items and --clients must be at least 1");
    anyhow::ensure!(
        (1..=crate::api::batch::MAX_BATCH_ITEMS).contains(&o.batch),
        "--batch must be 1 to {}",
        crate::api::batch::MAX_BATCH_ITEMS
    );
    anyhow::ensure!(o.seconds != Some(0), "--seconds must be at least 1");
    anyhow::ensure!(o.rate.is_none_or(|r| r.is_finite() && r > 0.0), "--rate must be more than 0 items/s");
    let stamp = format!("{}_{}", Utc::now().format("%Y%m%d_%H%M%S"), &Uuid::new_v4().simple().to_string()[..6]);
    let db_name = format!("dalil_bench_{stamp}");
    let dir = std::env::temp_dir().join(format!("dalil-bench-{stamp}"));
    std::fs::create_dir_all(&dir)?;
    let mut s = base.with_database(&db_name)?;
    s.queue_prefix = format!("bench-{stamp}.");
    s.queue_expires_ms = Some(600_000);
    s.database.max_connections = 32;
    let topology = match crate::db::migrate(&s).await {
        Ok(()) => crate::app::declare_topology(&s).await,
        Err(e) => Err(e),
    };
    let result = match &topology {
        Ok(_) => bench(&s, &o, &dir).await,
        Err(e) => Err(anyhow::anyhow!("preparing the benchmark's database {db_name} and its queues: {e:#}")),
    };
    // Clean up, whatever happened (a run that could not even start leaves nothing either).
    if let Ok(topology) = &topology {
        if let Ok(conn) = crate::queue::connect(s.amqp_url.expose_secret(), "dalil-bench-cleanup").await {
            if let Ok(ch) = conn.create_channel().await {
                let _ = topology.delete(&ch).await;
            }
            let _ = conn.close(200, "bye".into()).await;
        }
    }
    if !o.keep {
        let admin = crate::db::connect(&s.with_database("postgres")?).await?;
        sqlx::query(&format!("drop database if exists {db_name} with (force)")).execute(&admin).await?;
    } else if o.print {
        println!("kept database {db_name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let report = result?;
    if let Some(path) = &o.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if o.print {
        print!("{}", table(&report));
    }
    Ok(report)
}

async fn bench(s: &Settings, o: &Options, dir: &std::path::Path) -> anyhow::Result<Report> {
    let cancel = CancellationToken::new();
    let sim = crate::sim::Simulator::new("bench-sms-token", "bench-report-secret", true);
    let sim_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim_url = format!("http://{}", sim_listener.local_addr()?);
    tokio::spawn(sim.clone().serve(sim_listener, cancel.clone()));
    let _stop_sim = cancel.clone().drop_guard();

    let port = free_port()?;
    let env: Vec<(String, String)> = vec![
        ("DALIL_DATABASE_URL".into(), s.database_url.expose_secret().to_string()),
        ("DALIL_AMQP_URL".into(), s.amqp_url.expose_secret().to_string()),
        ("DALIL_QUEUE_PREFIX".into(), s.queue_prefix.clone()),
        ("DALIL_QUEUE_EXPIRES_MS".into(), "600000".into()),
        ("DALIL_LISTEN".into(), format!("127.0.0.1:{port}")),
        ("DALIL_PUBLIC_URL".into(), format!("http://127.0.0.1:{port}")),
        ("DALIL_TEMPLATES_DIR".into(), s.templates_dir.display().to_string()),
        ("DALIL_POLICIES_FILE".into(), s.policies_file.display().to_string()),
        ("DALIL_TOPOLOGY_FILE".into(), s.topology_file.display().to_string()),
        ("DALIL_SMS__BASE_URL".into(), sim_url),
        ("DALIL_SMS__TOKEN".into(), "bench-sms-token".into()),
        ("DALIL_SMS__REPORT_SECRET".into(), "bench-report-secret".into()),
        ("DALIL_SMS__START_SIMULATOR".into(), "false".into()),
        ("DALIL_SMS__RATE_PER_SECOND".into(), "100000".into()),
        ("DALIL_IDENTITY__PUBLIC_KEY_FILE".into(), dir.join("idp.pub.pem").display().to_string()),
        ("DALIL_IDENTITY__DEV_PRIVATE_KEY_FILE".into(), dir.join("idp.pem").display().to_string()),
        ("DALIL_LOG__KEY_DIR".into(), dir.join("log-keys").display().to_string()),
        // Quiet unless RUST_LOG asks for more.
        ("RUST_LOG".into(), std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,lapin=off".into())),
    ];
    let roles: Vec<Vec<&str>> = if o.workers == 0 {
        vec![vec!["all"]]
    } else {
        let mut r = vec![vec!["serve"], vec!["relay"], vec!["scheduler"]];
        r.extend((0..o.workers).map(|_| vec!["worker"]));
        r
    };
    // Each process has its own pool. The API's comes from the configuration; the others are
    // sized by role so that together they stay within PostgreSQL's max_connections (100 by
    // default: seven processes of 32 would not, and their pools would time out).
    let pool_for = |role: &str| match role {
        "worker" => 12,
        "relay" | "scheduler" => 4,
        _ => 0,
    };
    let mut fleet = Fleet { children: Vec::new() };
    for args in roles {
        let mut command = Command::new(&o.binary);
        if pool_for(args[0]) > 0 {
            command.env("DALIL_DATABASE__MAX_CONNECTIONS", pool_for(args[0]).to_string());
        }
        let child = command
            .args(&args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {} {}", o.binary.display(), args.join(" ")))?;
        fleet.children.push((args.join(" "), child));
    }
    let base_url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder().pool_max_idle_per_host(o.clients).build()?;
    let ready = Instant::now();
    loop {
        fleet.alive()?;
        if http.get(format!("{base_url}/readyz")).send().await.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        if ready.elapsed() > Duration::from_secs(60) {
            bail!("dalil did not become ready in 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let pool = crate::db::connect(s).await?;
    // With --seconds, as many items as the clients manage in that time.
    let total = if o.seconds.is_some() { usize::MAX } else { o.items };
    let recipients = total.min(1000);
    let key = setup(&pool, recipients).await?;

    // Drive.
    let done = Arc::new(AtomicUsize::new(0));
    let busy_before = machine_busy_seconds();
    let wal_before = wal_bytes(&pool).await;
    let started = Instant::now();
    use std::io::IsTerminal;
    // A progress bar on a terminal; in a log file it would be noise.
    let progress = if o.print && std::io::stderr().is_terminal() {
        let goal = match o.seconds {
            Some(secs) => Goal::Seconds(secs),
            None => Goal::Items(o.items),
        };
        Some(tokio::spawn(progress_bar(pool.clone(), sim.clone(), done.clone(), goal, started)))
    } else {
        None
    };
    let stop_at = o.seconds.map(|secs| started + Duration::from_secs(secs));
    let submit = Submitter { http: http.clone(), url: base_url.clone(), key: key.clone(), recipients, batch: o.batch };
    let (accept_ms, refused) = match o.rate {
        None => closed_loop(&submit, o.clients, total, stop_at, &done).await?,
        Some(rate) => open_loop(&submit, rate, o.clients, total, stop_at, &done, started).await?,
    };
    let accept_elapsed = started.elapsed().as_secs_f64();
    let accepted = accept_ms.len();
    let sent = accepted + refused;

    // Wait until every accepted item is in its inbox and its SMS at the gateway.
    let deadline = Instant::now() + Duration::from_secs(120 + sent as u64 / 100);
    loop {
        fleet.alive()?;
        // One inbox row per deposited item: cheaper to count than the evidence.
        let consigned: i64 = sqlx::query_scalar("select count(*) from inbox_entry").fetch_one(&pool).await?;
        let sms = sim.messages().await.len();
        if consigned as usize >= accepted && sms >= accepted {
            break;
        }
        if Instant::now() > deadline {
            bail!("after the wait, {consigned} of {accepted} items were consigned and {sms} SMS sent");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(p) = progress {
        p.abort();
        eprintln!();
    }
    let (rss_kib, cpu) = fleet.pids().into_iter().map(usage).fold((0, 0.0), |(r, c), (r2, c2)| (r + r2, c + c2));
    // Every item's four records (acceptance, consignment, notification, the gateway's delivery
    // report) written, and every record in the log: the scheduler's sequencer gives them their
    // indexes a moment after they commit. A run whose evidence falls short is a failure, not
    // a figure.
    let expected = EVIDENCE_PER_ITEM * accepted;
    let (records, in_log) = loop {
        fleet.alive()?;
        let records: i64 = sqlx::query_scalar("select count(*) from evidence").fetch_one(&pool).await?;
        let (unsequenced, _) = crate::log::sequencing_lag(&pool).await?;
        let in_log: i64 = sqlx::query_scalar("select count(*) from log_entry").fetch_one(&pool).await?;
        if records as usize >= expected && unsequenced == 0 {
            break (records as usize, in_log as usize);
        }
        if Instant::now() > deadline {
            bail!(
                "after the wait, {records} of {expected} evidence records were written and {unsequenced} of them \
                 were still not in the log (is the scheduler's sequencer failing? see the log above)"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let machine_cpu_seconds = busy_before.zip(machine_busy_seconds()).map(|(before, after)| after - before);
    let wal = match wal_before {
        Some(before) => wal_bytes(&pool).await.map(|after| after - before),
        None => None,
    };
    fleet.stop().await;

    // End-to-end figures from the database (server clock) and the simulator.
    let consign: Vec<(DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "select i.created_at, e.at from item i join evidence e on e.item_id = i.id and e.event = 'ContentConsignment'",
    )
    .fetch_all(&pool)
    .await?;
    let attempts: Vec<(Uuid, DateTime<Utc>)> = sqlx::query_as(
        "select a.id, i.created_at from attempt a join item i on i.id = a.item_id where a.channel = 'sms'",
    )
    .fetch_all(&pool)
    .await?;
    let created: HashMap<String, DateTime<Utc>> = attempts.into_iter().map(|(a, c)| (a.to_string(), c)).collect();
    let messages = sim.messages().await;
    let sms_ms: Vec<f64> = messages
        .iter()
        .filter_map(|m| {
            created
                .get(&m.request.client_ref)
                .map(|c| (m.received_at - *c).num_microseconds().unwrap_or(0) as f64 / 1000.0)
        })
        .collect();
    let first = consign.iter().map(|(c, _)| *c).min();
    let last = consign.iter().map(|(_, e)| *e).chain(messages.iter().map(|m| m.received_at)).max();
    let e2e_seconds = match (first, last) {
        (Some(f), Some(l)) => (l - f).num_microseconds().unwrap_or(1) as f64 / 1e6,
        _ => f64::NAN,
    };
    let consign_ms: Vec<f64> =
        consign.iter().map(|(c, e)| (*e - *c).num_microseconds().unwrap_or(0) as f64 / 1000.0).collect();
    let (backlog_peak, backlog_growth_per_second) = backlog(&consign);

    // The raw ceilings, with Dalil stopped.
    let pg = pg_ceiling(&pool, o.clients.min(16), Duration::from_secs(o.ceiling_seconds)).await?;
    let mq = rabbitmq_ceiling(s, Duration::from_secs(o.ceiling_seconds)).await?;
    pool.close().await;

    let accepted_per_second = accepted as f64 / accept_elapsed;
    let end_to_end_per_second = consign.len() as f64 / e2e_seconds;
    Ok(Report {
        items: sent,
        seconds: o.seconds,
        offered_per_second: o.rate,
        clients: o.clients,
        batch: o.batch,
        worker_processes: o.workers,
        accepted,
        refused,
        accepted_per_second,
        accept_latency: latency(accept_ms),
        consigned: consign.len(),
        sms_sent: messages.len(),
        evidence_records: records,
        evidence_in_log: in_log,
        end_to_end_per_second,
        consign_latency: latency(consign_ms),
        sms_latency: latency(sms_ms),
        backlog_peak,
        backlog_growth_per_second,
        peak_rss_mib: rss_kib as f64 / 1024.0,
        cpu_seconds: cpu,
        machine_cpu_seconds,
        machine_cpu_ms_per_item: machine_cpu_seconds.filter(|_| accepted > 0).map(|c| c * 1000.0 / accepted as f64),
        wal_bytes_per_item: wal.filter(|_| accepted > 0).map(|w| w / accepted as f64),
        pg_three_row_tx_per_second: pg,
        rabbitmq_confirmed_publishes_per_second: mq,
        accepted_ratio_to_pg: accepted_per_second / pg,
        end_to_end_ratio_to_pg: end_to_end_per_second / pg,
    })
}

/// Sends items to the API.
#[derive(Clone)]
struct Submitter {
    http: reqwest::Client,
    url: String,
    key: String,
    recipients: usize,
    /// Items per request.
    batch: usize,
}

impl Submitter {
    /// Submits items `first..end` (one request: alone, or as a batch); `Ok` when they were
    /// accepted (202), else why not.
    async fn send(&self, first: usize, end: usize) -> Result<(), String> {
        let request = if self.batch == 1 {
            self.http
                .post(format!("{}/v1/correspondence", self.url))
                .header("Idempotency-Key", format!("bench-{first}"))
                .json(&item(first, self.recipients))
        } else {
            let items: Vec<serde_json::Value> = (first..end)
                .map(|i| {
                    let mut item = item(i, self.recipients);
                    item["idempotency_key"] = format!("bench-{i}").into();
                    item
                })
                .collect();
            self.http.post(format!("{}/v1/correspondence/batch", self.url)).json(&json!({ "items": items }))
        };
        let what = if end - first == 1 { format!("item {first}") } else { format!("items {first}..{end}") };
        match request.bearer_auth(&self.key).send().await {
            Ok(r) if r.status().as_u16() == 202 => Ok(()),
            Ok(r) => Err(format!("{what} refused: {} {}", r.status(), r.text().await.unwrap_or_default())),
            Err(e) => Err(format!("{what} failed: {e}")),
        }
    }
}

/// What a sending task brings back: the accept latency (ms) of each item accepted, and for each
/// request refused, how many items it carried and why.
type Sent = (Vec<f64>, Vec<(usize, String)>);

/// Accept latencies (ms) of the accepted items and how many were refused, from the tasks that
/// sent them; the first refusal is printed.
async fn gather(mut tasks: tokio::task::JoinSet<Sent>) -> anyhow::Result<(Vec<f64>, usize)> {
    let (mut accept_ms, mut refused) = (Vec::new(), 0);
    let mut first = None;
    while let Some(r) = tasks.join_next().await {
        let (l, f) = r?;
        accept_ms.extend(l);
        refused += f.iter().map(|(n, _)| n).sum::<usize>();
        first = first.or(f.into_iter().next().map(|(_, why)| why));
    }
    if let Some(why) = first {
        eprintln!("\nbench: {why}");
    }
    Ok((accept_ms, refused))
}

/// `clients` clients, each sending its next item as soon as the last one is answered: the
/// rate is what the server sustains, and latency grows with the clients (Little's law).
async fn closed_loop(
    submit: &Submitter,
    clients: usize,
    total: usize,
    stop_at: Option<Instant>,
    done: &Arc<AtomicUsize>,
) -> anyhow::Result<(Vec<f64>, usize)> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (submit, next, done) = (submit.clone(), next.clone(), done.clone());
        tasks.spawn(async move {
            let (mut latencies, mut refused) = (Vec::new(), Vec::new());
            loop {
                if stop_at.is_some_and(|at| Instant::now() >= at) {
                    break;
                }
                let first = next.fetch_add(submit.batch, Ordering::Relaxed);
                if first >= total {
                    break;
                }
                let end = total.min(first + submit.batch);
                let t = Instant::now();
                match submit.send(first, end).await {
                    Ok(()) => latencies.extend(std::iter::repeat_n(t.elapsed().as_secs_f64() * 1000.0, end - first)),
                    Err(why) => refused.push((end - first, why)),
                }
                done.fetch_add(end - first, Ordering::Relaxed);
            }
            (latencies, refused)
        });
    }
    gather(tasks).await
}

/// Items sent at a fixed rate, whatever the answers (at most `in_flight` at once). Each
/// latency counts from the moment its item was due, so time spent waiting for a slot counts
/// too: a server that falls behind cannot hide it (no coordinated omission).
async fn open_loop(
    submit: &Submitter,
    rate: f64,
    in_flight: usize,
    total: usize,
    stop_at: Option<Instant>,
    done: &Arc<AtomicUsize>,
    started: Instant,
) -> anyhow::Result<(Vec<f64>, usize)> {
    let slots = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let mut tasks = tokio::task::JoinSet::new();
    // A batch is due when its first item is.
    for first in (0..total).step_by(submit.batch) {
        let due = started + Duration::from_secs_f64(first as f64 / rate);
        if stop_at.is_some_and(|at| due >= at) {
            break;
        }
        let end = total.min(first + submit.batch);
        tokio::time::sleep_until(due.into()).await;
        let slot = slots.clone().acquire_owned().await?;
        let (submit, done) = (submit.clone(), done.clone());
        tasks.spawn(async move {
            let r = submit.send(first, end).await;
            let ms = due.elapsed().as_secs_f64() * 1000.0;
            drop(slot);
            done.fetch_add(end - first, Ordering::Relaxed);
            match r {
                Ok(()) => (vec![ms; end - first], Vec::new()),
                Err(why) => (Vec::new(), vec![(end - first, why)]),
            }
        });
    }
    gather(tasks).await
}

/// The bench's agency, its key, and recipients with a phone (so each item sends an SMS).
async fn setup(pool: &PgPool, items: usize) -> anyhow::Result<String> {
    crate::admin::agency_create(pool, "bench-agency", "Benchmark agency").await?;
    let key = crate::admin::api_key_create(pool, "bench-agency").await?["key"].as_str().unwrap_or_default().to_string();
    let n = items.min(1000);
    let pinfls: Vec<String> =
        (0..n).map(|i| crate::domain::Pinfl::with_check_digit(&format!("31{i:011}")).to_string()).collect();
    let phones: Vec<String> = (0..n).map(|i| format!("+99890{:07}", 1_000_000 + i)).collect();
    sqlx::query(
        "insert into recipient (id, pinfl, name, phone, digital_consent)
         select gen_random_uuid(), p, 'Bench recipient', ph, true from unnest($1::text[], $2::text[]) as x(p, ph)",
    )
    .bind(&pinfls)
    .bind(&phones)
    .execute(pool)
    .await?;
    Ok(key)
}

fn item(i: usize, recipients: usize) -> serde_json::Value {
    let pinfl = crate::domain::Pinfl::with_check_digit(&format!("31{:011}", i % recipients)).to_string();
    json!({
        "kind": "notification",
        "recipient": { "pinfl": pinfl },
        "template": "notice",
        "language": "uz-Latn",
        "reference": format!("B-{i}"),
        "personalisation": {
            "title": "Murojaatingiz koʻrib chiqildi",
            "body": "Hurmatli fuqaro, murojaatingiz koʻrib chiqildi va qaror qabul qilindi. Batafsil maʼlumot ilova qilingan."
        }
    })
}

/// What a run is sending towards: a number of items, or a time.
enum Goal {
    Items(usize),
    Seconds(u64),
}

async fn progress_bar(pool: PgPool, sim: crate::sim::Simulator, done: Arc<AtomicUsize>, goal: Goal, started: Instant) {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let accepted = done.load(Ordering::Relaxed);
        let consigned: i64 = sqlx::query_scalar("select count(*) from inbox_entry").fetch_one(&pool).await.unwrap_or(0);
        let sms = sim.messages().await.len();
        let width = 30;
        let secs = started.elapsed().as_secs_f64();
        let (filled, of) = match goal {
            Goal::Items(total) => ((consigned as usize).min(total) * width / total, format!("/{total}")),
            Goal::Seconds(s) => (((secs / s as f64).min(1.0) * width as f64) as usize, String::new()),
        };
        eprint!(
            "\r[{}{}] submitted {accepted}{of} ({:.0}/s)  in inbox {consigned} (backlog {})  SMS {sms}  {secs:.1}s   ",
            "=".repeat(filled),
            " ".repeat(width - filled),
            accepted as f64 / secs,
            accepted.saturating_sub(consigned as usize),
        );
    }
}

/// Three-row insert transactions per second on the same PostgreSQL: `clients` connections,
/// each BEGIN; three INSERTs; COMMIT, for `span`.
async fn pg_ceiling(pool: &PgPool, clients: usize, span: Duration) -> anyhow::Result<f64> {
    sqlx::query("drop table if exists bench_ceiling").execute(pool).await?;
    sqlx::query("create table bench_ceiling (id bigserial primary key, a uuid not null, b text not null, at timestamptz not null default now())")
        .execute(pool)
        .await?;
    let count = Arc::new(AtomicUsize::new(0));
    let until = Instant::now() + span;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (pool, count) = (pool.clone(), count.clone());
        tasks.spawn(async move {
            while Instant::now() < until {
                let mut tx = pool.begin().await?;
                for _ in 0..3 {
                    sqlx::query("insert into bench_ceiling (a, b) values ($1, $2)")
                        .bind(Uuid::new_v4())
                        .bind("x".repeat(100))
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, sqlx::Error>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    sqlx::query("drop table bench_ceiling").execute(pool).await?;
    Ok(count.load(Ordering::Relaxed) as f64 / span.as_secs_f64())
}

/// Confirmed 1 KB publishes per second to a quorum queue on the same RabbitMQ, pipelined.
async fn rabbitmq_ceiling(s: &Settings, span: Duration) -> anyhow::Result<f64> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions};
    use lapin::types::{AMQPValue, FieldTable, ShortString};
    let conn = crate::queue::connect(s.amqp_url.expose_secret(), "dalil-bench-ceiling").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let queue = format!("{}ceiling", s.queue_prefix);
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-queue-type"), AMQPValue::LongString("quorum".into()));
    ch.queue_declare(
        ShortString::from(queue.as_str()),
        QueueDeclareOptions { durable: true, ..Default::default() },
        args,
    )
    .await?;
    let body = vec![b'x'; 1024];
    let started = Instant::now();
    let mut confirmed = 0usize;
    let window = 500;
    while started.elapsed() < span {
        let mut pending = Vec::with_capacity(window);
        for _ in 0..window {
            pending.push(
                ch.basic_publish(
                    ShortString::from(""),
                    ShortString::from(queue.as_str()),
                    BasicPublishOptions::default(),
                    &body,
                    lapin::BasicProperties::default().with_delivery_mode(2),
                )
                .await?,
            );
        }
        for p in pending {
            if p.await?.is_ack() {
                confirmed += 1;
            }
        }
    }
    let rate = confirmed as f64 / started.elapsed().as_secs_f64();
    let _ = ch.queue_delete(ShortString::from(queue.as_str()), QueueDeleteOptions::default()).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(rate)
}

/// The report as one table, each figure with its target and its ratio to the ceilings.
pub fn table(r: &Report) -> String {
    let mut out = String::new();
    let row = |out: &mut String, what: &str, value: String, note: String| {
        out.push_str(&format!("  {what:<44} {value:>14}   {note}\n"));
    };
    out.push_str(&format!(
        "\nDalil bench: {} items{}, {}, {}\n\n",
        r.items,
        r.seconds.map(|s| format!(" in {s} s")).unwrap_or_default(),
        match r.offered_per_second {
            Some(rate) => format!("offered at {rate:.0}/s (at most {} requests in flight)", r.clients),
            None => format!("{} clients", r.clients),
        } + &if r.batch > 1 { format!(", {} items per request", r.batch) } else { String::new() },
        if r.worker_processes == 0 {
            "one `dalil all` process".to_string()
        } else {
            format!("{} worker processes", r.worker_processes)
        }
    ));
    row(
        &mut out,
        "accepted (202)",
        format!("{}/{}", r.accepted, r.items),
        if r.refused > 0 { format!("{} refused", r.refused) } else { String::new() },
    );
    row(
        &mut out,
        "accepted items/s",
        format!("{:.0}", r.accepted_per_second),
        format!("{:.2} × PostgreSQL ceiling (target ≥ 0.4; ≥ 2,000/s)", r.accepted_ratio_to_pg),
    );
    row(
        &mut out,
        "accept latency p50 / p95 / p99 ms",
        format!("{:.1} / {:.1} / {:.1}", r.accept_latency.p50_ms, r.accept_latency.p95_ms, r.accept_latency.p99_ms),
        "target p99 ≤ 50 ms".into(),
    );
    row(
        &mut out,
        "end-to-end items/s (inbox + SMS)",
        format!("{:.0}", r.end_to_end_per_second),
        format!("{:.2} × PostgreSQL ceiling (target ≥ 0.2; ≥ 1,000/s)", r.end_to_end_ratio_to_pg),
    );
    row(
        &mut out,
        "to inbox p50 / p95 / p99 ms",
        format!("{:.0} / {:.0} / {:.0}", r.consign_latency.p50_ms, r.consign_latency.p95_ms, r.consign_latency.p99_ms),
        "target p99 ≤ 2,000 ms".into(),
    );
    row(
        &mut out,
        "to SMS gateway p50 / p95 / p99 ms",
        format!("{:.0} / {:.0} / {:.0}", r.sms_latency.p50_ms, r.sms_latency.p95_ms, r.sms_latency.p99_ms),
        String::new(),
    );
    row(&mut out, "in inbox / SMS at gateway", format!("{} / {}", r.consigned, r.sms_sent), String::new());
    row(
        &mut out,
        "evidence records / in the log",
        format!("{} / {}", r.evidence_records, r.evidence_in_log),
        format!("{EVIDENCE_PER_ITEM} per item"),
    );
    row(
        &mut out,
        "backlog peak / growth (not yet in inbox)",
        format!("{} / {:+.1}/s", r.backlog_peak, r.backlog_growth_per_second),
        "target: does not grow".into(),
    );
    row(
        &mut out,
        "peak RSS of dalil (sum of processes)",
        format!("{:.0} MiB", r.peak_rss_mib),
        "target ≤ 300 MiB".into(),
    );
    row(&mut out, "CPU seconds of dalil", format!("{:.1}", r.cpu_seconds), String::new());
    row(
        &mut out,
        "CPU seconds of the machine / per item",
        match (r.machine_cpu_seconds, r.machine_cpu_ms_per_item) {
            (Some(c), Some(per)) => format!("{c:.1} / {per:.2} ms"),
            _ => "n/a".into(),
        },
        "all processes, load generator included".into(),
    );
    row(
        &mut out,
        "PostgreSQL WAL per item",
        r.wal_bytes_per_item.map(|w| format!("{:.1} KiB", w / 1024.0)).unwrap_or_else(|| "n/a".into()),
        "whole server; moves least with the machine's speed".into(),
    );
    row(
        &mut out,
        "ceiling: PostgreSQL 3-row tx/s",
        format!("{:.0}", r.pg_three_row_tx_per_second),
        "same machine, same run".into(),
    );
    row(
        &mut out,
        "ceiling: RabbitMQ confirmed 1 KB publishes/s",
        format!("{:.0}", r.rabbitmq_confirmed_publishes_per_second),
        "quorum queue, 500 in flight".into(),
    );
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_busy_time_is_user_nice_system_irq_and_softirq() {
        // user 1000, nice 20, system 300, idle 9000, iowait 50, irq 5, softirq 25, steal 400.
        let line = "cpu  1000 20 300 9000 50 5 25 400 0 0";
        assert_eq!(busy_seconds(line), Some(13.5));
        assert_eq!(busy_seconds("cpu0 1 2 3 4 5 6 7 8 0 0"), None, "one CPU's line, not the machine's");
        assert_eq!(busy_seconds("cpu  1 2 3"), None);
        assert!(machine_busy_seconds().is_some_and(|s| s > 0.0), "this machine has /proc/stat");
    }

    /// `n` items accepted at `rate` per second from t = 0, each delivered `lag` seconds later
    /// or, with `drain`, at `drain` per second in acceptance order.
    fn run(n: usize, rate: f64, lag: f64, drain: Option<f64>) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
        let t0 = Utc::now();
        let at = |s: f64| t0 + chrono::Duration::microseconds((s * 1e6) as i64);
        (0..n)
            .map(|i| {
                let accepted = i as f64 / rate;
                let delivered = match drain {
                    Some(d) => (i as f64 / d).max(accepted) + lag,
                    None => accepted + lag,
                };
                (at(accepted), at(delivered))
            })
            .collect()
    }

    #[test]
    fn a_pipeline_that_keeps_up_has_a_flat_backlog() {
        // 1,000/s for 10 s, each in the inbox 150 ms later: about 150 waiting at any moment.
        let (peak, growth) = backlog(&run(10_000, 1000.0, 0.15, None));
        assert!((145..=155).contains(&peak), "{peak}");
        assert!(growth.abs() < 3.0, "{growth}");
    }

    #[test]
    fn a_pipeline_that_falls_behind_shows_by_how_much() {
        // Accepted at 1,000/s, delivered at 800/s: the backlog grows by about 200 a second.
        let (peak, growth) = backlog(&run(10_000, 1000.0, 0.0, Some(800.0)));
        assert!((1_950..=2_010).contains(&peak), "{peak}");
        assert!((190.0..=210.0).contains(&growth), "{growth}");
    }

    #[test]
    fn no_items_no_backlog() {
        assert_eq!(backlog(&[]), (0, 0.0));
        let (peak, growth) = backlog(&run(1, 1.0, 0.5, None));
        assert_eq!((peak, growth), (1, 0.0));
    }
}
