//! The [`Store`] trait on PostgreSQL: each call bounded by [`CALL_DEADLINE`], the writes handed to the
//! writer lanes, the rest on the pool.

use super::*;

#[async_trait]
impl Store for PgStore {
    async fn sync_configured_keys(&self, configured: KeyConfig<'_>, now: Timestamp) -> Result<ConfiguredKeys> {
        deadline(async move { self.keys_sync(configured, now).await }).await
    }

    async fn create_key(&self, name: &str, key: KeyHash, secret: &SigningSecret, now: Timestamp) -> Result<i64> {
        deadline(async move {
            let mut tx = self.begin().await?;
            let id = insert_tenant_with_key(&mut tx, &NewTenant { name, key, secret, source: "stored" }, now).await?;
            tx.commit().await.db()?;
            Ok(id)
        })
        .await
    }

    async fn add_key(&self, tenant_id: i64, name: &str, key: KeyHash, now: Timestamp) -> Result<Option<i64>> {
        deadline(async move {
            let mut tx = self.begin().await?;
            let tenant: Option<i64> = sqlx::query_scalar("SELECT id FROM tenants WHERE id = $1")
                .bind(tenant_id)
                .fetch_optional(&mut *tx)
                .await
                .db()?;
            if tenant.is_none() {
                return Ok(None);
            }
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO api_keys (tenant_id, name, key_hash, source, created_at) VALUES ($1, $2, $3, 'stored', $4) \
                 RETURNING id",
            )
            .bind(tenant_id)
            .bind(name)
            .bind(key.0.as_slice())
            .bind(now)
            .fetch_one(&mut *tx)
            .await
            .db()?;
            tx.commit().await.db()?;
            Ok(Some(id))
        })
        .await
    }

    async fn usable_key_count(&self) -> Result<i64> {
        deadline(async move {
            sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL")
                .fetch_one(&self.pool)
                .await
                .db()
        })
        .await
    }

    async fn tenant_by_key(&self, key: KeyHash) -> Result<Option<Tenant>> {
        deadline(async move {
            let row: Option<(i64, String)> = sqlx::query_as(
                "SELECT t.id, t.signing_secret FROM api_keys k JOIN tenants t ON t.id = k.tenant_id \
                 WHERE k.key_hash = $1 AND k.revoked_at IS NULL",
            )
            .bind(key.0.as_slice())
            .fetch_optional(&self.pool)
            .await
            .db()?;
            row.map(|(id, secret)| Ok(Tenant { id, secret: Arc::new(parse_secret(&secret)?) })).transpose()
        })
        .await
    }

    async fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        deadline(async move {
            let rows: Vec<(i64, i64, String, String, Timestamp, Option<Timestamp>)> =
                sqlx::query_as("SELECT id, tenant_id, name, source, created_at, revoked_at FROM api_keys ORDER BY id")
                    .fetch_all(&self.pool)
                    .await
                    .db()?;
            Ok(rows
                .into_iter()
                .map(|(id, tenant_id, name, source, created_at, revoked_at)| KeyInfo {
                    id,
                    tenant_id,
                    name,
                    source,
                    created_at,
                    revoked_at,
                })
                .collect())
        })
        .await
    }

    async fn revoke_key(&self, id: i64, now: Timestamp) -> Result<bool> {
        deadline(async move {
            let done = sqlx::query(
                "UPDATE api_keys SET revoked_at = $1, revoked_by = 'command' WHERE id = $2 AND revoked_at IS NULL",
            )
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await
            .db()?;
            Ok(done.rows_affected() == 1)
        })
        .await
    }

    async fn signing_secrets(&self, tenant_id: i64, now: Timestamp) -> Result<Vec<SigningSecret>> {
        deadline(async move {
            let row: Option<(String, Option<String>, Option<Timestamp>)> =
                sqlx::query_as("SELECT signing_secret, previous_secret, previous_until FROM tenants WHERE id = $1")
                    .bind(tenant_id)
                    .fetch_optional(&self.pool)
                    .await
                    .db()?;
            signing_secrets_of(tenant_id, row, now)
        })
        .await
    }

    async fn claim_idempotency_key(&self, claim: IdempotencyClaim) -> Result<Claimed> {
        deadline(async move { self.idempotency_claim(&claim).await }).await
    }

    async fn finish_idempotency_key(&self, tenant_id: i64, key: &str, answer: &StoredAnswer) -> Result<()> {
        deadline(async move { self.idempotency_finish(tenant_id, key, answer).await }).await
    }

    async fn rotate_secret(&self, tenant_id: i64, new: &SigningSecret, previous_until: Timestamp) -> Result<()> {
        deadline(async move {
            sqlx::query("UPDATE tenants SET previous_secret = signing_secret, previous_until = $1, signing_secret = $2 WHERE id = $3",)
            .bind(previous_until)
            .bind(new.expose())
            .bind(tenant_id)
            .execute(&self.pool)
            .await
            .db()?;
            Ok(())
        })
        .await
    }

    async fn meta_secret(&self, name: &str) -> Result<Vec<u8>> {
        deadline(async move {
            sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
                .bind(name)
                .bind(rand::random::<[u8; 32]>().as_slice())
                .execute(&self.pool)
                .await
                .db()?;
            sqlx::query_scalar("SELECT value FROM meta WHERE key = $1").bind(name).fetch_one(&self.pool).await.db()
        })
        .await
    }

    async fn redeliver(&self, sub: TenantSub, now: Timestamp) -> Result<Option<Redelivery>> {
        deadline(async move { self.redeliver_now(sub, now).await }).await
    }

    async fn retry_now(&self, sub: TenantSub, now: Timestamp) -> Result<Option<RetryNow>> {
        deadline(async move { self.retry_delivery_now(sub, now).await }).await
    }

    async fn matching_ended(&self, tenant_id: i64, filter: &BulkFilter) -> Result<Vec<SubscriptionId>> {
        deadline(async move {
            let sql = super::bulk_statement(filter);
            let mut query = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql))
                .bind(tenant_id)
                .bind(filter.state.as_str())
                .bind(filter.since)
                .bind(filter.until);
            for pattern in super::super::bulk::host_binds(filter) {
                query = query.bind(pattern);
            }
            let ids = query.bind(i64::from(filter.limit) + 1).fetch_all(&self.pool).await.db()?;
            super::super::bulk::parse_ids(ids)
        })
        .await
    }

    async fn redeliver_batch(&self, tenant_id: i64, ids: &[SubscriptionId], now: Timestamp) -> Result<Vec<Redelivery>> {
        deadline(async move { self.redeliver_each(tenant_id, ids, now).await }).await
    }

    async fn register(&self, registration: Registration) -> Result<Registered> {
        deadline(async move {
            let (write, answer) = Write::register(registration);
            self.write(write, answer).await
        })
        .await
    }

    async fn subscription(&self, sub: TenantSub) -> Result<Option<Subscription>> {
        let sql = concat!(
            "SELECT ",
            subscription_columns!(),
            " FROM subscriptions s JOIN jobs j ON j.job_id = s.job_id WHERE s.id = $1 AND s.tenant_id = $2"
        );
        self.read_one(sqlx::query_as::<_, SubscriptionRow>(sql).bind(sub.id.to_string()).bind(sub.tenant_id)).await
    }

    async fn list_subscriptions(&self, tenant_id: i64, filter: &ListFilter) -> Result<Vec<Subscription>> {
        let (values, limit) = list_binds(filter);
        let mut query =
            sqlx::query_as::<_, SubscriptionRow>(sqlx::AssertSqlSafe(list_statement(filter))).bind(tenant_id);
        for value in values {
            query = query.bind(value);
        }
        self.read_all(query.bind(limit)).await
    }

    async fn cancel(&self, sub: TenantSub, now: Timestamp) -> Result<Option<Cancel>> {
        deadline(async move { self.cancel_now(sub, now).await }).await
    }

    async fn attempts(&self, sub: TenantSub) -> Result<Option<Vec<AttemptRecord>>> {
        deadline(async move { self.attempts_of(sub).await }).await
    }

    async fn pollable_jobs(&self) -> Result<Vec<PollableJob>> {
        self.read_all(sqlx::query_as::<_, PollableRow>(concat!(pollable_select!(), " GROUP BY j.job_id"))).await
    }

    async fn pollable_job(&self, job_id: JobId) -> Result<Option<PollableJob>> {
        let sql = concat!(pollable_select!(), " WHERE j.job_id = $1 GROUP BY j.job_id");
        self.read_one(sqlx::query_as::<_, PollableRow>(sql).bind(job_id.to_string())).await
    }

    async fn record_observation(&self, observation: Observation) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        deadline(self.write(Write::Observe { observation, reply }, answer)).await
    }

    async fn complete_job(&self, end: JobEnd, claim_for: Duration) -> Result<Vec<DeliveryTask>> {
        let (reply, answer) = oneshot::channel();
        let claim = ClaimFor::new(&self.instance, claim_for);
        deadline(self.write(Write::Complete { end, claim, reply }, answer)).await
    }

    async fn claim_delivery(&self, task: &DeliveryTask, claim_for: Duration) -> Result<Claim> {
        deadline(async move {
            let (reply, answer) = oneshot::channel();
            let claim = ClaimFor::new(&self.instance, claim_for);
            let write = Write::Claim {
                id: task.subscription_id,
                partition: task.partition,
                series: task.series,
                now: Timestamp::now(),
                claim,
                reply,
            };
            self.write(write, answer).await
        })
        .await
    }

    async fn fail_job(&self, job_id: JobId, reason: FailureReason, last_error: &str, now: Timestamp) -> Result<u64> {
        deadline(async move {
            let job = job_id.to_string();
            let mut tx = self.begin().await?;
            sqlx::query("UPDATE jobs SET last_error = $1, updated_at = $2 WHERE job_id = $3")
                .bind(last_error)
                .bind(now)
                .bind(&job)
                .execute(&mut *tx)
                .await
                .db()?;
            let done = sqlx::query("UPDATE subscriptions SET state = 'failed', failure_reason = $1, updated_at = $2 WHERE job_id = $3 AND state = 'polling'")
                .bind(reason.as_str())
                .bind(now)
                .bind(&job)
                .execute(&mut *tx)
                .await
                .db()?;
            tx.commit().await.db()?;
            Ok(done.rows_affected())
        })
        .await
    }

    async fn expire(&self, job_id: JobId, cutoff: Timestamp, now: Timestamp) -> Result<(u64, Option<PollableJob>)> {
        deadline(async move {
            let job = job_id.to_string();
            let mut tx = self.begin().await?;
            let expired = sqlx::query("UPDATE subscriptions SET state = 'expired', updated_at = $1 WHERE job_id = $2 AND state = 'polling' AND created_at <= $3")
                .bind(now)
                .bind(&job)
                .bind(cutoff)
                .execute(&mut *tx)
                .await
                .db()?;
            let left = pollable_in(&mut tx, &job).await?;
            tx.commit().await.db()?;
            Ok((expired.rows_affected(), left))
        })
        .await
    }

    async fn count_by_state(&self) -> Result<Vec<(String, i64)>> {
        deadline(async move { self.state_counts().await }).await
    }

    async fn purge_ended(&self, ended_before: Timestamp, limit: u32) -> Result<Option<Purged>> {
        self.purge_batch(ended_before, limit).await
    }

    async fn purgeable(&self, ended_before: Timestamp) -> Result<Purged> {
        self.count_purgeable(ended_before).await
    }

    async fn reclaim_space(&self) -> Result<()> {
        // Autovacuum makes the space of deleted rows reusable by itself.
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        deadline(async move {
            sqlx::query("SELECT COUNT(*) FROM meta").execute(&self.pool).await.db()?;
            // Writes failing lately (and none going through since) is not ready either. The mark lapses on
            // its own, so an idle instance whose disk recovered becomes ready without writing anything; if
            // the disk is still full, the next write marks it again.
            let failed_at = self.write_trouble.load(std::sync::atomic::Ordering::Relaxed);
            if failed_at > 0 && Timestamp::now().duration_since(Timestamp::from_millis(failed_at)) < WRITE_TROUBLE_FOR {
                return Err(StoreError::trouble(Trouble::WritesFailing));
            }
            Ok(())
        })
        .await
    }

    fn writer_stats(&self) -> Arc<WriterStats> {
        self.stats.clone()
    }

    fn shared(&self) -> bool {
        true
    }

    fn notices(&self, shutdown: tokio_util::sync::CancellationToken) -> Option<mpsc::Receiver<Heard>> {
        Some(notice::listen(self.url.clone(), self.sent.clone(), shutdown))
    }

    async fn clock(&self) -> Result<Timestamp> {
        deadline(async move { sqlx::query_scalar(concat!("SELECT ", pg_now_ms!())).fetch_one(&self.pool).await.db() })
            .await
    }

    async fn heartbeat(&self, instance: &str, now: Timestamp, live_after: Timestamp) -> Result<i64> {
        deadline(async move { self.heartbeat_now(instance, now, live_after).await }).await
    }

    async fn renew_leases(&self, instance: &str, until: Timestamp) -> Result<u64> {
        deadline(async move { self.renew_now(instance, until).await }).await
    }

    async fn claim_leases(&self, instance: &str, n: i64, now: Timestamp, until: Timestamp) -> Result<u64> {
        deadline(async move { self.claim_now(instance, n, now, until).await }).await
    }

    async fn release_leases(&self, instance: &str, partitions: u64) -> Result<()> {
        deadline(async move { self.release_now(instance, partitions).await }).await
    }

    async fn leave(&self, instance: &str) -> Result<()> {
        deadline(async move { self.leave_now(instance).await }).await
    }

    async fn pollable_jobs_in(&self, partitions: u64) -> Result<Vec<PollableJob>> {
        let sql =
            concat!(pollable_select!(), " WHERE (($1 >> CAST(j.partition AS INTEGER)) & 1) = 1 GROUP BY j.job_id");
        self.read_all(sqlx::query_as::<_, PollableRow>(sql).bind(partitions as i64)).await
    }

    async fn pending_deliveries_in(&self, partitions: u64) -> Result<Vec<DeliveryTask>> {
        let sql = concat!(
            delivery_select!(),
            " WHERE s.state = 'delivering' AND (($1 >> CAST(s.partition AS INTEGER)) & 1) = 1"
        );
        self.read_all(sqlx::query_as::<_, DeliveryRow>(sql).bind(partitions as i64)).await
    }

    async fn delivery_task(&self, id: SubscriptionId) -> Result<Option<DeliveryTask>> {
        let sql = concat!(delivery_select!(), " WHERE s.state = 'delivering' AND s.id = $1");
        self.read_one(sqlx::query_as::<_, DeliveryRow>(sql).bind(id.to_string())).await
    }

    async fn pending_deliveries(&self) -> Result<Vec<DeliveryTask>> {
        self.read_all(sqlx::query_as::<_, DeliveryRow>(concat!(delivery_select!(), " WHERE s.state = 'delivering'")))
            .await
    }

    async fn record_attempt(&self, record: &AttemptRecord, result: AttemptResult, now: Timestamp) -> Result<bool> {
        deadline(async move {
            let (reply, answer) = oneshot::channel();
            self.write(Write::Attempt { record: record.clone(), result, now, reply }, answer).await
        })
        .await
    }
}
