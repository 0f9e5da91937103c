//! The words of the service, parsed once at the edge.
//!
//! Untrusted input (a caller's JSON, an upstream answer, a row read back from the store) becomes one of
//! these types as soon as it arrives; everything inside trusts them. Each parse failure carries a message
//! a person can act on, because it ends up, as is, in a problem+json `detail`.

use std::fmt;
use std::ops::{Add, Sub};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strum::VariantArray;
use uuid::Uuid;

mod headers;
mod payload;
pub use headers::CallbackHeaders;
pub use payload::{MAX_METADATA_BYTES, Payload, metadata_from_request};

/// The name of the built-in upstream profile: every job registered without `"upstream"` is its, and so
/// is every row stored before profiles existed.
pub const DEFAULT_UPSTREAM: &str = "aetherforge";

/// A job, as (upstream profile, the upstream's own job ID), kept as one store key: the bare canonical
/// UUID for the built-in AetherForge profile (so rows stored before profiles existed are already its,
/// with no table rewrite) and `<upstream>:<id>` for any other. Profile names hold no `:`, so the key is
/// unambiguous. Cheap to clone (one `Arc`); the same job spelled in upper case is still one poll stream
/// because the profile canonicalises the ID before it gets here.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(Arc<str>);

/// How many partitions the jobs are split into; instances sharing a PostgreSQL database lease them.
pub const PARTITIONS: u32 = 64;

impl JobId {
    /// The job `id` of the profile `upstream`; `id` must already have passed that profile's format.
    pub fn new(upstream: &str, id: &str) -> Self {
        if upstream == DEFAULT_UPSTREAM { JobId(Arc::from(id)) } else { JobId(Arc::from(format!("{upstream}:{id}"))) }
    }

    /// A key read back from the store (or a notice), which wrote only keys it had made.
    pub fn from_key(key: &str) -> Result<Self, String> {
        match key.split_once(':') {
            Some((upstream, id)) if !upstream.is_empty() && !id.is_empty() => Ok(JobId(Arc::from(key))),
            Some(_) => Err(format!("not a job key: {:?}", truncate(key, 64))),
            None => key.parse(),
        }
    }

    /// The store key (see the type's comment).
    pub fn key(&self) -> &str {
        &self.0
    }

    /// The profile this job belongs to.
    pub fn upstream(&self) -> &str {
        self.0.split_once(':').map_or(DEFAULT_UPSTREAM, |(upstream, _)| upstream)
    }

    /// The upstream's own ID, as the API shows it and the status path carries it.
    pub fn id(&self) -> &str {
        self.0.split_once(':').map_or(&self.0, |(_, id)| id)
    }

    /// The job's partition, 0..[`PARTITIONS`]. An AetherForge job hashes all bits of its UUID (as it
    /// always has, so stored rows keep their partition), so v7 UUIDs spread as evenly as random ones;
    /// another profile's job hashes its whole key (FNV-1a, fixed: the partition is stored).
    pub fn partition(&self) -> i64 {
        if let Ok(uuid) = Uuid::try_parse(&self.0) {
            return uuid_partition(uuid);
        }
        let hash =
            self.0.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        let mixed = hash.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        i64::from((mixed >> 58) as u32 % PARTITIONS)
    }
}

fn uuid_partition(uuid: Uuid) -> i64 {
    let (hi, lo) = uuid.as_u64_pair();
    let mixed = (hi ^ lo.rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    i64::from((mixed >> 58) as u32 % PARTITIONS)
}

/// An AetherForge job ID (a UUID, kept in its canonical lowercase hyphenated form).
impl FromStr for JobId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::try_parse(s.trim()).map(|u| JobId(Arc::from(u.as_hyphenated().to_string()))).map_err(|_| {
            format!("job_id must be a UUID such as 3f1c2b9e-8a4d-4c6e-9b1a-2d5e7f9a0c11, got {:?}", truncate(s, 64))
        })
    }
}

/// The store key: what logs and notices carry.
impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Our ID for one subscription: a UUIDv7, so that sorting by ID is sorting by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SubscriptionId(pub Uuid);

