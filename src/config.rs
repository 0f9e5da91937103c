//! Every setting in one place: its flag, its environment variable, its default and its validation.
//!
//! The command line is parsed by clap; each flag of `serve` can also come from a `JOBHOOK_*` variable
//! (a flag wins over the variable). [`ServeArgs::into_config`] turns the raw values into a [`Config`] that
//! the rest of the service trusts; a bad value stops start-up with one line that names the setting.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

use crate::keys::{ApiKey, SigningSecret};

pub mod file;
pub mod upstreams;

#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Where the state lives: `sqlite://PATH` (the file is created if missing) or `postgres://…`.
    #[arg(long, env = "JOBHOOK_DATABASE_URL", default_value = "sqlite://jobhook.db", hide_env_values = true)]
    pub database_url: String,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address the API listens on.
    #[arg(long, env = "JOBHOOK_LISTEN", default_value = "127.0.0.1:8080", value_parser = parse_listen)]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub store: StoreArgs,

    /// Base URL of the job API; jobhook appends /public/v1/job/{job_id}.
    #[arg(long, env = "JOBHOOK_UPSTREAM_URL", default_value = "https://api.aetherforgeai.com", value_parser = parse_http_url)]
    pub upstream_url: url::Url,

    /// Bearer key jobhook sends when polling the job API.
    #[arg(long, env = "JOBHOOK_UPSTREAM_API_KEY", hide_env_values = true)]
    pub upstream_api_key: Option<String>,

    /// Time limit of one poll request.
    #[arg(long, env = "JOBHOOK_UPSTREAM_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub upstream_timeout: Duration,

    /// Send polls through this HTTP proxy (`http://host:port`, `http://user:password@host:port`). Proxies named by HTTP_PROXY, HTTPS_PROXY or ALL_PROXY are never used: polls carry the upstream key.
    #[arg(long, env = "JOBHOOK_UPSTREAM_PROXY", hide_env_values = true)]
    pub upstream_proxy: Option<String>,

    /// Comma-separated Bearer keys accepted by the API; each key is a tenant.
    #[arg(long, env = "JOBHOOK_API_KEYS", hide_env_values = true, value_delimiter = ',')]
    pub api_keys: Vec<String>,

    /// `whsec_…` secret used to sign for every key given in --api-keys (default: one generated per tenant and stored). Applied when it changes; a rotation through the API is kept until then.
    #[arg(long, env = "JOBHOOK_SIGNING_SECRET", hide_env_values = true)]
    pub signing_secret: Option<String>,

    /// First spacing between polls of a pending job.
    #[arg(long, env = "JOBHOOK_POLL_INTERVAL", default_value = "1s", value_parser = parse_positive_duration)]
    pub poll_interval: Duration,

    /// Spacing grows toward this for jobs pending more than a minute.
    #[arg(long, env = "JOBHOOK_POLL_MAX_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub poll_max_interval: Duration,

    /// A subscription whose job is still Pending after this becomes `expired`.
    #[arg(long, env = "JOBHOOK_MAX_WAIT", default_value = "24h", value_parser = parse_positive_duration)]
    pub max_wait: Duration,

    /// How long an upstream 404 is tolerated after registration (a new job may not be visible yet).
    #[arg(long, env = "JOBHOOK_NOT_FOUND_GRACE", default_value = "60s", value_parser = parse_duration)]
    pub not_found_grace: Duration,

    /// Delays between delivery attempts after the first (each ±20% jitter).
    #[arg(long, env = "JOBHOOK_RETRY_SCHEDULE", default_value = "5s,5m,30m,2h,5h,10h,10h", value_parser = parse_schedule)]
    pub retry_schedule: RetrySchedule,

    /// Time limit of one callback request.
    #[arg(long, env = "JOBHOOK_DELIVERY_TIMEOUT", default_value = "15s", value_parser = parse_positive_duration)]
    pub delivery_timeout: Duration,

    /// Allow callbacks to loopback, private and other non-public addresses (tests, internal networks).
    #[arg(long, env = "JOBHOOK_ALLOW_PRIVATE_CALLBACKS", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub allow_private_callbacks: bool,

    /// Also allow callbacks to these networks (comma-separated CIDRs, e.g. 10.20.0.0/16,fd00::/8), for
    /// internal receivers, while the rest of the egress policy stays on.
    #[arg(long, env = "JOBHOOK_CALLBACK_ALLOW_CIDRS", value_delimiter = ',')]
    pub callback_allow_cidrs: Vec<String>,

    /// Refuse callback URLs that are not https.
    #[arg(long, env = "JOBHOOK_CALLBACK_HTTPS_ONLY", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub callback_https_only: bool,

    /// The most callback requests in flight at once, over all receivers.
    #[arg(long, env = "JOBHOOK_DELIVERY_CONCURRENCY", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub delivery_concurrency: u32,

    /// The most callback requests in flight at once to one host, so a slow or dead receiver cannot take
    /// every slot. Raise it for one busy receiver that answers fast.
    #[arg(long, env = "JOBHOOK_DELIVERY_CONCURRENCY_PER_HOST", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub delivery_concurrency_per_host: u32,

    /// Open a callback host's breaker after this many consecutive failed attempts to it (spanning at
    /// least --breaker-min-span): its deliveries then pause, without using up their retries, while one
    /// probe per --breaker-probe-interval tests the host. 0 = no breaker.
    #[arg(long, env = "JOBHOOK_BREAKER_AFTER", default_value_t = 30)]
    pub breaker_after: u32,

    /// The failures that open a breaker must span at least this long (so a short outage only retries).
    #[arg(long, env = "JOBHOOK_BREAKER_MIN_SPAN", default_value = "10m", value_parser = parse_duration)]
    pub breaker_min_span: Duration,

    /// While a host's breaker is open, one delivery is attempted to it this often; its first 2xx closes it.
    #[arg(long, env = "JOBHOOK_BREAKER_PROBE_INTERVAL", default_value = "5m", value_parser = parse_positive_duration)]
    pub breaker_probe_interval: Duration,

    /// The most callback requests in flight at once for one tenant (API key holder), over all its hosts,
    /// so one tenant's slow receivers spread over many host names cannot take every slot.
    #[arg(long, env = "JOBHOOK_DELIVERY_CONCURRENCY_PER_TENANT", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub delivery_concurrency_per_tenant: u32,

    /// The most polls in flight at once, over all jobs (a due job waits for a free one).
    #[arg(long, env = "JOBHOOK_POLL_CONCURRENCY", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub poll_concurrency: u32,

    /// The most polls per second sent upstream, over all jobs (a token bucket); 0 = no cap.
    #[arg(long, env = "JOBHOOK_UPSTREAM_MAX_RPS", default_value_t = 100)]
    pub upstream_max_rps: u32,

    /// After a signing-secret rotation, how long deliveries also carry a signature with the old secret.
    #[arg(long, env = "JOBHOOK_SECRET_ROTATION_GRACE", default_value = "24h", value_parser = parse_duration)]
    pub secret_rotation_grace: Duration,

    /// How long ended subscriptions (delivered, failed, expired, cancelled) are kept, with their delivery
    /// attempts; 0 keeps everything. Live subscriptions are never purged.
    #[arg(long, env = "JOBHOOK_RETENTION", default_value = "30d", value_parser = parse_duration)]
    pub retention: Duration,

    /// When housekeeping (the retention purge) runs: a cron expression with seconds, in UTC.
    #[arg(long, env = "JOBHOOK_HOUSEKEEPING_SCHEDULE", default_value = "0 */5 * * * *", value_parser = parse_cron)]
    pub housekeeping_schedule: String,

    /// PostgreSQL scale-out: an instance that dies has its work taken over within this.
    #[arg(long, env = "JOBHOOK_LEASE_TTL", default_value = "15s", value_parser = parse_duration)]
    pub lease_ttl: Duration,

    /// On SIGTERM or Ctrl-C, how long in-flight polls and deliveries may take to finish.
    #[arg(long, env = "JOBHOOK_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// How long an API client may take to send a request's headers, and then its body: a connection
    /// whose headers are late is closed, a body that is late is answered 408.
    #[arg(long, env = "JOBHOOK_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    pub request_timeout: Duration,

    /// The most API client connections open at once; past it, new connections wait in the listen
    /// queue until one closes. Bounds the memory that idle or slow clients can take.
    #[arg(long, env = "JOBHOOK_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Serve the web console at /console (sign in with an API key); false leaves the JSON API alone.
    #[arg(long, env = "JOBHOOK_CONSOLE", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub console: bool,
}

