//! Bulk redelivery (`POST /v1/subscriptions/redeliver`): which ended subscriptions match, and taking
//! them in batches through each backend's single-subscription redelivery.
//!
//! The match is one query shared by both backends (`$n` placeholders, which SQLite reads too). It
//! leaves out what [`Store::redeliver`] would refuse (no result, superseded), so a caller repeating the
//! same request until `more` is false is never stuck on a page of subscriptions that cannot be taken.
//! The per-row rules still run inside each batch's transaction: what changed between the query and the
//! batch is decided there, as for a single redelivery.

use super::{DeliveryTask, Redelivery, Result, Store};
use crate::domain::{SubscriptionId, SubscriptionState, Timestamp};

/// How many subscriptions one transaction redelivers: short enough that other writers wait little,
/// long enough that 10,000 take a few dozen commits rather than 10,000.
pub const REDELIVER_BATCH: usize = 250;

/// Which ended subscriptions of a tenant a bulk redelivery takes.
#[derive(Debug, Clone)]
pub struct BulkFilter {
    /// `failed` or `delivered`.
    pub state: SubscriptionState,
    /// The subscription ended (`updated_at`) at or after this...
    pub since: Timestamp,
    /// ...and before this.
    pub until: Timestamp,
    /// Only callbacks on this host (lower case, no port), if set.
    pub callback_host: Option<String>,
    /// At most this many.
    pub limit: u32,
}

/// What a bulk redelivery did.
#[derive(Debug, Default)]
pub struct BulkRedelivered {
    /// How many new series started.
    pub started: usize,
    /// More subscriptions matched than the limit allowed.
    pub more: bool,
}

/// The IDs of the tenant's subscriptions matching `filter` that can be redelivered, oldest registration
/// first, at most `limit + 1` (one more tells that more remain). Binds, in order: tenant ID, state,
/// since, until, then (with a host) four `LIKE` patterns, then the limit. `same_job` is the backend's
/// condition for "subscription `o` is of the job of `s`" (SQLite's names the job's creation time too:
/// its `subscriptions_by_job` is keyed by that first, see its migration 0011).
pub(super) fn matching_query(filter: &BulkFilter, same_job: &str) -> String {
    let host = if filter.callback_host.is_some() {
        " AND (s.callback_url LIKE $5 ESCAPE '\\' OR s.callback_url LIKE $6 ESCAPE '\\' \
         OR s.callback_url LIKE $7 ESCAPE '\\' OR s.callback_url LIKE $8 ESCAPE '\\')"
    } else {
        ""
    };
    let limit = if filter.callback_host.is_some() { 9 } else { 5 };
    // By the tenant-and-state index; the time window filters what it yields (bounded by the retention).
    format!(
        "SELECT s.id FROM subscriptions s JOIN jobs j ON j.job_id = s.job_id \
         WHERE s.tenant_id = $1 AND s.state = $2 AND s.updated_at >= $3 AND s.updated_at < $4 \
         AND j.result IS NOT NULL AND s.webhook_id IS NOT NULL{host} \
         AND NOT EXISTS (SELECT 1 FROM subscriptions o WHERE o.tenant_id = s.tenant_id AND {same_job} \
         AND o.callback_url = s.callback_url AND o.id <> s.id AND o.state IN ('polling', 'delivering', 'delivered')) \
         ORDER BY s.id LIMIT ${limit}"
    )
}

/// The `LIKE` patterns matching a callback URL on `host` (any port, http or https). Callback URLs are
/// stored as the URL parser writes them: scheme, `://`, the lower-case host, then `:port` or `/`.
pub(super) fn host_patterns(host: &str) -> [String; 4] {
    let host: String = host
        .chars()
        .flat_map(|c| match c {
            '\\' | '%' | '_' => vec!['\\', c],
            c => vec![c],
        })
        .collect();
    [format!("http://{host}/%"), format!("http://{host}:%"), format!("https://{host}/%"), format!("https://{host}:%")]
}

/// The binds of the host filter: its four `LIKE` patterns, or none.
pub(super) fn host_binds(filter: &BulkFilter) -> Vec<String> {
    filter.callback_host.as_deref().map(|h| host_patterns(h).to_vec()).unwrap_or_default()
}

/// Redelivers what matches `filter`, up to its limit, [`REDELIVER_BATCH`] per transaction; each batch's
/// new series go to `deliver` as soon as it commits (so a later batch's failure strands none of them).
pub async fn redeliver_matching(
    store: &dyn Store,
    tenant_id: i64,
    filter: &BulkFilter,
    now: Timestamp,
    mut deliver: impl FnMut(Vec<DeliveryTask>) + Send,
) -> Result<BulkRedelivered> {
    let mut ids = store.matching_ended(tenant_id, filter).await?;
    let more = ids.len() > filter.limit as usize;
    ids.truncate(filter.limit as usize);
    let mut done = BulkRedelivered { started: 0, more };
    for batch in ids.chunks(REDELIVER_BATCH) {
        let found = store.redeliver_batch(tenant_id, batch, now).await?;
        let tasks: Vec<DeliveryTask> = found
            .into_iter()
            .filter_map(|r| match r {
                Redelivery::Started(task) => Some(task),
                Redelivery::NotEnded(_) | Redelivery::Superseded => None,
            })
            .collect();
        done.started += tasks.len();
        deliver(tasks);
    }
    Ok(done)
}

/// Parses the IDs the matching query returned.
pub(super) fn parse_ids(ids: Vec<String>) -> Result<Vec<SubscriptionId>> {
    ids.into_iter().map(|id| id.parse().map_err(|e| super::rows::corrupt("subscription id", e))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_pattern_matches_that_host_only_with_like_wildcards_escaped() {
        let [plain, port, ..] = host_patterns("a_b%.example");
        assert_eq!(plain, "http://a\\_b\\%.example/%");
        assert_eq!(port, "http://a\\_b\\%.example:%");
    }

    #[test]
    fn the_limit_is_the_last_placeholder() {
        let mut filter = BulkFilter {
            state: SubscriptionState::Failed,
            since: Timestamp::from_millis(0),
            until: Timestamp::from_millis(1),
            callback_host: None,
            limit: 1,
        };
        assert!(matching_query(&filter, "o.job_id = s.job_id").ends_with("LIMIT $5"));
        filter.callback_host = Some("example.com".into());
        assert!(matching_query(&filter, "o.job_id = s.job_id").ends_with("LIMIT $9"));
    }
}