impl SubscriptionId {
    pub fn new() -> Self {
        SubscriptionId(Uuid::now_v7())
    }
}

impl Default for SubscriptionId {
    fn default() -> Self {
        Self::new()
    }
}

impl FromStr for SubscriptionId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::try_parse(s).map(SubscriptionId)
    }
}

impl fmt::Display for SubscriptionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.as_hyphenated().fmt(f)
    }
}

/// The Standard Webhooks `webhook-id` of one delivery: fixed when the delivery is created, kept across
/// its retries, its redeliveries and our restarts, so that receivers can drop duplicates.
pub fn new_webhook_id() -> String {
    format!("msg_{}", Uuid::now_v7().simple())
}

/// The longest callback URL we accept, in bytes (the common browser and proxy limit).
pub const MAX_CALLBACK_URL_LEN: usize = 2048;

/// A callback URL that is syntactically fit to POST to: absolute http(s), a host, no credentials, no
/// fragment. Whether its host is *allowed* is the egress policy's call (`delivery::client`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CallbackUrl(url::Url);

impl CallbackUrl {
    pub fn as_url(&self) -> &url::Url {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl FromStr for CallbackUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_CALLBACK_URL_LEN {
            return Err(format!("callback_url is {} bytes long; the limit is {MAX_CALLBACK_URL_LEN}", s.len()));
        }
        let url = url::Url::parse(s.trim()).map_err(|e| format!("callback_url is not a valid absolute URL ({e})"))?;
        match url.scheme() {
            "http" | "https" => {}
            other => {
                return Err(format!("callback_url must use http or https, not {other:?}"));
            }
        }
        if url.host().is_none() {
            return Err("callback_url has no host".into());
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(
                "callback_url must not carry a user name or password; put credentials in the path or query".into()
            );
        }
        if url.fragment().is_some() {
            return Err("callback_url must not have a #fragment (it is never sent to the server)".into());
        }
        // Non-ASCII characters are percent-encoded, up to nine bytes each: the limit holds for the URL
        // as it is stored and sent.
        if url.as_str().len() > MAX_CALLBACK_URL_LEN {
            return Err(format!(
                "callback_url is {} bytes long once percent-encoded; the limit is {MAX_CALLBACK_URL_LEN}",
                url.as_str().len()
            ));
        }
        Ok(CallbackUrl(url))
    }
}

impl fmt::Display for CallbackUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.as_str().fmt(f)
    }
}

/// Where a subscription is in its life. The last four are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
// serde spells the API's values and strum the stored ones (`as_str`, `FromStr`): a test below holds
// the two to one spelling.
#[derive(strum::IntoStaticStr, strum::EnumString, strum::VariantArray)]
#[strum(serialize_all = "snake_case", parse_err_ty = String, parse_err_fn = unknown_state)]
pub enum SubscriptionState {
    /// The job is being polled upstream.
    Polling,
    /// The job has ended; the callback is being delivered (or waits for its next retry).
    Delivering,
    /// The receiver answered 2xx.
    Delivered,
    /// The subscription ended without a delivery; `failure_reason` says why.
    Failed,
    /// The job was still Pending after `max-wait`.
    Expired,
    /// Cancelled by the caller.
    Cancelled,
}

impl SubscriptionState {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    pub fn is_final(self) -> bool {
        !matches!(self, Self::Polling | Self::Delivering)
    }
}

fn unknown_state(s: &str) -> String {
    let names: Vec<_> = SubscriptionState::VARIANTS.iter().map(|s| s.as_str()).collect();
    format!("state must be one of {}, got {:?}", names.join(", "), truncate(s, 32))
}

/// A job status as the upstream spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
// strum spells the variants as they are, as serde does.
#[derive(strum::IntoStaticStr, strum::EnumString, strum::VariantArray)]
#[strum(parse_err_ty = String, parse_err_fn = unknown_status)]
pub enum JobStatus {
    Pending,
    Succeed,
    Failed,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Pending)
    }
}

fn unknown_status(s: &str) -> String {
    format!("unknown job status {:?}", truncate(s, 32))
}

