//! The roles of the `dalil` binary as functions that tests can call: build, then run until a
//! cancellation token fires. The caller binds the listener (tests use port 0).

use std::sync::Arc;

use anyhow::Context;
use secrecy::ExposeSecret;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, health::BrokerProbe, AppState};
use crate::config::Settings;
use crate::identity::Verifier;
use crate::policy::Policies;
use crate::queue::{self, Topology};
use crate::templates::Templates;
use crate::{db, outbox, worker};

pub struct App {
    pub settings: Settings,
    pub pool: PgPool,
    pub topology: Topology,
    /// The HTTP listener; none in a process that does not serve HTTP (a relay or a worker
    /// next to `dalil serve` on the same host must not take its port).
    listener: Option<TcpListener>,
    state: AppState,
}

/// Which roles a process runs.
#[derive(Debug, Clone, Copy)]
pub struct Roles {
    pub serve: bool,
    pub relay: bool,
    pub worker: bool,
    pub scheduler: bool,
    /// The SMS gateway simulator (development).
    pub simulator: bool,
}

impl Roles {
    pub const ALL: Roles = Roles { serve: true, relay: true, worker: true, scheduler: true, simulator: false };
    pub const NONE: Roles = Roles { serve: false, relay: false, worker: false, scheduler: false, simulator: false };
}

pub fn load_topology(settings: &Settings) -> anyhow::Result<Topology> {
    Topology::load(&settings.topology_file, &settings.queue_prefix, settings.queue_expires_ms)
}

/// Declares the RabbitMQ topology (`dalil topology`).
pub async fn declare_topology(settings: &Settings) -> anyhow::Result<Topology> {
    let topology = load_topology(settings)?;
    let conn = queue::connect(settings.amqp_url.expose_secret(), "dalil-topology").await?;
    let ch = conn.create_channel().await?;
    topology.declare(&ch).await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(topology)
}

impl App {
    /// Connects, loads templates, policies and keys, checks the topology, binds the listener.
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        Self::build_with(settings, true).await
    }

    /// As [`App::build`], binding the HTTP listener only when `http` (the process serves).
    pub async fn build_with(settings: Settings, http: bool) -> anyhow::Result<App> {
        let pool = db::connect(&settings).await?;
        let topology = load_topology(&settings)?;
        {
            let conn = queue::connect(settings.amqp_url.expose_secret(), "dalil-startup-check").await?;
            topology.check(&conn).await?;
            let _ = conn.close(200, "checked".into()).await;
        }
        let templates = Templates::load(&settings.templates_dir)?;
        let policies = Policies::load(&settings.policies_file)?;
        let identity = Verifier::load(&settings.identity)?;
        if crate::log::signer(&pool, &settings.log).await?.is_none() {
            tracing::warn!(
                "no checkpoint signing key: proof bundles are unavailable until `dalil admin signing-key generate`"
            );
        }
        let listener = if http {
            Some(TcpListener::bind(&settings.listen).await.with_context(|| format!("binding {}", settings.listen))?)
        } else {
            None
        };
        let group = crate::group::Limits {
            jobs: settings.api.group_items,
            bytes: settings.api.group_bytes,
            concurrency: settings.api.group_concurrency,
        };
        let state = AppState {
            pool: pool.clone(),
            settings: Arc::new(settings.clone()),
            templates: Arc::new(templates),
            policies: Arc::new(policies),
            identity: Arc::new(identity),
            broker: Arc::new(BrokerProbe::default()),
            pages: Arc::new(crate::web::Pages::load(&settings.templates_dir.join("web"))?),
            intake: crate::api::intake::Intake::start(pool.clone(), group),
            reports: crate::api::providers::Reports::start(pool.clone(), group),
            lookups: crate::api::lookup::Lookups::start(pool.clone(), group),
            relay_wake: outbox::Wake::default(),
        };
        Ok(App { settings, pool, topology, listener, state })
    }

    pub fn port(&self) -> u16 {
        self.listener.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.port()).unwrap_or(0)
    }

    /// Runs the chosen roles until `cancel` fires, then drains: the HTTP server finishes the
    /// requests it has, workers settle their deliveries, the relay finishes its batch.
    pub async fn run_until_stopped(
        self,
        roles: Roles,
        worker_channels: Vec<String>,
        cancel: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        if roles.relay {
            let (pool, settings, topology, cancel) =
                (self.pool.clone(), self.settings.clone(), self.topology.clone(), cancel.clone());
            let wake = self.state.relay_wake.clone();
            tasks.spawn(async move { outbox::run(pool, settings, topology, wake, cancel).await.context("relay") });
        }
        if roles.worker {
            let (pool, settings, topology, cancel) =
                (self.pool.clone(), self.settings.clone(), self.topology.clone(), cancel.clone());
            tasks.spawn(async move {
                worker::run(pool, settings, topology, worker_channels, cancel).await.context("worker")
            });
        }
        if roles.simulator {
            let addr = simulator_address(&self.settings);
            let listener =
                TcpListener::bind(&addr).await.with_context(|| format!("binding the SMS simulator to {addr}"))?;
            let sim = crate::sim::Simulator::new(
                self.settings.sms.token.expose_secret(),
                self.settings.sms.report_secret.expose_secret(),
                false,
            );
            tracing::info!(addr, "SMS gateway simulator (sms.start_simulator)");
            let cancel = cancel.clone();
            tasks.spawn(async move { sim.serve(listener, cancel).await.context("SMS simulator") });
        }
        if roles.scheduler {
            let (pool, settings, cancel) = (self.pool.clone(), self.settings.clone(), cancel.clone());
            tasks.spawn(async move { crate::scheduler::run(pool, settings, cancel).await.context("scheduler") });
        }
        if roles.serve {
            let app = api::router(self.state.clone());
            let listener = self.listener.context("this process was built without an HTTP listener")?;
            let cancel = cancel.clone();
            tracing::info!(addr = %listener.local_addr()?, "serving HTTP");
            tasks.spawn(async move {
                axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>())
                    .with_graceful_shutdown(async move { cancel.cancelled().await })
                    .await
                    .context("HTTP server")
            });
        }
        let mut result = Ok(());
        while let Some(joined) = tasks.join_next().await {
            let outcome = joined.map_err(anyhow::Error::from).and_then(|r| r);
            if let Err(e) = outcome {
                // One role failing stops the others: a half-running process helps nobody.
                tracing::error!(error = format!("{e:#}"), "a role stopped with an error; shutting down");
                cancel.cancel();
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        self.pool.close().await;
        result
    }
}

/// host:port of the configured SMS gateway, where `dalil all` runs the simulator.
pub fn simulator_address(settings: &Settings) -> String {
    let url = settings.sms.base_url.trim_end_matches('/');
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.split('/').next().unwrap_or(rest).to_string()
}

/// A token cancelled on SIGTERM or Ctrl-C.
pub fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested: finishing work in flight");
        t.cancel();
    });
    token
}
