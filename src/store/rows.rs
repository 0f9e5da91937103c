//! Rows as both backends read them, and how they become the store's types.

use bytes::Bytes;

use super::*;

pub(super) fn corrupt(what: &str, value: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {value}"))
}

/// The columns of a [`Subscription`], from `subscriptions s JOIN jobs j`.
macro_rules! subscription_columns {
    () => {
        "s.id, s.job_id, s.callback_url, s.state, s.failure_reason, s.webhook_id, s.attempts, \
     s.next_attempt_at, s.created_at, s.updated_at, j.status AS job_status, j.last_error, \
     (SELECT CASE WHEN a.status_code BETWEEN 200 AND 299 THEN NULL \
             ELSE COALESCE(a.error, 'the receiver answered ' || a.status_code) END \
      FROM delivery_attempts a WHERE a.subscription_id = s.id ORDER BY a.id DESC LIMIT 1) AS last_delivery_error, \
     s.callback_headers, s.payload, s.metadata"
    };
}
pub(super) use subscription_columns;

/// `GET /v1/subscriptions` as one statement per shape of filter, each with only the conditions it has,
/// so the planner can serve every shape from an index (`subscriptions_by_tenant`,
/// `subscriptions_by_tenant_state`, `subscriptions_by_job`) instead of filtering a scan of the tenant's
/// rows: a `?state=failed` among millions of delivered must not read them all. Placeholders are `$1`,
/// `$2`, … in the order of [`list_binds`] (both databases take that spelling). `of_job` is the backend's
/// condition for "of the job bound at `{p}`" (SQLite's reads the job's creation time first: its
/// `subscriptions_by_job` is keyed by that, see its migration 0011).
pub(super) fn list_query(filter: &ListFilter, of_job: &str) -> String {
    let mut sql = String::from(concat!(
        "SELECT ",
        subscription_columns!(),
        " FROM subscriptions s JOIN jobs j ON j.job_id = s.job_id WHERE "
    ));
    // With a job, the job's index is the one to read (a job has a few subscriptions; a tenant may have
    // millions): SQLite, without statistics, would rather walk the tenant's index to skip the sort, so
    // the unary + takes tenant_id out of its index choice. (PostgreSQL plans from statistics and reads
    // `+x` as `x`.)
    sql.push_str(if filter.job_id.is_some() { "+s.tenant_id = $1" } else { "s.tenant_id = $1" });
    let mut n = 1;
    let mut and = |condition: &str| {
        n += 1;
        sql.push_str(" AND ");
        sql.push_str(&condition.replace("{p}", &format!("${n}")));
    };
    if filter.job_id.is_some() {
        and(of_job);
    }
    if filter.state.is_some() {
        and("s.state = {p}");
    }
    if filter.before.is_some() {
        and("s.id < {p}");
    }
    n += 1;
    sql.push_str(&format!(" ORDER BY s.id DESC LIMIT ${n}"));
    sql
}

/// The values of [`list_query`]'s placeholders after the tenant, in order, and the limit.
pub(super) fn list_binds(filter: &ListFilter) -> (Vec<String>, i64) {
    let values = [
        filter.job_id.as_ref().map(|j| j.to_string()),
        filter.state.map(|s| s.as_str().to_owned()),
        filter.before.map(|b| b.to_string()),
    ];
    (values.into_iter().flatten().collect(), i64::from(filter.limit))
}

