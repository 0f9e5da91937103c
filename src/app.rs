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
use crate::domain::Timestamp;
use crate::health;
use crate::keys::{ApiKey, SigningSecret};
use crate::metrics::Metrics;
use crate::partition;
use crate::poller::{self, PollContext};
use crate::store::{self, KeyConfig, Store};
use crate::upstream::UpstreamClient;

/// A built service, listening but not yet serving. Tests build it on port 0 and read [`Self::port`].
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    router: axum::Router,
    workers: Workers,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
    grace: Duration,
    /// How long the dispatcher waits for attempts on the wire at shutdown: at least the delivery timeout,
    /// so none is cut off mid-request (its claim is then released with the others when we leave).
    delivery_grace: Duration,
    health: Arc<health::Workers>,
    /// On SQLite: held while this process serves the file (see `store::lock_sqlite_for_serving`).
    sqlite_lock: Option<std::fs::File>,
    limits: api::ServerLimits,
    /// The retention purge's settings, and the metrics it counts into.
    housekeeping: (crate::config::HousekeepingConfig, Arc<Metrics>),
}

/// The background work, built and not yet started.
struct Workers {
    poller: Poller,
    dispatcher: Dispatcher,
    /// Scale-out on PostgreSQL: the loop that leases partitions and hands their work to the workers.
    lease_loop: Option<LeaseLoop>,
}

/// The poll worker with the jobs it resumes.
struct Poller {
    ctx: Arc<PollContext>,
    inbox: poller::PollerInbox,
    resume: Vec<store::PollableJob>,
}

/// The delivery worker with the deliveries it resumes.
struct Dispatcher {
    ctx: Arc<DeliveryContext>,
    inbox: delivery::DispatcherInbox,
    resume: Vec<store::DeliveryTask>,
}

struct LeaseLoop {
    settings: cluster::ClusterConfig,
    store: Arc<dyn Store>,
    ownership: Arc<partition::Ownership>,
    poller: poller::PollerHandle,
    dispatcher: delivery::DispatcherHandle,
}

/// The handles the API sends work through, made with the workers.
struct Handles {
    poller: poller::PollerHandle,
    dispatcher: delivery::DispatcherHandle,
    secrets: Arc<delivery::SecretsCache>,
    breaker: Arc<delivery::Breaker>,
}

