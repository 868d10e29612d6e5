//! The command line of the `dalil` binary.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use secrecy::ExposeSecret;
use serde_json::Value;

use crate::admin::{self, RecipientInput};
use crate::app::{self, App, Roles};
use crate::config::Settings;
use crate::db;

#[derive(Debug, Parser)]
#[command(name = "dalil", version, about = "Delivery and proof of delivery of official correspondence")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Migrate, declare the topology, then serve, relay and deliver in one process.
    All,
    /// The whole story in one command, on a fresh database: a summons opened and one never
    /// opened (escalated to paper, then deemed served), a notification, a letter on paper;
    /// fast timers, SMS simulator, scripted postal operator; every proof bundle verified.
    Demo {
        /// Keep the demo's database afterwards (for a look with psql).
        #[arg(long)]
        keep: bool,
    },
    /// The HTTP API.
    Serve,
    /// Publishes the outbox to RabbitMQ.
    Relay,
    /// Consumes delivery queues and dispatches.
    Worker {
        /// A channel to consume (repeatable); default: worker.channels from the configuration.
        #[arg(long = "channel")]
        channels: Vec<String>,
    },
    /// Runs recurring jobs: checkpoint signing, log monitoring.
    Scheduler,
    /// Simulators of outside services, for demos, tests and integrators.
    Sim {
        #[command(subcommand)]
        command: SimCommand,
    },
    /// Verifies a proof bundle offline: no network, no database.
    Verify {
        /// The bundle (JSON), or - for standard input.
        bundle: PathBuf,
        /// A trusted verifier key (name+keyid+base64, as GET /v1/log/keys gives it), or a file
        /// holding one. Repeatable. Without it the bundle's own keys are trusted, with a warning.
        #[arg(long = "key")]
        keys: Vec<String>,
        /// Print the verdict as JSON.
        #[arg(long)]
        json: bool,
    },
    /// End-to-end throughput: starts Dalil on a fresh database, drives N items through the API
    /// with C clients, and reports rates, latencies, memory, CPU and the machine's ceilings.
    Bench {
        /// Items to send.
        #[arg(long, default_value_t = 20_000)]
        items: usize,
        /// Send for this many seconds instead, as many items as the clients manage (a
        /// sustained run: the table's backlog line shows whether delivery kept up).
        #[arg(long, conflicts_with = "items")]
        seconds: Option<u64>,
        /// Concurrent HTTP clients (with --rate: requests in flight at most).
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Offer items at this rate (items/s) instead of as fast as the clients are answered;
        /// latency then counts from when each item was due (open loop).
        #[arg(long)]
        rate: Option<f64>,
        /// Items per request: 1 sends each through `POST /v1/correspondence`, more send them
        /// through `POST /v1/correspondence/batch` (1 to 1,000).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Worker processes (with separate serve, relay and scheduler processes); 0 runs one
        /// `dalil all`.
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// Seconds each raw ceiling (PostgreSQL, RabbitMQ) is measured for (at least 1: the
        /// table's ratios are to them).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
        ceiling_seconds: u64,
        /// Also write the figures as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Keep the benchmark's database afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// Measures the evidence log's costs at a given size, in a scratch database.
    BenchLog {
        /// Records to fill the log with before measuring.
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
        /// Concurrent writers for the append measurement.
        #[arg(long, default_value_t = 8)]
        writers: usize,
        /// One-record transactions to time.
        #[arg(long, default_value_t = 20_000)]
        appends: u64,
        /// Inclusion proofs to time.
        #[arg(long, default_value_t = 200)]
        proofs: u64,
        /// Keep the scratch database.
        #[arg(long)]
        keep: bool,
    },
    /// Applies the database migrations (creates the database if missing).
    Migrate,
    /// Declares the RabbitMQ exchanges and queues of queues/topology.toml.
    Topology,
    /// Operator commands.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
        /// Print JSON instead of a summary.
        #[arg(long, global = true)]
        json: bool,
    },
}