/// Why a subscription ended without a delivery: machine-readable, stable, documented in the README.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[derive(strum::IntoStaticStr, strum::EnumString, strum::VariantArray)]
#[strum(serialize_all = "snake_case", parse_err_ty = String, parse_err_fn = unknown_reason)]
pub enum FailureReason {
    /// The upstream rejected our API key (401).
    UpstreamUnauthorized,
    /// The upstream kept answering 404 for this job past the grace period.
    UpstreamJobNotFound,
    /// The upstream answered 422: it does not accept this job ID.
    UpstreamRejectedJob,
    /// The receiver answered 410 Gone.
    CallbackGone,
    /// Every attempt of the retry schedule failed.
    DeliveryExhausted,
    /// The callback URL was refused by the egress policy at delivery time (its host now resolves to a
    /// refused address).
    CallbackRefused,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

fn unknown_reason(s: &str) -> String {
    format!("unknown failure reason {s:?}")
}

/// A point in time as the store keeps it: milliseconds since the Unix epoch, UTC. Adding or taking
/// away a [`Duration`] saturates, so a deadline a configured span away never wraps round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    pub fn now() -> Self {
        Timestamp(time::OffsetDateTime::now_utc().unix_timestamp_nanos().div_euclid(1_000_000) as i64)
    }

    /// The time a store column or a signed token holds.
    pub const fn from_millis(ms: i64) -> Self {
        Timestamp(ms)
    }

    pub const fn as_millis(self) -> i64 {
        self.0
    }

    /// How long after `earlier` this is; zero if it is not after (as `Instant::duration_since`).
    pub fn duration_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(u64::try_from(self.0.saturating_sub(earlier.0)).unwrap_or(0))
    }

    /// A time the API was given in RFC 3339 (any offset), to the millisecond; `what` names the field in
    /// the error.
    pub fn parse_rfc3339(s: &str, what: &str) -> Result<Self, String> {
        let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).map_err(|_| {
            format!("{what} must be a time in RFC 3339, such as 2026-12-01T10:32:30Z; got {:?}", truncate(s, 40))
        })?;
        Ok(Timestamp((t.unix_timestamp_nanos().div_euclid(1_000_000)) as i64))
    }

    /// RFC 3339 in UTC, as the API shows times: `2026-12-01T10:32:30.5Z` (no trailing zeros).
    pub fn rfc3339(self) -> String {
        let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000_000)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
    }
}

/// A span in whole milliseconds; spans past `i64::MAX` ms (292 million years) count as that.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;

    fn add(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(millis(d)))
    }
}

impl Sub<Duration> for Timestamp {
    type Output = Timestamp;

    fn sub(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_sub(millis(d)))
    }
}