/// The delays between delivery attempts after the first one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule(pub Vec<Duration>);

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{e} (use a duration such as 200ms, 5s, 5m or 2h)"))
}

/// A cron expression with seconds, as housekeeping's scheduler takes it.
fn parse_cron(s: &str) -> Result<String, String> {
    let s = s.trim();
    tokio_cron_scheduler::Job::new_async(s, |_, _| Box::pin(async {}))
        .map(|_| s.to_owned())
        .map_err(|e| format!("not a cron expression with seconds such as \"0 */5 * * * *\" ({e})"))
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() { Err("must be greater than zero".into()) } else { Ok(d) }
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.trim().parse().map_err(|_| "not an address such as 127.0.0.1:8080".to_owned())
}

fn parse_http_url(s: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(s.trim()).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err("must be an http(s) URL with a host".into());
    }
    Ok(url)
}

fn parse_schedule(s: &str) -> Result<RetrySchedule, String> {
    let s = s.trim();
    if s.is_empty() {
        // An empty schedule is meaningful: one attempt, no retries.
        return Ok(RetrySchedule(Vec::new()));
    }
    s.split(',')
        .map(|part| parse_duration(part).map_err(|e| format!("{:?}: {e}", part.trim())))
        .collect::<Result<Vec<_>, _>>()
        .map(RetrySchedule)
}

