//! The breaker per callback host: after `--breaker-after` consecutive failed attempts to one host,
//! spanning at least `--breaker-min-span`, deliveries to it stop. They wait, paused (no attempt, no step
//! of their retry schedule), and one probe attempt every `--breaker-probe-interval` tests the host; its
//! first 2xx (or a resume through the API) closes the breaker and the paused deliveries resume.
//!
//! In memory, per instance: a restart starts with every breaker closed, and with several PostgreSQL
//! instances each keeps its own for the deliveries it makes. A host is the callback URL's host, with its
//! port when the URL names one.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::config::BreakerConfig;
use crate::domain::Timestamp;

/// What the breaker says about an attempt about to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Closed: attempt as usual.
    Go,
    /// Open, and this attempt is the one probe of this interval: report it with `probe: true`.
    Probe,
    /// Open: make no attempt; ask again after this long.
    Paused(Duration),
}

/// One host's breaker as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostState {
    pub host: String,
    /// When it opened; `None`: closed.
    pub open_since: Option<Timestamp>,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
}

#[derive(Default)]
struct Host {
    /// Consecutive failed attempts, and when the first of them ended.
    failures: u32,
    first_failure: Option<Instant>,
    last_error: Option<String>,
    open: Option<Open>,
    /// The tenants that delivered here: the API shows a host only to them.
    tenants: HashSet<i64>,
}

struct Open {
    since: Timestamp,
    next_probe: Instant,
    probing: bool,
}

/// How many hosts the breaker remembers before it forgets the healthy ones.
const MAX_HOSTS: usize = 10_000;

pub struct Breaker {
    config: BreakerConfig,
    /// A plain mutex: every section is a few map operations, never held across an await.
    hosts: Mutex<HashMap<String, Host>>,
    /// The hosts whose breaker closed, for the dispatcher to resume their paused deliveries.
    closed: broadcast::Sender<String>,
    open_gauge: Gauge,
}

impl Breaker {
    pub fn new(config: BreakerConfig, open_gauge: Gauge) -> Self {
        Breaker { config, hosts: Mutex::new(HashMap::new()), closed: broadcast::channel(1024).0, open_gauge }
    }