/// Cuts untrusted text before quoting it back, on a character boundary.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_id_in_upper_case_is_the_same_job() {
        let a: JobId = "3F1C2B9E-8A4D-4C6E-9B1A-2D5E7F9A0C11".parse().unwrap();
        let b: JobId = "3f1c2b9e-8a4d-4c6e-9b1a-2d5e7f9a0c11".parse().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "3f1c2b9e-8a4d-4c6e-9b1a-2d5e7f9a0c11");
    }

    #[test]
    fn partitions_spread_sequential_and_random_ids_alike() {
        let mut v7 = [0u32; PARTITIONS as usize];
        let mut v4 = [0u32; PARTITIONS as usize];
        for _ in 0..6400 {
            v7[uuid_partition(Uuid::now_v7()) as usize] += 1;
            v4[uuid_partition(Uuid::new_v4()) as usize] += 1;
        }
        // 100 expected in each; a fair spread keeps every partition well inside 40..160.
        assert!(v7.iter().chain(v4.iter()).all(|&n| (40..160).contains(&n)), "{v7:?} {v4:?}");
    }

    #[test]
    fn a_job_id_that_is_not_a_uuid_is_refused_with_an_example() {
        let err = "job-42".parse::<JobId>().unwrap_err();
        assert!(err.contains("must be a UUID"), "{err}");
    }

    #[test]
    fn callback_urls_must_be_http_or_https_with_a_host() {
        assert!("https://example.com/hook".parse::<CallbackUrl>().is_ok());
        assert!("ftp://example.com/hook".parse::<CallbackUrl>().unwrap_err().contains("http or https"));
        assert!("not a url".parse::<CallbackUrl>().is_err());
        assert!("https://user:pw@example.com/".parse::<CallbackUrl>().unwrap_err().contains("password"));
        let long = format!("https://example.com/{}", "a".repeat(MAX_CALLBACK_URL_LEN));
        assert!(long.parse::<CallbackUrl>().unwrap_err().contains("limit"));
    }

    /// The API (serde) and the store (`as_str`, `FromStr`) spell every value alike.
    fn round_trips<T>(name: &str)
    where
        T: VariantArray + Copy + PartialEq + fmt::Debug + Serialize + FromStr + Into<&'static str>,
        T::Err: fmt::Debug,
    {
        for &value in T::VARIANTS {
            let stored: &'static str = value.into();
            assert_eq!(serde_json::to_value(value).unwrap(), stored, "{name}");
            assert_eq!(stored.parse::<T>().unwrap(), value, "{name}");
        }
    }

    #[test]
    fn states_statuses_and_reasons_round_trip_through_one_spelling() {
        round_trips::<SubscriptionState>("state");
        round_trips::<JobStatus>("job status");
        round_trips::<FailureReason>("failure reason");
        assert_eq!(SubscriptionState::Delivering.as_str(), "delivering");
        assert_eq!(FailureReason::UpstreamJobNotFound.as_str(), "upstream_job_not_found");
        assert_eq!(JobStatus::Succeed.as_str(), "Succeed");
        assert_eq!(
            "done".parse::<SubscriptionState>().unwrap_err(),
            "state must be one of polling, delivering, delivered, failed, expired, cancelled, got \"done\""
        );
        assert_eq!("succeed".parse::<JobStatus>().unwrap_err(), "unknown job status \"succeed\"");
        assert!("Callback_Gone".parse::<FailureReason>().is_err(), "no case folding");
    }

    #[test]
    fn a_timestamp_adds_and_takes_away_durations_saturating() {
        let t = Timestamp::from_millis(1_000);
        assert_eq!(t + Duration::from_millis(1_500), Timestamp::from_millis(2_500));
        assert_eq!(t - Duration::from_secs(2), Timestamp::from_millis(-1_000));
        assert_eq!(t + Duration::MAX, Timestamp::from_millis(i64::MAX));
        assert_eq!(Timestamp::from_millis(-5) - Duration::MAX, Timestamp::from_millis(i64::MIN));
        assert_eq!((t + Duration::from_millis(250)).duration_since(t), Duration::from_millis(250));
        assert_eq!(t.duration_since(t + Duration::from_secs(1)), Duration::ZERO, "never negative");
    }

    #[test]
    fn a_timestamp_is_read_from_rfc3339_with_any_offset() {
        let t = Timestamp::parse_rfc3339("2025-12-01T11:32:30.123+01:00", "since").unwrap();
        assert_eq!(t, Timestamp::from_millis(1_764_585_150_123));
        let e = Timestamp::parse_rfc3339("yesterday", "since").unwrap_err();
        assert!(e.starts_with("since must be a time in RFC 3339"), "{e}");
    }

    #[test]
    fn a_timestamp_shows_as_rfc3339_utc_to_the_millisecond() {
        assert_eq!(Timestamp::from_millis(1_764_585_150_123).rfc3339(), "2025-12-01T10:32:30.123Z");
        assert_eq!(Timestamp::from_millis(1_764_585_150_500).rfc3339(), "2025-12-01T10:32:30.5Z");
        assert_eq!(Timestamp::from_millis(1_764_585_150_000).rfc3339(), "2025-12-01T10:32:30Z");
        assert_eq!(Timestamp::from_millis(i64::MAX).rfc3339(), "1970-01-01T00:00:00Z", "out of range");
    }

    #[test]
    fn truncation_respects_character_boundaries() {
        assert_eq!(truncate("héllo", 2), "h…");
        assert_eq!(truncate("abc", 5), "abc");
    }
}