/// A validated setting error: names the setting and says what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {setting} ({env}): {message}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub env: &'static str,
    pub message: String,
}

fn bad(setting: &'static str, env: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError { setting, env, message: message.into() }
}

/// The validated settings of `serve`.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub database_url: String,
    pub upstream: UpstreamConfig,
    pub api_keys: Vec<ApiKey>,
    pub signing_secret: Option<SigningSecret>,
    pub poll: PollConfig,
    pub delivery: DeliveryConfig,
    pub egress: EgressPolicy,
    pub secret_rotation_grace: Duration,
    pub lease_ttl: Duration,
    pub shutdown_grace: Duration,
    pub request_timeout: Duration,
    pub max_connections: usize,
    pub housekeeping: HousekeepingConfig,
    /// Whether the web console is served at `/console`.
    pub console: bool,
    /// The job APIs polled: the built-in `aetherforge` first, then the config file's `[[upstream]]`
    /// tables ([`Config::add_profiles`]).
    pub upstreams: Vec<upstreams::UpstreamProfile>,
}

impl Config {
    /// Adds the `[[upstream]]` tables of the config file at `path`.
    pub fn add_profiles(&mut self, path: &str) -> Result<(), upstreams::ProfileError> {
        let env = |var: &str| std::env::var(var).ok();
        let profiles = upstreams::from_file(path, self, &env)?;
        self.upstreams.extend(profiles);
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct HousekeepingConfig {
    /// How long ended subscriptions are kept; `None`: for ever.
    pub retention: Option<Duration>,
    /// When the purge runs (a cron expression with seconds).
    pub schedule: String,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub base_url: url::Url,
    pub api_key: Option<ApiKey>,
    pub timeout: Duration,
    /// The one proxy polls may go through (never one from the environment).
    pub proxy: Option<url::Url>,
}

#[derive(Debug, Clone)]
pub struct PollConfig {
    pub interval: Duration,
    pub max_interval: Duration,
    pub max_wait: Duration,
    pub not_found_grace: Duration,
    /// How many polls may be in flight at once, over all jobs.
    pub max_in_flight: usize,
    /// The cap on polls per second over all jobs; `None`: no cap.
    pub max_rps: Option<std::num::NonZeroU32>,
}

#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    pub retry_schedule: Vec<Duration>,
    pub timeout: Duration,
    /// How many callback requests may be in flight at once, over all hosts.
    pub max_in_flight: usize,
    /// How many callback requests may be in flight at once to one host, so one slow host cannot take
    /// every slot.
    pub max_in_flight_per_host: usize,
    /// How many callback requests may be in flight at once for one tenant, over all its hosts.
    pub max_in_flight_per_tenant: usize,
    pub breaker: BreakerConfig,
}

/// When a callback host's breaker opens, and how often an open one is probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failed attempts that open it; 0: never.
    pub after: u32,
    /// The least time those failures must span.
    pub min_span: Duration,
    pub probe_interval: Duration,
}