/// Declares a row type that both backends read, from one list of fields: sqlx reads it by column name
/// (`FromRow`), rusqlite by position (`from_sqlite`), so the fields are declared in the order the row's
/// SELECT lists its columns. (By hand, the rusqlite reader was a second list that had to keep that order.)
macro_rules! stored_row {
    ($(#[$attr:meta])* struct $name:ident { $($(#[$field_attr:meta])* $field:ident: $ty:ty,)* }) => {
        $(#[$attr])*
        #[derive(sqlx::FromRow)]
        pub(super) struct $name {
            $($(#[$field_attr])* pub(super) $field: $ty,)*
        }

        impl $name {
            /// The row from rusqlite, its columns taken in the order of the fields.
            pub(super) fn from_sqlite(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
                let mut column = 0;
                Ok($name {
                    $($field: {
                        column += 1;
                        r.get(column - 1)?
                    },)*
                })
            }
        }
    };
}

stored_row! {
    struct SubscriptionRow {
        id: String,
        job_id: String,
        callback_url: String,
        state: String,
        failure_reason: Option<String>,
        webhook_id: Option<String>,
        attempts: i64,
        next_attempt_at: Option<Timestamp>,
        created_at: Timestamp,
        updated_at: Timestamp,
        job_status: Option<String>,
        last_error: Option<String>,
        last_delivery_error: Option<String>,
        /// Read only for the names (see [`CallbackHeaders::stored_names`]).
        callback_headers: Option<String>,
        payload: Option<String>,
        metadata: Option<String>,
    }
}

impl TryFrom<SubscriptionRow> for Subscription {
    type Error = StoreError;

    fn try_from(r: SubscriptionRow) -> Result<Self> {
        Ok(Subscription {
            id: r.id.parse().map_err(|e| corrupt("subscription id", e))?,
            job_id: JobId::from_key(&r.job_id).map_err(|e| corrupt("job id", e))?,
            callback_url: r.callback_url,
            state: r.state.parse().map_err(|e| corrupt("state", e))?,
            job_status: r.job_status.map(|s| s.parse()).transpose().map_err(|e| corrupt("job status", e))?,
            failure_reason: r
                .failure_reason
                .map(|s| s.parse())
                .transpose()
                .map_err(|e| corrupt("failure reason", e))?,
            last_error: r.last_error,
            last_delivery_error: r.last_delivery_error,
            webhook_id: r.webhook_id,
            attempts: u32::try_from(r.attempts).unwrap_or(0),
            next_attempt_at: r.next_attempt_at,
            created_at: r.created_at,
            updated_at: r.updated_at,
            header_names: CallbackHeaders::stored_names(r.callback_headers.as_deref())
                .map_err(|e| corrupt("callback headers", e))?,
            payload: Payload::from_stored(r.payload.as_deref()).map_err(|e| corrupt("payload", e))?,
            metadata: r.metadata,
        })
    }
}

stored_row! {
    struct PollableRow {
        job_id: String,
        job_created_at: Timestamp,
        oldest_polling_at: Timestamp,
    }
}

impl TryFrom<PollableRow> for PollableJob {
    type Error = StoreError;

    fn try_from(r: PollableRow) -> Result<Self> {
        Ok(PollableJob {
            job_id: JobId::from_key(&r.job_id).map_err(|e| corrupt("job id", e))?,
            job_created_at: r.job_created_at,
            oldest_polling_at: r.oldest_polling_at,
        })
    }
}

/// A [`PollableJob`]: add a `WHERE` and `GROUP BY j.job_id`.
macro_rules! pollable_select {
    // SQLite finds a job's subscriptions by the job's creation time first (its migration 0011).
    (sqlite) => {
        pollable_select!(@ "s.job_created_at = j.created_at AND ")
    };
    () => {
        pollable_select!(@ "")
    };
    (@ $same_job:literal) => {
        concat!(
            "SELECT j.job_id AS job_id, j.created_at AS job_created_at, MIN(s.created_at) AS oldest_polling_at \
             FROM jobs j JOIN subscriptions s ON ",
            $same_job,
            "s.job_id = j.job_id AND s.state = 'polling'"
        )
    };
}
pub(super) use pollable_select;

stored_row! {
    struct DeliveryRow {
        id: String,
        job_id: String,
        tenant_id: i64,
        partition: i64,
        webhook_id: Option<String>,
        callback_url: String,
        result: Option<Vec<u8>>,
        series: i64,
        attempts: i64,
        next_attempt_at: Option<Timestamp>,
        callback_headers: Option<String>,
        payload: Option<String>,
        metadata: Option<String>,
        finished_at: Option<Timestamp>,
    }
}

impl TryFrom<DeliveryRow> for DeliveryTask {
    type Error = StoreError;

    fn try_from(r: DeliveryRow) -> Result<Self> {
        Ok(DeliveryTask {
            subscription_id: r.id.parse().map_err(|e| corrupt("subscription id", e))?,
            job_id: JobId::from_key(&r.job_id).map_err(|e| corrupt("job id", e))?,
            tenant_id: r.tenant_id,
            partition: r.partition,
            webhook_id: r.webhook_id.ok_or_else(|| corrupt("delivery without webhook id", &r.id))?,
            callback_url: r.callback_url,
            form: Arc::new(DeliveryForm::from_stored(r.callback_headers.as_deref(), r.payload.as_deref(), r.metadata)?),
            finished_at: r.finished_at.unwrap_or(Timestamp::from_millis(0)),
            body: Bytes::from(r.result.ok_or_else(|| corrupt("delivery without a job result", &r.id))?),
            series: u32::try_from(r.series).unwrap_or(1),
            attempts_made: u32::try_from(r.attempts).unwrap_or(0),
            due_at: r.next_attempt_at.unwrap_or(Timestamp::from_millis(0)),
            claimed_until: None,
        })
    }
}

/// A [`DeliveryTask`]: add a `WHERE`.
macro_rules! delivery_select {
    () => {
        "SELECT s.id, s.job_id, s.tenant_id, s.partition, s.webhook_id, s.callback_url, j.result, s.series, s.attempts, s.next_attempt_at, \
     s.callback_headers, s.payload, s.metadata, j.finished_at \
     FROM subscriptions s JOIN jobs j ON j.job_id = s.job_id"
    };
}
pub(super) use delivery_select;

/// Partition numbers as a mask (bit p = partition p).
pub(super) fn mask_of(partitions: &[i64]) -> u64 {
    partitions.iter().filter(|p| (0..64).contains(*p)).fold(0, |mask, p| mask | 1 << p)
}

pub(super) fn parse_secret(stored: &str) -> Result<SigningSecret> {
    stored.parse::<SigningSecret>().map_err(|e| corrupt("signing secret", e))
}

/// A tenant's signing secrets from its row `(signing_secret, previous_secret, previous_until)`: the
/// current one, then the previous one while its rotation's overlap lasts.
pub(super) fn signing_secrets_of(
    tenant_id: i64,
    row: Option<(String, Option<String>, Option<Timestamp>)>,
    now: Timestamp,
) -> Result<Vec<SigningSecret>> {
    let Some((current, previous, until)) = row else {
        return Err(corrupt("delivery of an unknown tenant", tenant_id));
    };
    let mut secrets = vec![parse_secret(&current)?];
    if let (Some(previous), Some(until)) = (previous, until)
        && now < until
    {
        secrets.push(parse_secret(&previous)?);
    }
    Ok(secrets)
}

/// A new tenant and its first API key, as both backends insert them.
pub(super) struct NewTenant<'a> {
    pub(super) name: &'a str,
    pub(super) key: KeyHash,
    pub(super) secret: &'a SigningSecret,
    /// `config` for a key the configuration lists, `stored` for one made through the store.
    pub(super) source: &'static str,
}

/// What [`Store::sync_configured_keys`] does with a key of the configuration's source already stored.
pub(super) enum ConfiguredKey {
    /// Still configured but revoked with `jobhook keys revoke`: that stays.
    RevokedByCommand,
    /// Listed (again): it works.
    Restore,
    /// No longer in the configuration: it stops working.
    Revoke,
}

impl ConfiguredKey {
    pub(super) fn of(keys: &[KeyHash], hash: &[u8], revoked_by: Option<&str>) -> Self {
        let still = keys.iter().any(|k| k.0.as_slice() == hash);
        match (still, revoked_by) {
            (true, Some("command")) => Self::RevokedByCommand,
            (true, _) => Self::Restore,
            (false, _) => Self::Revoke,
        }
    }
}
