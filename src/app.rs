//! Building and running the service: the store, the listener, the poller and the dispatcher, one
//! cancellation token, and a graceful shutdown that lets in-flight work finish up to a grace period.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::cluster;
use crate::config::Config;
use crate::delivery::client;
use crate::delivery::{self, DeliveryContext};
use crate::health::Workers;
use crate::keys::{ApiKey, SigningSecret};
use crate::metrics::Metrics;
use crate::partition;
use crate::poller::{self, PollContext};
use crate::store::{self, Store, now_ms};
use crate::upstream::UpstreamClient;

/// A built service, listening but not yet serving. Tests build it on port 0 and read [`Self::port`].
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    router: axum::Router,
    poller: (Arc<PollContext>, poller::PollerInbox, Vec<store::PollableJob>),
    dispatcher: (Arc<DeliveryContext>, delivery::DispatcherInbox, Vec<store::DeliveryTask>),
    /// Scale-out on PostgreSQL: the lease loop's settings and the workers' handles.
    cluster: Option<(cluster::ClusterConfig, Arc<dyn Store>, poller::PollerHandle, delivery::DispatcherHandle)>,
    ownership: Arc<partition::Ownership>,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
    grace: Duration,
    workers: Arc<Workers>,
    /// On SQLite: held while this process serves the file (see `store::lock_sqlite_for_serving`).
    sqlite_lock: Option<std::fs::File>,
    limits: api::ServerLimits,
    /// The retention purge's settings, and the metrics it counts into.
    housekeeping: (crate::config::HousekeepingConfig, Arc<Metrics>),
}

