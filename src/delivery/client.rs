//! The egress policy for callbacks, and the HTTP client that enforces it.
//!
//! A callback URL is a caller-chosen address that our server will POST to: without a policy it is a way
//! into the operator's network (SSRF). By default we refuse every address that is not public unicast
//! (loopback, private, link-local including cloud metadata, CGNAT, multicast, documentation, reserved,
//! and the IPv6 forms that embed such an IPv4 address). We check twice (DESIGN promise 9):
//!
//! * at registration, so the caller gets a 422 that says why (for a host name, one sentence whatever
//!   the reason: the caller must not learn which names the operator's DNS knows, nor where they point);
//! * at connect time, through a resolver that drops refused addresses and hands the connector only the
//!   vetted ones, so a host that resolves to something else later (DNS rebinding) cannot slip through.
//!
//! Redirects are never followed: a 3xx is just a failed attempt.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use futures_util::future::BoxFuture;
use ipnet::{IpNet, Ipv6Net};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

pub use crate::config::EgressPolicy;
use crate::domain::CallbackUrl;
use crate::upstream::USER_AGENT;

/// How names become addresses: the system resolver in production; tests may put a DNS of their own in
/// its place (to play DNS rebinding, say). An error of kind [`std::io::ErrorKind::NotFound`] says the
/// name does not exist (or has no address); any other error is trouble that may pass (a timeout, a
/// resolver that cannot be reached).
pub type Lookup = Arc<dyn Fn(String, u16) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> + Send + Sync>;

/// The system resolver (getaddrinfo, so /etc/hosts and nsswitch apply as for any program).
///
/// Through `dns-lookup` rather than `tokio::net::lookup_host`: the standard library keeps only the
/// message of a getaddrinfo failure, and registration must tell "no such name" (the caller's mistake,
/// 422) from "try again" (ours, 503) by its code, not by its wording.
pub fn system_lookup() -> Lookup {
    Arc::new(|host: String, port: u16| {
        Box::pin(async move {
            let found = tokio::task::spawn_blocking(move || dns_lookup::lookup_host(&host))
                .await
                .map_err(std::io::Error::other)?;
            match found {
                Ok(ips) => Ok(ips.map(|ip| SocketAddr::new(ip, port)).collect()),
                Err(e) => {
                    let kind = match e.kind() {
                        dns_lookup::LookupErrorKind::NoName | dns_lookup::LookupErrorKind::NoData => {
                            std::io::ErrorKind::NotFound
                        }
                        _ => std::io::ErrorKind::Other,
                    };
                    Err(std::io::Error::new(kind, std::io::Error::from(e)))
                }
            }
        })
    })
}

/// Why a callback URL cannot be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The URL is not allowed: the caller must send another (422). The text says why.
    #[error("{0}")]
    NotAllowed(String),
    /// DNS could not answer now (a timeout, a temporary failure): the same URL may pass later (503).
    #[error("{0}")]
    DnsUnavailable(String),
}

/// The egress policy refused a callback's address at delivery time: retrying cannot help. The vetting
/// resolver returns it inside the client's connect error; [`find_refusal`] finds it again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("egress policy: {0}")]
pub struct EgressRefused(pub String);

/// The egress refusal somewhere in a failed request's cause chain, if there is one.
pub fn find_refusal<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a EgressRefused> {
    let mut cause = Some(e);
    while let Some(e) = cause {
        // An `io::Error` hides the error it wraps from `source()` (it returns that error's own source).
        let wrapped = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).map(|inner| inner as _);
        if let Some(refused) = e.downcast_ref::<EgressRefused>().or_else(|| wrapped.and_then(find_refusal)) {
            return Some(refused);
        }
        cause = e.source();
    }
    None
}

/// How long registration waits for DNS before refusing a callback host.
const REGISTRATION_DNS_TIMEOUT: Duration = Duration::from_secs(5);