#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Agencies that send correspondence.
    Agency {
        #[command(subcommand)]
        command: AgencyCommand,
    },
    /// Agencies' API keys.
    ApiKey {
        #[command(subcommand)]
        command: ApiKeyCommand,
    },
    /// Creates or updates one recipient (only the fields given change).
    Recipient {
        #[command(subcommand)]
        command: RecipientCommand,
    },
    /// Bulk recipient operations.
    Recipients {
        #[command(subcommand)]
        command: RecipientsCommand,
    },
    /// Keys that sign the evidence log's checkpoints.
    SigningKey {
        #[command(subcommand)]
        command: SigningKeyCommand,
    },
    /// Signs a checkpoint of the evidence log now.
    Checkpoint,
    /// Postal operators (hybrid mail).
    PostalOperator {
        #[command(subcommand)]
        command: PostalOperatorCommand,
    },
    /// Messages that could not be processed, in the dead queue.
    DeadLetters {
        #[command(subcommand)]
        command: DeadLettersCommand,
    },
    /// Agencies' callback URLs.
    Callback {
        #[command(subcommand)]
        command: CallbackCommand,
    },
    /// Mints a citizen token with the development identity key.
    CitizenToken {
        pinfl: String,
        /// Validity in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum CallbackCommand {
    /// Registers a URL for an agency's events; prints the signing secret (shown once).
    Add {
        #[arg(long)]
        agency: String,
        #[arg(long)]
        url: String,
        /// Event types, comma-separated (accepted, consigned, notified, opened, handed_over,
        /// refused, undeliverable, served, failed, recalled); default: all.
        #[arg(long, value_delimiter = ',')]
        events: Vec<String>,
    },
    List {
        #[arg(long)]
        agency: String,
    },
    /// Stops calls to an endpoint (by id).
    Remove { id: String },
}