    /// The host an attempt to `callback_url` goes to, as the breaker keys it.
    pub fn host_of(callback_url: &str) -> Option<String> {
        let url = url::Url::parse(callback_url).ok()?;
        let host = url.host_str()?;
        Some(match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Host>> {
        self.hosts.lock().expect("the breaker map is never poisoned: no code panics while holding it")
    }

    /// Whether an attempt of `tenant` to `host` may start now.
    pub fn gate(&self, host: &str, tenant: i64) -> Gate {
        let now = Instant::now();
        let mut hosts = self.lock();
        if hosts.len() > MAX_HOSTS && !hosts.contains_key(host) {
            hosts.retain(|_, h| h.open.is_some() || h.failures > 0);
        }
        let entry = hosts.entry(host.to_owned()).or_default();
        entry.tenants.insert(tenant);
        let Some(open) = &mut entry.open else { return Gate::Go };
        if !open.probing && now >= open.next_probe {
            open.probing = true;
            open.next_probe = now + self.config.probe_interval;
            return Gate::Probe;
        }
        let wait = open.next_probe.saturating_duration_since(now);
        Gate::Paused(if wait.is_zero() { self.config.probe_interval } else { wait })
    }

    /// Reports an attempt that reached the host: `Ok` for a 2xx, else what went wrong.
    pub fn record(&self, host: &str, probe: bool, result: Result<(), String>) {
        let error = match result {
            Ok(()) => return self.close(host),
            Err(error) => error,
        };
        let now = Instant::now();
        let mut hosts = self.lock();
        let entry = hosts.entry(host.to_owned()).or_default();
        entry.last_error = Some(error);
        if let Some(open) = &mut entry.open {
            if probe {
                open.probing = false;
                open.next_probe = now + self.config.probe_interval;
            }
            return;
        }
        entry.failures += 1;
        let first = *entry.first_failure.get_or_insert(now);
        let after = self.config.after;
        if after > 0 && entry.failures >= after && now.duration_since(first) >= self.config.min_span {
            entry.open =
                Some(Open { since: Timestamp::now(), next_probe: now + self.config.probe_interval, probing: false });
            self.open_gauge.inc();
            tracing::warn!(host, failures = entry.failures, "callback host breaker opened; deliveries to it pause");
        }
    }

    /// A probe that sent no request (no slot, no claim, a refused address): the next due delivery probes.
    pub fn release(&self, host: &str) {
        if let Some(open) = self.lock().get_mut(host).and_then(|h| h.open.as_mut()) {
            open.probing = false;
            open.next_probe = Instant::now();
        }
    }

    pub fn is_open(&self, host: &str) -> bool {
        self.lock().get(host).is_some_and(|h| h.open.is_some())
    }

    /// Closes `host`'s breaker (a 2xx, or by hand) and forgets its failures.
    fn close(&self, host: &str) {
        let mut hosts = self.lock();
        let Some(entry) = hosts.get_mut(host) else { return };
        entry.failures = 0;
        entry.first_failure = None;
        if entry.open.take().is_some() {
            self.open_gauge.dec();
            tracing::info!(host, "callback host breaker closed; paused deliveries resume");
            // Fails only when no dispatcher listens (it has stopped): nothing is paused then.
            let _ = self.closed.send(host.to_owned());
        }
    }

    /// Closes `host`'s breaker by hand, if `tenant` delivers there; `None` otherwise (tenant isolation).
    pub fn resume(&self, host: &str, tenant: i64) -> Option<HostState> {
        if !self.lock().get(host).is_some_and(|h| h.tenants.contains(&tenant)) {
            return None;
        }
        self.close(host);
        self.list(tenant).into_iter().find(|h| h.host == host)
    }

    /// The hosts `tenant` delivered to since this instance started, by name.
    pub fn list(&self, tenant: i64) -> Vec<HostState> {
        let hosts = self.lock();
        let mut list: Vec<HostState> = hosts
            .iter()
            .filter(|(_, h)| h.tenants.contains(&tenant))
            .map(|(name, h)| HostState {
                host: name.clone(),
                open_since: h.open.as_ref().map(|o| o.since),
                consecutive_failures: h.failures,
                last_error: h.last_error.clone(),
            })
            .collect();
        list.sort_by(|a, b| a.host.cmp(&b.host));
        list
    }

    /// The hosts whose breaker closes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.closed.subscribe()
    }

    /// How long a delivery to an open host may wait before asking again, at most.
    pub fn probe_interval(&self) -> Duration {
        self.config.probe_interval
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "hooks.example.com";

    fn breaker(after: u32, min_span: u64) -> Breaker {
        let config =
            BreakerConfig { after, min_span: Duration::from_secs(min_span), probe_interval: Duration::from_secs(300) };
        Breaker::new(config, Gauge::default())
    }

    fn fail(b: &Breaker, probe: bool) {
        b.record(HOST, probe, Err("HTTP 500".into()));
    }

    #[tokio::test(start_paused = true)]
    async fn it_opens_only_after_enough_failures_spanning_enough_time() {
        let b = breaker(3, 600);
        for _ in 0..3 {
            assert_eq!(b.gate(HOST, 1), Gate::Go);
            fail(&b, false);
        }
        assert!(!b.is_open(HOST), "three failures within a moment do not span ten minutes");
        tokio::time::advance(Duration::from_secs(600)).await;
        fail(&b, false);
        assert!(b.is_open(HOST));
        assert_eq!(b.gate(HOST, 1), Gate::Paused(Duration::from_secs(300)));
        assert_eq!(b.open_gauge.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_between_failures_starts_the_count_again() {
        let b = breaker(2, 0);
        fail(&b, false);
        b.record(HOST, false, Ok(()));
        fail(&b, false);
        assert!(!b.is_open(HOST));
        fail(&b, false);
        assert!(b.is_open(HOST));
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_lets_one_probe_through_per_interval() {
        let b = breaker(1, 0);
        fail(&b, false);
        tokio::time::advance(Duration::from_secs(100)).await;
        assert_eq!(b.gate(HOST, 1), Gate::Paused(Duration::from_secs(200)));
        tokio::time::advance(Duration::from_secs(200)).await;
        assert_eq!(b.gate(HOST, 1), Gate::Probe);
        assert!(matches!(b.gate(HOST, 1), Gate::Paused(_)), "one probe at a time");
        fail(&b, true);
        assert_eq!(b.gate(HOST, 1), Gate::Paused(Duration::from_secs(300)));
        tokio::time::advance(Duration::from_secs(300)).await;
        assert_eq!(b.gate(HOST, 1), Gate::Probe);
        let mut closed = b.subscribe();
        b.record(HOST, true, Ok(()));
        assert!(!b.is_open(HOST));
        assert_eq!(closed.try_recv().unwrap(), HOST);
        assert_eq!(b.gate(HOST, 1), Gate::Go);
        assert_eq!(b.open_gauge.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_sent_nothing_hands_the_probe_to_the_next_delivery() {
        let b = breaker(1, 0);
        fail(&b, false);
        tokio::time::advance(Duration::from_secs(300)).await;
        assert_eq!(b.gate(HOST, 1), Gate::Probe);
        b.release(HOST);
        assert_eq!(b.gate(HOST, 1), Gate::Probe);
    }

    #[tokio::test(start_paused = true)]
    async fn only_tenants_that_deliver_to_a_host_see_or_resume_it() {
        let b = breaker(1, 0);
        assert_eq!(b.gate(HOST, 1), Gate::Go);
        fail(&b, false);
        assert_eq!(b.list(2), vec![]);
        assert_eq!(b.resume(HOST, 2), None);
        assert!(b.is_open(HOST));
        let listed = b.list(1);
        assert_eq!(listed.len(), 1);
        assert!(listed[0].open_since.is_some());
        assert_eq!(listed[0].last_error.as_deref(), Some("HTTP 500"));
        let resumed = b.resume(HOST, 1).unwrap();
        assert_eq!((resumed.open_since, resumed.consecutive_failures), (None, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_failures_means_no_breaker() {
        let b = breaker(0, 0);
        for _ in 0..100 {
            fail(&b, false);
        }
        assert!(!b.is_open(HOST));
    }

    #[test]
    fn a_host_is_named_with_its_port_when_the_url_gives_one() {
        assert_eq!(Breaker::host_of("https://hooks.example.com/a").as_deref(), Some("hooks.example.com"));
        assert_eq!(Breaker::host_of("http://127.0.0.1:8080/a").as_deref(), Some("127.0.0.1:8080"));
        assert_eq!(Breaker::host_of("not a url"), None);
    }
}