impl EgressPolicy {
    /// Whether this callback URL may be registered; a refusal carries a sentence for the caller.
    pub async fn check_registration(&self, url: &CallbackUrl, lookup: &Lookup) -> Result<(), Refusal> {
        let url = url.as_url();
        self.check_scheme(url).map_err(Refusal::NotAllowed)?;
        if self.allow_private {
            return Ok(());
        }
        let port = url.port_or_known_default().unwrap_or(443);
        let name = match url.host() {
            Some(url::Host::Ipv4(ip)) => return self.check_ip(IpAddr::V4(ip)).map_err(Refusal::NotAllowed),
            Some(url::Host::Ipv6(ip)) => return self.check_ip(IpAddr::V6(ip)).map_err(Refusal::NotAllowed),
            Some(url::Host::Domain(name)) => name,
            None => return Err(Refusal::NotAllowed("callback_url has no host".into())),
        };
        check_name(name).map_err(Refusal::NotAllowed)?;
        // One sentence for a name that does not exist, has no address or points somewhere refused:
        // telling them apart would let callers map the operator's internal DNS.
        let refused = || {
            Refusal::NotAllowed(format!(
                "the callback host {name:?} must resolve to public addresses only, and does not: other addresses are not allowed (the operator can allow networks with JOBHOOK_CALLBACK_ALLOW_CIDRS or JOBHOOK_ALLOW_PRIVATE_CALLBACKS)"
            ))
        };
        let try_later = |what: &str| {
            Refusal::DnsUnavailable(format!(
                "the callback host {name:?} could not be looked up: {what}; nothing was saved, try again shortly"
            ))
        };
        let addrs = match tokio::time::timeout(REGISTRATION_DNS_TIMEOUT, lookup(name.to_owned(), port)).await {
            Ok(Ok(addrs)) => addrs,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return Err(refused()),
            Ok(Err(_)) => return Err(try_later("DNS failed for now")),
            Err(_) => {
                return Err(try_later(&format!(
                    "DNS did not answer within {}",
                    humantime::format_duration(REGISTRATION_DNS_TIMEOUT)
                )));
            }
        };
        if addrs.is_empty() || addrs.iter().any(|addr| !self.allows(addr.ip())) {
            return Err(refused());
        }
        Ok(())
    }

    /// The check made just before each attempt: the scheme, and hosts that are IP literals (the
    /// connector does not ask the resolver for those).
    pub fn check_literal(&self, url: &url::Url) -> Result<(), EgressRefused> {
        self.check_scheme(url).map_err(EgressRefused)?;
        if self.allow_private {
            return Ok(());
        }
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.check_ip(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_ip(IpAddr::V6(ip)),
            Some(url::Host::Domain(name)) => check_name(name),
            None => Err("callback_url has no host".into()),
        }
        .map_err(EgressRefused)
    }

    fn check_scheme(&self, url: &url::Url) -> Result<(), String> {
        if self.https_only && url.scheme() != "https" {
            return Err("callback_url must use https (the operator set JOBHOOK_CALLBACK_HTTPS_ONLY)".into());
        }
        Ok(())
    }

    /// Whether an address may be dialled under this policy.
    pub fn allows(&self, ip: IpAddr) -> bool {
        // An IPv4-mapped IPv6 address (`::ffff:127.0.0.1`) is judged, and matched against the allowed
        // ranges, as the IPv4 address it carries.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.allow_private || refused_because(ip).is_none() || self.allow_cidrs.iter().any(|net| net.contains(&ip))
    }

    fn check_ip(&self, ip: IpAddr) -> Result<(), String> {
        if self.allows(ip) {
            return Ok(());
        }
        let why = refused_because(ip).unwrap_or("refused");
        Err(format!(
            "{ip}, a {why} address, which is not allowed (the operator can allow it with JOBHOOK_CALLBACK_ALLOW_CIDRS or JOBHOOK_ALLOW_PRIVATE_CALLBACKS)"
        ))
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return Err(format!("the callback host {name:?} is a loopback name, which is not allowed"));
    }
    Ok(())
}

/// Why an address may not be called back, or `None` for a public unicast address.
pub fn refused_because(ip: IpAddr) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) if V4_COMPATIBLE.contains(&v6) => {
            return Some(match v6 {
                Ipv6Addr::UNSPECIFIED => "unspecified",
                Ipv6Addr::LOCALHOST => "loopback",
                _ => "IPv4-compatible (deprecated)",
            });
        }
        // Forms that carry an IPv4 address are judged by that address.
        IpAddr::V6(v6) => embedded_v4(v6).map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    if let Some((_, why)) = REFUSED_RANGES.iter().find(|(net, _)| net.contains(&ip)) {
        return Some(why);
    }
    match ip {
        // Only 2000::/3 is allocated as global unicast.
        IpAddr::V6(v6) if !GLOBAL_UNICAST.contains(&v6) => Some("reserved"),
        _ => None,
    }
}