/// A key made on first start, to be shown once.
pub struct FirstKey {
    pub key: ApiKey,
    pub secret: SigningSecret,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_with(config, client::system_lookup()).await
    }

    /// Builds with another way to resolve callback hosts (tests play DNS with it).
    pub async fn build_with(config: Config, lookup: client::Lookup) -> anyhow::Result<Self> {
        let sqlite_lock = store::lock_sqlite_for_serving(&config.database_url).map_err(anyhow::Error::msg)?;
        // The writer's counters belong to the metrics; the store is handed them as it opens.
        let writer_stats = Arc::new(crate::metrics::WriterStats::default());
        let store = store::open_with(&config.database_url, writer_stats.clone()).await.with_context(|| {
            format!("cannot open the store {}", crate::config::file::mask_password(&config.database_url))
        })?;
        let mut metrics = Metrics::new();
        metrics.attach_writer(writer_stats);
        let metrics = Arc::new(metrics);
        let workers = Arc::new(Workers::default());
        workers.expect("poller");
        workers.expect("dispatcher");
        // Bound before the first key is made: a start that cannot listen must not use up the one
        // showing of that key.
        let listener =
            TcpListener::bind(config.listen).await.with_context(|| format!("cannot listen on {}", config.listen))?;
        if let Some(first) = bootstrap_keys(store.as_ref(), &config).await? {
            print_first_key(&first);
        }
        let addr = listener.local_addr()?;

        let egress = config.egress.clone();
        let (dispatcher, dispatcher_inbox) = delivery::channel(&config.delivery);
        let (poller, poller_inbox) = poller::channel();
        // Alone (SQLite) we own every partition and resume all the work now; sharing a PostgreSQL database
        // we own none until the lease loop hands us our share, and load its work then.
        let shared = store.shared();
        let ownership = Arc::new(if shared { partition::Ownership::none() } else { partition::Ownership::all() });
        let secrets = Arc::new(delivery::SecretsCache::new(store.clone()));
        let delivery_ctx = Arc::new(DeliveryContext::new(
            store.clone(),
            secrets.clone(),
            egress.clone(),
            lookup.clone(),
            config.delivery.clone(),
            ownership.clone(),
            metrics.clone(),
        ));
        let poll_ctx = Arc::new(PollContext::new(
            store.clone(),
            UpstreamClient::new(&config.upstream),
            config.poll.clone(),
            dispatcher.clone(),
            ownership.clone(),
            metrics.clone(),
        ));
        let (pending_jobs, pending_deliveries) = if shared {
            (Vec::new(), Vec::new())
        } else {
            (
                store.pollable_jobs().await.context("cannot read the jobs to resume")?,
                store.pending_deliveries().await.context("cannot read the deliveries to resume")?,
            )
        };
        if shared {
            workers.expect("lease loop");
        }
        let cluster = shared.then(|| {
            let settings = cluster::ClusterConfig { instance_id: cluster::instance_id(), lease_ttl: config.lease_ttl };
            (settings, store.clone(), poller.clone(), dispatcher.clone())
        });
        let cursor_key = Arc::new(store.meta_secret("cursor_key").await.context("cannot read the cursor key")?);
        let state = AppState {
            store: store.clone(),
            poller,
            dispatcher,
            egress,
            lookup,
            cursor_key,
            secrets,
            secret_rotation_grace: config.secret_rotation_grace,
            request_timeout: config.request_timeout,
            metrics: metrics.clone(),
            workers: workers.clone(),
            known_keys: Default::default(),
        };
        // The console's session key lives in the store, so every instance sharing it accepts a session.
        let console = if config.console {
            let key = store.meta_secret("console_session_key").await.context("cannot read the console key")?;
            crate::console::router(state.clone(), key)
        } else {
            axum::Router::new()
        };
        let router = api::router_with(state, console);
        Ok(Application {
            listener,
            addr,
            router,
            poller: (poll_ctx, poller_inbox, pending_jobs),
            dispatcher: (delivery_ctx, dispatcher_inbox, pending_deliveries),
            cluster,
            ownership,
            store,
            shutdown: CancellationToken::new(),
            grace: config.shutdown_grace,
            workers,
            sqlite_lock,
            limits: api::ServerLimits {
                request_timeout: config.request_timeout,
                max_connections: config.max_connections,
            },
            housekeeping: (config.housekeeping.clone(), metrics),
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cancelling this token stops the service gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves until the shutdown token is cancelled, then stops accepting, lets in-flight requests, polls
    /// and deliveries finish (up to the grace period) and returns.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Application {
            listener,
            addr,
            router,
            poller,
            dispatcher,
            cluster,
            ownership,
            store,
            shutdown,
            grace,
            workers,
            sqlite_lock,
            limits,
            housekeeping,
        } = self;
        let (housekeeping_config, metrics) = housekeeping;
        // Housekeeping is not one of the workers the service needs: if it cannot run, the service goes
        // on and says so.
        let housekeeping = tokio::spawn({
            let (store, shutdown) = (store.clone(), shutdown.clone());
            async move {
                if let Err(e) = crate::housekeeping::run(store, housekeeping_config, metrics, shutdown).await {
                    tracing::error!(error = %e, "housekeeping could not run; nothing is purged");
                }
            }
        });
        // The lease loop stops on its own token, after the workers, so it releases the leases last.
        let cluster_stop = CancellationToken::new();
        let mut cluster = cluster.map(|(settings, store, poller, dispatcher)| {
            let lease_loop = cluster::run(store, ownership, poller, dispatcher, settings, cluster_stop.clone());
            workers.spawn("lease loop", lease_loop)
        });
        let (poll_ctx, poll_inbox, jobs) = poller;
        let poller = workers.spawn("poller", poller::run(poll_ctx, poll_inbox, jobs, shutdown.clone(), grace));
        let (delivery_ctx, delivery_inbox, deliveries) = dispatcher;
        let dispatcher = workers
            .spawn("dispatcher", delivery::run(delivery_ctx, delivery_inbox, deliveries, shutdown.clone(), grace));
        tracing::info!("listening on http://{addr}");
        let server = tokio::spawn(api::serve(listener, router, limits, shutdown.clone()));
        let (mut poller, mut dispatcher) = (poller, dispatcher);
        // A worker ends only on shutdown; one that ends before is a bug, and a process that accepts
        // registrations nobody works on is worse than one that stops and is restarted.
        let crashed = tokio::select! {
            // Workers end once the token is cancelled, so a cancelled token must win the race.
            biased;
            _ = shutdown.cancelled() => None,
            ended = &mut poller => Some(("poller", ended)),
            ended = &mut dispatcher => Some(("dispatcher", ended)),
            // The lease loop ends only when told to (after this select); ending before is a crash too.
            ended = async {
                match cluster.as_mut() {
                    Some(task) => task.await,
                    None => std::future::pending().await,
                }
            } => Some(("lease loop", ended)),
        };
        if let Some((worker, ended)) = crashed {
            shutdown.cancel();
            poller.abort();
            dispatcher.abort();
            let why = match ended {
                Ok(()) => "it returned".to_owned(),
                Err(e) => e.to_string(),
            };
            tracing::error!(worker, %why, "a worker stopped unexpectedly; stopping");
            let _ = tokio::time::timeout(grace, server).await;
            cluster_stop.cancel();
            anyhow::bail!("the {worker} stopped unexpectedly ({why}); nothing is lost, restart the service");
        }
        tracing::info!(grace = %humantime::format_duration(grace), "shutting down");
        // The workers bound their own wait by the grace period; open HTTP requests get the same, all at once.
        let stopped =
            tokio::time::timeout(grace + Duration::from_secs(1), async { tokio::join!(poller, dispatcher, server) })
                .await;
        match stopped {
            Ok((_, _, Ok(()))) => {}
            Ok((_, _, Err(e))) => return Err(e).context("the HTTP server task failed"),
            Err(_) => tracing::warn!("some work was still running after the grace period"),
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), housekeeping).await;
        if let Some(cluster) = cluster {
            cluster_stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), cluster).await;
        }
        tracing::info!(store_transactions = store.transactions(), "stopped");
        // Another process may serve the file from now on (the lock also ends with the process).
        drop(sqlite_lock);
        Ok(())
    }
}

