//! Each tenant's signing secrets, shared by the dispatcher (which signs) and the API (which rotates).
//!
//! Secrets are read per tenant at most once a second instead of once per attempt. A rotation through
//! this process's API forgets the tenant's entry at once, so the very next delivery carries the new
//! signature; another process sharing the database (a later scale-out) sees it within a second.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::domain::Timestamp;
use crate::keys::SigningSecret;
use crate::recent::Expiring;
use crate::store::Store;

/// How long a tenant's secrets are reused before they are read again.
const TTL: Duration = Duration::from_secs(1);

/// Each tenant's secrets, for [`TTL`] after they were read.
type Entries = Expiring<i64, Arc<Vec<SigningSecret>>>;

pub struct SecretsCache {
    store: Arc<dyn Store>,
    entries: Mutex<Entries>,
}

impl SecretsCache {
    pub fn new(store: Arc<dyn Store>) -> Self {
        SecretsCache { store, entries: Mutex::new(Expiring::new(TTL)) }
    }

    /// The secrets that sign the tenant's deliveries now, current first.
    pub async fn get(&self, tenant_id: i64) -> crate::store::Result<Arc<Vec<SigningSecret>>> {
        if let Some(secrets) = self.lock().get(&tenant_id) {
            return Ok(secrets.clone());
        }
        let secrets = Arc::new(self.store.signing_secrets(tenant_id, Timestamp::now()).await?);
        self.lock().insert(tenant_id, secrets.clone());
        Ok(secrets)
    }

    /// Drops what is known of a tenant's secrets (after a rotation).
    pub fn forget(&self, tenant_id: i64) {
        self.lock().remove(&tenant_id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().expect("the secrets cache is never poisoned: nothing panics while holding it")
    }
}