/// The ranges no callback may reach, and why, in the notation of IANA's IPv4 and IPv6 special-purpose
/// address registries. The IPv6 forms that carry an IPv4 address are judged by that address first
/// ([`embedded_v4`]); IPv6 outside 2000::/3 is refused as reserved.
const REFUSED: &[(&str, &str)] = &[
    ("0.0.0.0/8", "\"this network\" (unspecified)"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared (CGNAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignment"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("2001::/32", "Teredo"),
    ("2001:2::/48", "benchmarking"),
    ("2001:10::/28", "ORCHID"),
    ("2001:20::/28", "ORCHID"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("fc00::/7", "unique local (private)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
];

/// [`REFUSED`], parsed once (a unit test parses every row).
static REFUSED_RANGES: LazyLock<Vec<(IpNet, &'static str)>> = LazyLock::new(|| {
    REFUSED.iter().map(|(net, why)| (net.parse().expect("REFUSED holds CIDR ranges"), *why)).collect()
});

const GLOBAL_UNICAST: Ipv6Net = Ipv6Net::new_assert(Ipv6Addr::new(0x2000, 0, 0, 0, 0, 0, 0, 0), 3);
/// ::/96, the deprecated IPv4-compatible form; also :: and ::1.
const V4_COMPATIBLE: Ipv6Net = Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 96);
const NAT64: Ipv6Net = Ipv6Net::new_assert(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96);
const SIX_TO_FOUR: Ipv6Net = Ipv6Net::new_assert(Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16);

/// The IPv4 address that an IPv6 address carries, in the forms that reach it: IPv4-mapped, NAT64 (the
/// gateway connects to the low 32 bits) and 6to4 (bits 16..48).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(ip);
    if NAT64.contains(&ip) {
        Some(Ipv4Addr::from((bits & 0xffff_ffff) as u32))
    } else if SIX_TO_FOUR.contains(&ip) {
        Some(Ipv4Addr::from(((bits >> 80) & 0xffff_ffff) as u32))
    } else {
        ip.to_ipv4_mapped()
    }
}

/// A DNS resolver that hands the connector only addresses the policy allows.
struct VettingResolver {
    policy: EgressPolicy,
    lookup: Lookup,
}

impl Resolve for VettingResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let (policy, lookup) = (self.policy.clone(), self.lookup.clone());
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let refuse = |why: String| -> Box<dyn std::error::Error + Send + Sync> { Box::new(EgressRefused(why)) };
            // With private callbacks allowed, `localhost` passes registration, so it must connect too.
            if !policy.allow_private {
                check_name(&host).map_err(refuse)?;
            }
            let addrs = lookup(host.clone(), 0).await?;
            let allowed: Vec<SocketAddr> = addrs.iter().copied().filter(|a| policy.allows(a.ip())).collect();
            if allowed.is_empty() {
                return Err(match addrs.first() {
                    Some(_) => refuse(format!("{host} resolves only to non-public addresses")),
                    None => format!("{host} has no address").into(),
                });
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// The client for callbacks: the policy's resolver, no redirects, no proxy, one timeout per request.
pub fn callback_client(policy: &EgressPolicy, lookup: Lookup, timeout: Duration) -> reqwest::Client {
    crate::install_crypto();
    let mut builder = reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .pool_idle_timeout(Duration::from_secs(30));
    // Every name goes through the vetting resolver, also when the policy allows everything, so tests
    // that bring their own DNS exercise the same path as production.
    builder = builder.dns_resolver(Arc::new(VettingResolver { policy: policy.clone(), lookup }));
    builder.build().expect("the callback client's settings are valid")
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn refused(s: &str) -> bool {
        refused_because(s.parse().unwrap()).is_some()
    }

    #[test]
    fn non_public_ipv4_addresses_are_refused() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.5",
            "198.51.100.7",
            "203.0.113.9",
            "240.0.0.1",
        ] {
            assert!(refused(ip), "{ip} should be refused");
        }
    }

    #[test]
    fn public_addresses_are_allowed() {
        for ip in ["93.184.216.34", "8.8.8.8", "172.32.0.1", "2606:4700::1111", "2a00:1450:4001:80b::200e"] {
            assert!(!refused(ip), "{ip} should be allowed");
        }
    }

    #[test]
    fn ipv6_spellings_of_refused_addresses_are_refused() {
        for ip in [
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::10.0.0.1",
            "2002:7f00:1::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "2001::1",
        ] {
            assert!(refused(ip), "{ip} should be refused");
        }
        assert!(!refused("64:ff9b::8.8.8.8"));
    }

    #[test]
    fn every_refused_range_is_refused_for_its_own_reason() {
        for (net, why) in REFUSED {
            let first = net.parse::<IpNet>().unwrap().network();
            assert_eq!(refused_because(first), Some(*why), "{net}");
        }
    }

    #[tokio::test]
    async fn registration_refuses_private_literals_and_loopback_names() {
        let policy = EgressPolicy::default();
        for url in [
            "http://127.0.0.1:8080/hook",
            "http://[::1]/hook",
            "http://[::ffff:7f00:1]/hook",
            "http://2130706433/hook",
            "http://0x7f.1/hook",
            "http://0177.0.0.1/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://localhost/hook",
            "http://api.localhost./hook",
        ] {
            let url: CallbackUrl = url.parse().unwrap();
            let err = policy.check_registration(&url, &system_lookup()).await.unwrap_err();
            assert!(matches!(&err, Refusal::NotAllowed(why) if why.contains("not allowed")), "{url}: {err}");
        }
    }

    #[tokio::test]
    async fn the_system_lookup_resolves_with_the_port_asked_for() {
        let addrs = system_lookup()("localhost".into(), 8080).await.unwrap();
        assert!(!addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 8080), "{addrs:?}");
    }

    #[tokio::test]
    async fn allowing_private_callbacks_allows_loopback() {
        let policy = EgressPolicy { allow_private: true, ..Default::default() };
        let url: CallbackUrl = "http://127.0.0.1:9/hook".parse().unwrap();
        assert!(policy.check_registration(&url, &system_lookup()).await.is_ok());
    }

    #[tokio::test]
    async fn an_allowed_cidr_opens_just_that_network() {
        let policy =
            EgressPolicy { allow_cidrs: Arc::new(vec!["10.20.0.0/16".parse().unwrap()]), ..Default::default() };
        let inside: CallbackUrl = "http://10.20.3.4/hook".parse().unwrap();
        let outside: CallbackUrl = "http://10.21.0.1/hook".parse().unwrap();
        assert!(policy.check_registration(&inside, &system_lookup()).await.is_ok());
        assert!(policy.check_registration(&outside, &system_lookup()).await.is_err());
        // The IPv4-mapped IPv6 forms are the same addresses.
        let mapped_inside: CallbackUrl = "http://[::ffff:10.20.3.4]/hook".parse().unwrap();
        let mapped_outside: CallbackUrl = "http://[::ffff:10.21.0.1]/hook".parse().unwrap();
        assert!(policy.check_registration(&mapped_inside, &system_lookup()).await.is_ok());
        assert!(policy.check_registration(&mapped_outside, &system_lookup()).await.is_err());
    }

    #[tokio::test]
    async fn https_only_refuses_plain_http() {
        let policy = EgressPolicy { https_only: true, allow_private: true, ..Default::default() };
        let plain: CallbackUrl = "http://example.com/hook".parse().unwrap();
        assert!(policy.check_registration(&plain, &system_lookup()).await.unwrap_err().to_string().contains("https"));
        assert!(policy.check_literal(plain.as_url()).is_err());
    }

    #[tokio::test]
    async fn the_resolver_dials_only_vetted_addresses() {
        let lookup: Lookup = Arc::new(|_, _| {
            Box::pin(async {
                Ok(vec![
                    "127.0.0.1:0".parse().unwrap(),
                    "93.184.216.34:0".parse().unwrap(),
                    "10.0.0.1:0".parse().unwrap(),
                ])
            })
        });
        let resolver = VettingResolver { policy: EgressPolicy::default(), lookup };
        let addrs: Vec<SocketAddr> =
            resolver.resolve(Name::from_str("mixed.example").unwrap()).await.unwrap().collect();
        assert_eq!(addrs, vec!["93.184.216.34:0".parse::<SocketAddr>().unwrap()]);

        let private: Lookup = Arc::new(|_, _| Box::pin(async { Ok(vec!["169.254.169.254:0".parse().unwrap()]) }));
        let resolver = VettingResolver { policy: EgressPolicy::default(), lookup: private };
        let err = resolver.resolve(Name::from_str("rebound.example").unwrap()).await.err().unwrap();
        assert!(find_refusal(err.as_ref()).is_some(), "{err}");
    }
}