/// Syncs the keys from the configuration; with none configured and none stored, makes the first one.
pub async fn bootstrap_keys(store: &dyn Store, config: &Config) -> anyhow::Result<Option<FirstKey>> {
    let hashes: Vec<_> = config.api_keys.iter().map(ApiKey::hash).collect();
    let synced = store
        .sync_configured_keys(&hashes, config.signing_secret.as_ref(), now_ms())
        .await
        .context("cannot store the configured API keys")?;
    for id in synced.revoked_by_command {
        tracing::warn!(
            key_id = id,
            "a key listed in --api-keys (JOBHOOK_API_KEYS) was revoked with `jobhook keys revoke` and stays \
             revoked: remove it from the list"
        );
    }
    if !config.api_keys.is_empty() || store.usable_key_count().await? > 0 {
        return Ok(None);
    }
    let key = ApiKey::generate();
    let secret = config.signing_secret.clone().unwrap_or_else(SigningSecret::generate);
    store.create_key("first key", key.hash(), &secret, now_ms()).await.context("cannot store the first API key")?;
    Ok(Some(FirstKey { key, secret }))
}

fn print_first_key(first: &FirstKey) {
    // Printed to stdout on purpose, once: the key is stored only as a hash and cannot be shown again.
    let line = "=".repeat(78);
    crate::outln!("{line}");
    crate::outln!("  jobhook made its first API key. It is shown only now: copy it somewhere safe.");
    crate::outln!();
    crate::outln!("    API key:         {}", first.key.expose());
    crate::outln!("    signing secret:  {}", first.secret.expose());
    crate::outln!();
    crate::outln!("  Use the key as `Authorization: Bearer <key>`; verify deliveries with the secret.");
    crate::outln!("  More keys: jobhook keys create --name NAME  (with this service's --database-url)");
    crate::outln!("{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_whose_task_ended_is_reported() {
        let workers = Arc::new(Workers::default());
        workers.expect("poller");
        assert_eq!(workers.checks()["poller"], "not running");
        let running = workers.start("poller");
        assert_eq!(workers.checks()["poller"], "ok");
        drop(running);
        assert_eq!(workers.checks()["poller"], "not running");
    }
}