impl ServeArgs {
    /// The settings the service trusts: each value was parsed by its flag's type; what is left here
    /// are the checks across settings and the secrets (never quoted back in an error).
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let database_url = self.store.database_url.trim().to_owned();
        crate::store::check_url(&database_url).map_err(|m| bad("--database-url", "JOBHOOK_DATABASE_URL", m))?;

        let upstream_api_key = self.upstream_api_key()?;
        let upstream_proxy = self.upstream_proxy()?;
        let (api_keys, signing_secret) = self.own_keys()?;
        self.check_across()?;
        let allow_cidrs = self.allow_cidrs()?;

        let mut config = Config {
            listen: self.listen,
            database_url,
            upstream: UpstreamConfig {
                base_url: self.upstream_url,
                api_key: upstream_api_key,
                timeout: self.upstream_timeout,
                proxy: upstream_proxy,
            },
            api_keys,
            signing_secret,
            poll: PollConfig {
                interval: self.poll_interval,
                max_interval: self.poll_max_interval,
                max_wait: self.max_wait,
                not_found_grace: self.not_found_grace,
                max_in_flight: widen(self.poll_concurrency),
                max_rps: std::num::NonZeroU32::new(self.upstream_max_rps),
            },
            delivery: DeliveryConfig {
                retry_schedule: self.retry_schedule.0,
                timeout: self.delivery_timeout,
                max_in_flight: widen(self.delivery_concurrency),
                max_in_flight_per_host: widen(self.delivery_concurrency_per_host),
                max_in_flight_per_tenant: widen(self.delivery_concurrency_per_tenant),
                breaker: BreakerConfig {
                    after: self.breaker_after,
                    min_span: self.breaker_min_span,
                    probe_interval: self.breaker_probe_interval,
                },
            },
            egress: EgressPolicy {
                allow_private: self.allow_private_callbacks,
                allow_cidrs: std::sync::Arc::new(allow_cidrs),
                https_only: self.callback_https_only,
            },
            secret_rotation_grace: self.secret_rotation_grace,
            lease_ttl: self.lease_ttl,
            shutdown_grace: self.shutdown_grace,
            request_timeout: self.request_timeout,
            max_connections: widen(self.max_connections),
            housekeeping: HousekeepingConfig {
                retention: (!self.retention.is_zero()).then_some(self.retention),
                schedule: self.housekeeping_schedule,
            },
            console: self.console,
            upstreams: Vec::new(),
        };
        config.upstreams.push(upstreams::UpstreamProfile::aetherforge(&config));
        Ok(config)
    }

    /// The key we poll the upstream with: whatever the upstream issued.
    fn upstream_api_key(&self) -> Result<Option<ApiKey>, ConfigError> {
        match self.upstream_api_key.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(key) => ApiKey::new_upstream(key)
                .map(Some)
                .map_err(|m| bad("--upstream-api-key", "JOBHOOK_UPSTREAM_API_KEY", m)),
        }
    }

    /// Our own API keys and the secret that signs for them.
    fn own_keys(&self) -> Result<(Vec<ApiKey>, Option<SigningSecret>), ConfigError> {
        let mut api_keys = Vec::new();
        for key in self.api_keys.iter().map(|k| k.trim()).filter(|k| !k.is_empty()) {
            let key = ApiKey::new_configured(key).map_err(|m| bad("--api-keys", "JOBHOOK_API_KEYS", m))?;
            if !api_keys.contains(&key) {
                api_keys.push(key);
            }
        }
        let signing_secret = match self.signing_secret.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => {
                Some(s.parse::<SigningSecret>().map_err(|m| bad("--signing-secret", "JOBHOOK_SIGNING_SECRET", m))?)
            }
        };

        Ok((api_keys, signing_secret))
    }

    fn upstream_proxy(&self) -> Result<Option<url::Url>, ConfigError> {
        let upstream_proxy = match self.upstream_proxy.as_deref().map(str::trim) {
            None | Some("") => None,
            // The value is not quoted back: it may hold the proxy's password.
            Some(raw) => Some(
                url::Url::parse(raw)
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
                    .filter(|u| reqwest::Proxy::all(u.as_str()).is_ok())
                    .ok_or_else(|| {
                        bad(
                            "--upstream-proxy",
                            "JOBHOOK_UPSTREAM_PROXY",
                            "must be an http:// or https:// URL such as http://proxy.internal:3128",
                        )
                    })?,
            ),
        };

        Ok(upstream_proxy)
    }

    /// The checks that compare settings with each other, or bound a list.
    fn check_across(&self) -> Result<(), ConfigError> {
        if self.poll_max_interval < self.poll_interval {
            return Err(bad(
                "--poll-max-interval",
                "JOBHOOK_POLL_MAX_INTERVAL",
                format!("must be at least --poll-interval ({})", humantime::format_duration(self.poll_interval)),
            ));
        }
        if self.poll_max_interval > Duration::from_secs(3600) {
            return Err(bad("--poll-max-interval", "JOBHOOK_POLL_MAX_INTERVAL", "must be at most 1h"));
        }
        if self.lease_ttl < Duration::from_millis(500) {
            return Err(bad("--lease-ttl", "JOBHOOK_LEASE_TTL", "must be at least 500ms"));
        }
        if !(1..=self.delivery_concurrency).contains(&self.delivery_concurrency_per_host) {
            return Err(bad(
                "--delivery-concurrency-per-host",
                "JOBHOOK_DELIVERY_CONCURRENCY_PER_HOST",
                "must be between 1 and --delivery-concurrency",
            ));
        }
        if !(1..=self.delivery_concurrency).contains(&self.delivery_concurrency_per_tenant) {
            return Err(bad(
                "--delivery-concurrency-per-tenant",
                "JOBHOOK_DELIVERY_CONCURRENCY_PER_TENANT",
                "must be between 1 and --delivery-concurrency",
            ));
        }
        if self.retry_schedule.0.len() > 100 {
            return Err(bad("--retry-schedule", "JOBHOOK_RETRY_SCHEDULE", "at most 100 retries"));
        }
        if self.retry_schedule.0.iter().any(|d| *d > Duration::from_secs(7 * 24 * 3600)) {
            return Err(bad("--retry-schedule", "JOBHOOK_RETRY_SCHEDULE", "each delay must be at most 7 days"));
        }
        Ok(())
    }

    fn allow_cidrs(&self) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        let mut allow_cidrs = Vec::new();
        for cidr in self.callback_allow_cidrs.iter().map(|c| c.trim()).filter(|c| !c.is_empty()) {
            let net = cidr.parse::<ipnet::IpNet>().map_err(|_| {
                bad(
                    "--callback-allow-cidrs",
                    "JOBHOOK_CALLBACK_ALLOW_CIDRS",
                    format!("{cidr:?} is not a CIDR such as 10.20.0.0/16"),
                )
            })?;
            allow_cidrs.push(net.trunc());
        }
        Ok(allow_cidrs)
    }
}