#[derive(Debug, Subcommand)]
pub enum PostalOperatorCommand {
    /// Creates an operator with the regions it delivers in, and its API key (shown once).
    Create {
        #[arg(long)]
        code: String,
        #[arg(long)]
        name: String,
        /// ISO 3166-2 region codes, comma-separated, e.g. UZ-TK,UZ-TO.
        #[arg(long)]
        regions: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SimCommand {
    /// An SMS gateway that speaks the API the sms channel uses, posts delivery reports, and
    /// can be told to fail (POST /control).
    SmsGateway {
        /// host:port; default: the address of sms.base_url.
        #[arg(long)]
        listen: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// Shows them, leaving them in place.
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Re-queues them for delivery, each removed only once RabbitMQ confirmed it.
    Replay {
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

#[derive(Debug, Subcommand)]
pub enum SigningKeyCommand {
    /// Creates the first key (private half in log.key_dir, never in the database).
    Generate,
    /// Replaces the key in use; checkpoints it signed still verify.
    Rotate,
    List,
}

#[derive(Debug, Subcommand)]
pub enum AgencyCommand {
    Create {
        /// Short stable code, e.g. tashkent-civil-court.
        #[arg(long)]
        code: String,
        #[arg(long)]
        name: String,
    },
    List,
}

#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Creates a key; it is shown once.
    Create {
        #[arg(long)]
        agency: String,
    },
    /// Revokes a key by its prefix (dalil_xxxxxxxx).
    Revoke { prefix: String },
    List {
        #[arg(long)]
        agency: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RecipientCommand {
    Upsert(RecipientArgs),
}

#[derive(Debug, Subcommand)]
pub enum RecipientsCommand {
    /// Imports a CSV (header row) or JSON-lines file, all or nothing.
    Import { file: PathBuf },
}

#[derive(Debug, Args)]
pub struct RecipientArgs {
    #[arg(long)]
    pinfl: Option<String>,
    #[arg(long)]
    tin: Option<String>,
    #[arg(long)]
    name: Option<String>,
    /// E.164, e.g. +998901234567.
    #[arg(long)]
    phone: Option<String>,
    #[arg(long)]
    email: Option<String>,
    /// ISO 3166-2 region code, e.g. UZ-TK.
    #[arg(long)]
    region: Option<String>,
    #[arg(long)]
    district: Option<String>,
    #[arg(long)]
    street: Option<String>,
    #[arg(long)]
    house: Option<String>,
    #[arg(long)]
    apartment: Option<String>,
    #[arg(long)]
    postcode: Option<String>,
    /// Whether the recipient consented to digital delivery.
    #[arg(long)]
    digital_consent: Option<bool>,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Verification needs no configuration, no database and no network.
    if let Command::Verify { bundle, keys, json } = &cli.command {
        return verify(bundle, keys, *json);
    }
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dalil: configuration: {e:#}");
            return ExitCode::from(2);
        }
    };
    let quiet = matches!(cli.command, Command::Admin { .. } | Command::Demo { .. } | Command::Bench { .. });
    init_tracing(&settings, quiet);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(cli.command, settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !quiet {
                tracing::error!(error = format!("{e:#}"), "dalil stopped");
            }
            eprintln!("dalil: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(settings: &Settings, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if quiet { "warn,lapin=off" } else { "info,sqlx=warn,lapin=warn,tower_http=info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if settings.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::All => {
            tracing::info!(
                database = settings.database_url_redacted(),
                broker = settings.amqp_url_redacted(),
                "starting all roles"
            );
            db::migrate(&settings).await?;
            app::declare_topology(&settings).await?;
            let channels = settings.worker.channels.clone();
            let app = App::build(settings).await?;
            let roles = Roles { simulator: app.settings.sms.start_simulator, ..Roles::ALL };
            app.run_until_stopped(roles, channels, app::shutdown_token()).await
        }
        Command::Demo { keep } => crate::demo::run(&settings, crate::demo::Options { keep }).await,
        Command::Serve => start(settings, Roles { serve: true, ..Roles::NONE }, vec![]).await,
        Command::Relay => start(settings, Roles { relay: true, ..Roles::NONE }, vec![]).await,
        Command::Scheduler => start(settings, Roles { scheduler: true, ..Roles::NONE }, vec![]).await,
        Command::Verify { .. } => unreachable!("handled before the runtime starts"),
        Command::Sim { command: SimCommand::SmsGateway { listen } } => {
            let addr = listen.unwrap_or_else(|| crate::app::simulator_address(&settings));
            let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
            println!(
                "SMS gateway simulator on http://{addr}: POST /api/v1/messages, GET /api/v1/messages, POST /control"
            );
            crate::sim::Simulator::new(
                settings.sms.token.expose_secret(),
                settings.sms.report_secret.expose_secret(),
                false,
            )
            .serve(listener, app::shutdown_token())
            .await
        }
        Command::Bench { items, seconds, clients, rate, batch, workers, ceiling_seconds, json, keep } => {
            let binary = std::env::current_exe().context("finding the dalil binary")?;
            let options = crate::bench::Options {
                items,
                seconds,
                rate,
                clients,
                batch,
                workers,
                ceiling_seconds,
                json,
                keep,
                binary,
                print: true,
            };
            crate::bench::run(&settings, options).await.map(|_| ())
        }
        Command::BenchLog { records, writers, appends, proofs, keep } => {
            crate::bench_log::run(&settings, crate::bench_log::Options { records, writers, appends, proofs, keep })
                .await
        }
        Command::Worker { channels } => {
            let channels = if channels.is_empty() { settings.worker.channels.clone() } else { channels };
            start(settings, Roles { worker: true, ..Roles::NONE }, channels).await
        }
        Command::Migrate => {
            db::migrate(&settings).await?;
            println!("migrations applied to {}", settings.database_url_redacted());
            Ok(())
        }
        Command::Topology => {
            let t = app::declare_topology(&settings).await?;
            println!(
                "declared {} exchanges and {} queues on {}",
                t.exchanges.len(),
                t.queues.len(),
                settings.amqp_url_redacted()
            );
            Ok(())
        }
        Command::Admin { command, json } => {
            let value = admin_command(command, &settings).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                println!("{}", human(&value));
            }
            Ok(())
        }
    }
}

async fn start(settings: Settings, roles: Roles, channels: Vec<String>) -> anyhow::Result<()> {
    let app = App::build_with(settings, roles.serve).await?;
    app.run_until_stopped(roles, channels, app::shutdown_token()).await
}

async fn admin_command(command: AdminCommand, settings: &Settings) -> anyhow::Result<Value> {
    if let AdminCommand::CitizenToken { pinfl, ttl } = &command {
        return admin::citizen_token(settings, pinfl, *ttl);
    }
    if let AdminCommand::DeadLetters { command } = &command {
        return match command {
            DeadLettersCommand::List { limit } => admin::dead_letters_list(settings, *limit).await,
            DeadLettersCommand::Replay { limit } => admin::dead_letters_replay(settings, *limit).await,
        };
    }
    let pool = db::connect(settings).await?;
    let value = match command {
        AdminCommand::Agency { command: AgencyCommand::Create { code, name } } => {
            admin::agency_create(&pool, &code, &name).await?
        }
        AdminCommand::Agency { command: AgencyCommand::List } => admin::agency_list(&pool).await?,
        AdminCommand::ApiKey { command: ApiKeyCommand::Create { agency } } => {
            admin::api_key_create(&pool, &agency).await?
        }
        AdminCommand::ApiKey { command: ApiKeyCommand::Revoke { prefix } } => {
            admin::api_key_revoke(&pool, &prefix).await?
        }
        AdminCommand::ApiKey { command: ApiKeyCommand::List { agency } } => admin::api_key_list(&pool, &agency).await?,
        AdminCommand::Recipient { command: RecipientCommand::Upsert(a) } => {
            let input = RecipientInput {
                pinfl: a.pinfl,
                tin: a.tin,
                name: a.name,
                phone: a.phone,
                email: a.email,
                region: a.region,
                district: a.district,
                street: a.street,
                house: a.house,
                apartment: a.apartment,
                postcode: a.postcode,
                digital_consent: a.digital_consent,
            };
            admin::recipient_upsert(&pool, &input).await?
        }
        AdminCommand::Recipients { command: RecipientsCommand::Import { file } } => {
            let report = admin::recipients_import(&pool, &file).await?;
            if report["errors"].as_array().is_some_and(|e| !e.is_empty()) {
                let lines: Vec<String> = report["errors"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| format!("  line {}: {}", e["line"], e["error"].as_str().unwrap_or_default()))
                    .collect();
                anyhow::bail!("nothing imported; fix these rows and run again:\n{}", lines.join("\n"));
            }
            report
        }
        AdminCommand::SigningKey { command: SigningKeyCommand::Generate } => {
            serde_json::to_value(crate::log::new_signing_key(&pool, &settings.log, false).await?)?
        }
        AdminCommand::SigningKey { command: SigningKeyCommand::Rotate } => {
            serde_json::to_value(crate::log::new_signing_key(&pool, &settings.log, true).await?)?
        }
        AdminCommand::SigningKey { command: SigningKeyCommand::List } => {
            serde_json::to_value(crate::log::published_keys(&mut *pool.acquire().await?).await?)?
        }
        AdminCommand::PostalOperator { command: PostalOperatorCommand::Create { code, name, regions } } => {
            admin::postal_operator_create(&pool, &code, &name, &regions).await?
        }
        AdminCommand::Callback { command: CallbackCommand::Add { agency, url, events } } => {
            admin::callback_add(&pool, settings, &agency, &url, &events).await?
        }
        AdminCommand::Callback { command: CallbackCommand::List { agency } } => {
            admin::callback_list(&pool, &agency).await?
        }
        AdminCommand::Callback { command: CallbackCommand::Remove { id } } => {
            admin::callback_remove(&pool, &id).await?
        }
        AdminCommand::Checkpoint => {
            let signer = crate::log::load_signer(&pool, &settings.log)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no signing key: dalil admin signing-key generate"))?;
            let signer = crate::log::Signer { origin: settings.log.origin.clone(), ..signer };
            serde_json::to_value(crate::log::sign_checkpoint(&pool, &signer).await?)?
        }
        AdminCommand::CitizenToken { .. } | AdminCommand::DeadLetters { .. } => unreachable!("handled above"),
    };
    pool.close().await;
    Ok(value)
}

/// `key: value` lines for people; the secret parts are the ones they came for.
fn human(value: &Value) -> String {
    match value {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k}: {}",
                    match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    }
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Value::Array(items) if items.is_empty() => "(none)".into(),
        Value::Array(items) => items.iter().map(human).collect::<Vec<_>>().join("\n\n"),
        other => other.to_string(),
    }
}

/// `dalil verify`: exit 0 when the bundle holds, 1 with the reason when it does not, 2 when it
/// cannot be read.
fn verify(path: &std::path::Path, keys: &[String], json: bool) -> ExitCode {
    let read = |p: &std::path::Path| -> std::io::Result<String> {
        if p.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())
        } else {
            std::fs::read_to_string(p)
        }
    };
    let text = match read(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("dalil verify: cannot read {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let bundle: crate::proof::Bundle = match serde_json::from_str(&text) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("dalil verify: {} is not a proof bundle: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let mut trusted = Vec::new();
    for k in keys {
        let text = std::fs::read_to_string(k).unwrap_or_else(|_| k.clone());
        match crate::note::VerifierKey::parse(&text) {
            Ok(v) => trusted.push(v),
            Err(e) => {
                eprintln!("dalil verify: --key {k}: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let verdict = crate::proof::verify(&bundle, &trusted);
    if json {
        println!("{}", serde_json::to_string_pretty(&verdict).expect("plain JSON"));
    } else {
        print!("{}", crate::proof::describe(&verdict));
    }
    if verdict.valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