impl Workers {
    /// Builds the workers. Alone (SQLite) we own every partition and resume all the work now; sharing
    /// a PostgreSQL database we own none until the lease loop hands us our share, and load its work then.
    async fn build(
        config: &Config,
        store: &Arc<dyn Store>,
        lookup: client::Lookup,
        metrics: &Arc<Metrics>,
    ) -> anyhow::Result<(Workers, Handles)> {
        let (dispatcher, dispatcher_inbox) = delivery::channel(&config.delivery);
        let (poller, poller_inbox) = poller::channel();
        let shared = store.shared();
        let ownership = Arc::new(if shared { partition::Ownership::none() } else { partition::Ownership::all() });
        let secrets = Arc::new(delivery::SecretsCache::new(store.clone()));
        let mut delivery_ctx = DeliveryContext::new(
            store.clone(),
            secrets.clone(),
            config.egress.clone(),
            lookup,
            config.delivery.clone(),
            ownership.clone(),
            metrics.clone(),
        );
        delivery_ctx.events = crate::config::upstreams::EventTypes::new(&config.upstreams);
        let http = crate::upstream::http_client(&config.upstream);
        let poll_ctx = PollContext::new(
            store.clone(),
            config.upstreams.iter().map(|profile| UpstreamClient::new(http.clone(), profile.clone())).collect(),
            config.poll.clone(),
            dispatcher.clone(),
            ownership.clone(),
            metrics.clone(),
        );
        let (jobs, deliveries) = if shared {
            (Vec::new(), Vec::new())
        } else {
            (
                store.pollable_jobs().await.context("cannot read the jobs to resume")?,
                store.pending_deliveries().await.context("cannot read the deliveries to resume")?,
            )
        };
        let lease_loop = shared.then(|| LeaseLoop {
            settings: cluster::ClusterConfig { instance_id: cluster::instance_id(), lease_ttl: config.lease_ttl },
            store: store.clone(),
            ownership,
            poller: poller.clone(),
            dispatcher: dispatcher.clone(),
        });
        let breaker = delivery_ctx.breaker.clone();
        let workers = Workers {
            poller: Poller { ctx: Arc::new(poll_ctx), inbox: poller_inbox, resume: jobs },
            dispatcher: Dispatcher { ctx: Arc::new(delivery_ctx), inbox: dispatcher_inbox, resume: deliveries },
            lease_loop,
        };
        Ok((workers, Handles { poller, dispatcher, secrets, breaker }))
    }
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
        let health = Arc::new(health::Workers::default());
        health.expect("poller");
        health.expect("dispatcher");
        // Bound before the first key is made: a start that cannot listen must not use up the one
        // showing of that key.
        let listener =
            TcpListener::bind(config.listen).await.with_context(|| format!("cannot listen on {}", config.listen))?;
        if let Some(first) = bootstrap_keys(store.as_ref(), &config).await? {
            print_first_key(&first);
        }
        let addr = listener.local_addr()?;
        let (workers, handles) = Workers::build(&config, &store, lookup.clone(), &metrics).await?;
        if workers.lease_loop.is_some() {
            health.expect("lease loop");
        }
        // Creation requests go out as polls do (same timeout, proxy and redirect rules), on a pool of their own.
        let creation_http = crate::upstream::http_client(&config.upstream);
        let cursor_key = Arc::new(store.meta_secret("cursor_key").await.context("cannot read the cursor key")?);
        let state = AppState {
            store: store.clone(),
            poller: handles.poller,
            dispatcher: handles.dispatcher,
            egress: config.egress.clone(),
            test_sends: Arc::new(crate::api::test_sends::TestSends::new(client::callback_client(
                &config.egress,
                lookup.clone(),
                config.delivery.timeout,
            ))),
            lookup,
            cursor_key,
            secrets: handles.secrets,
            secret_rotation_grace: config.secret_rotation_grace,
            request_timeout: config.request_timeout,
            metrics: metrics.clone(),
            workers: health.clone(),
            known_keys: Default::default(),
            job_ids: Arc::new(crate::config::upstreams::JobIds::new(&config.upstreams)),
            creators: Arc::new(crate::api::jobs::Creators::new(
                config
                    .upstreams
                    .iter()
                    .map(|profile| UpstreamClient::new(creation_http.clone(), profile.clone()))
                    .collect(),
            )),
            breaker: handles.breaker,
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
            workers,
            store,
            shutdown: CancellationToken::new(),
            grace: config.shutdown_grace,
            delivery_grace: config.shutdown_grace.max(config.delivery.timeout + Duration::from_secs(2)),
            health,
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
            workers,
            store,
            shutdown,
            grace,
            delivery_grace,
            health,
            sqlite_lock,
            limits,
            housekeeping,
        } = self;
        let housekeeping = spawn_housekeeping(housekeeping, store.clone(), shutdown.clone());
        let Workers { poller: p, dispatcher: d, lease_loop } = workers;
        // The lease loop stops on its own token, after the workers, so it releases the leases last.
        let cluster_stop = CancellationToken::new();
        let mut cluster = lease_loop.map(|l| {
            let run = cluster::run(l.store, l.ownership, l.poller, l.dispatcher, l.settings, cluster_stop.clone());
            health.spawn("lease loop", run)
        });
        let mut poller = health.spawn("poller", poller::run(p.ctx, p.inbox, p.resume, shutdown.clone(), grace));
        let mut dispatcher =
            health.spawn("dispatcher", delivery::run(d.ctx, d.inbox, d.resume, shutdown.clone(), delivery_grace));
        tracing::info!("listening on http://{addr}");
        let server = tokio::spawn(api::serve(listener, router, limits, shutdown.clone()));
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
        let stopped = tokio::time::timeout(delivery_grace + Duration::from_secs(1), async {
            tokio::join!(poller, dispatcher, server)
        })
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

/// Housekeeping is not one of the workers the service needs: if it cannot run, the service goes on and
/// says so.
fn spawn_housekeeping(
    (config, metrics): (crate::config::HousekeepingConfig, Arc<Metrics>),
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = crate::housekeeping::run(store, config, metrics, shutdown).await {
            tracing::error!(error = %e, "housekeeping could not run; nothing is purged");
        }
    })
}

/// Syncs the keys from the configuration; with none configured and none stored, makes the first one.
pub async fn bootstrap_keys(store: &dyn Store, config: &Config) -> anyhow::Result<Option<FirstKey>> {
    let hashes: Vec<_> = config.api_keys.iter().map(ApiKey::hash).collect();
    let synced = store
        .sync_configured_keys(KeyConfig { keys: &hashes, secret: config.signing_secret.as_ref() }, Timestamp::now())
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
    store
        .create_key("first key", key.hash(), &secret, Timestamp::now())
        .await
        .context("cannot store the first API key")?;
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