/// A count of slots (at most 100,000, checked by its parser) as the `usize` semaphores take.
fn widen(n: u32) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// What may be called back (the policy's checks are in `delivery::client`).
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    /// Allow every address (tests, internal networks).
    pub allow_private: bool,
    /// Networks allowed even though they are not public (internal receivers).
    pub allow_cidrs: std::sync::Arc<Vec<ipnet::IpNet>>,
    /// Refuse plain-http callbacks.
    pub https_only: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `serve`'s settings alone, as the command line parses them.
    #[derive(clap::Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["serve"];
        argv.extend_from_slice(args);
        let serve = <Serve as clap::Parser>::try_parse_from(argv).map_err(|e| e.to_string())?;
        serve.args.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn the_defaults_are_the_documented_ones() {
        let cfg = parse(&[]).unwrap();
        assert_eq!(cfg.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(cfg.database_url, "sqlite://jobhook.db");
        assert_eq!(cfg.upstream.base_url.as_str(), "https://api.aetherforgeai.com/");
        assert_eq!(cfg.poll.interval, Duration::from_secs(1));
        assert_eq!(cfg.poll.max_interval, Duration::from_secs(10));
        assert_eq!(cfg.poll.max_wait, Duration::from_secs(24 * 3600));
        let hours = |h: u64| Duration::from_secs(h * 3600);
        assert_eq!(
            cfg.delivery.retry_schedule,
            vec![
                Duration::from_secs(5),
                Duration::from_secs(300),
                Duration::from_secs(1800),
                hours(2),
                hours(5),
                hours(10),
                hours(10)
            ]
        );
        assert_eq!(cfg.delivery.timeout, Duration::from_secs(15));
        assert!(!cfg.egress.allow_private);
        assert!(!cfg.egress.https_only);
        assert_eq!(cfg.poll.max_rps, std::num::NonZeroU32::new(100));
        assert_eq!(cfg.poll.max_in_flight, 512);
        assert_eq!(cfg.secret_rotation_grace, Duration::from_secs(24 * 3600));
    }

    #[test]
    fn the_upstream_key_is_the_upstreams_business() {
        // Our own API keys need 16 characters; the upstream's key is whatever the upstream issued.
        let cfg = parse(&["--upstream-api-key", "short"]).unwrap();
        assert_eq!(cfg.upstream.api_key.unwrap().expose(), "short");
        assert!(parse(&["--upstream-api-key", "has space"]).unwrap_err().contains("--upstream-api-key"));
    }

    #[test]
    fn durations_take_the_human_form() {
        let cfg = parse(&["--poll-interval", "200ms", "--retry-schedule", "1s, 2m,3h"]).unwrap();
        assert_eq!(cfg.poll.interval, Duration::from_millis(200));
        assert_eq!(
            cfg.delivery.retry_schedule,
            vec![Duration::from_secs(1), Duration::from_secs(120), Duration::from_secs(3 * 3600)]
        );
    }

    #[test]
    fn an_upstream_proxy_must_be_an_http_url_and_is_never_quoted_back() {
        for bad in ["socks5://u:hunter2@proxy:1080", "proxy:3128", "http://u:hunter2@"] {
            let err = parse(&["--upstream-proxy", bad]).unwrap_err();
            assert!(err.contains("--upstream-proxy") && !err.contains("hunter2"), "{bad}: {err}");
        }
        let cfg = parse(&["--upstream-proxy", "http://u:pw@proxy.internal:3128"]).unwrap();
        assert_eq!(cfg.upstream.proxy.unwrap().host_str(), Some("proxy.internal"));
        assert!(parse(&[]).unwrap().upstream.proxy.is_none(), "no proxy unless one is set");
    }

    #[test]
    fn a_bad_setting_is_named_in_the_error() {
        assert!(parse(&["--poll-interval", "soon"]).unwrap_err().contains("--poll-interval"));
        assert!(
            parse(&["--poll-interval", "5s", "--poll-max-interval", "1s"]).unwrap_err().contains("--poll-max-interval")
        );
        assert!(parse(&["--listen", "nowhere"]).unwrap_err().contains("--listen"));
        assert!(parse(&["--signing-secret", "hunter2"]).unwrap_err().contains("--signing-secret"));
        assert!(parse(&["--database-url", "mysql://x"]).unwrap_err().contains("--database-url"));
        assert!(parse(&["--callback-allow-cidrs", "10.0.0.0/33"]).unwrap_err().contains("--callback-allow-cidrs"));
        assert!(
            parse(&["--delivery-concurrency", "8", "--delivery-concurrency-per-host", "9"])
                .unwrap_err()
                .contains("--delivery-concurrency-per-host")
        );
    }

    #[test]
    fn a_bad_secret_is_not_echoed_back() {
        let err = parse(&["--signing-secret", "whsec_short-secret-value"]).unwrap_err();
        assert!(!err.contains("short-secret-value"), "{err}");
    }
}
