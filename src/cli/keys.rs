//! `jobhook keys`: API keys and signing secrets, managed in the store a service uses.

use std::sync::Arc;

use anyhow::Context;

use super::KeysCommand;
use crate::domain::Timestamp;
use crate::keys::{ApiKey, SigningSecret};
use crate::store::Store;

/// Runs a `keys` subcommand.
pub async fn run(command: KeysCommand) -> anyhow::Result<()> {
    let store = match &command {
        KeysCommand::Create { store, .. } | KeysCommand::List { store } | KeysCommand::Revoke { store, .. } => store,
        KeysCommand::Secret => {
            crate::outln!("{}", SigningSecret::generate().expose());
            return Ok(());
        }
    };
    let store = open_existing_store(&store.database_url).await?;
    let now = Timestamp::now();
    match command {
        KeysCommand::Create { name, tenant: None, .. } => {
            let key = ApiKey::generate();
            let secret = SigningSecret::generate();
            store.create_key(&name, key.hash(), &secret, now).await?;
            crate::outln!("API key ({name}), shown only now: {}", key.expose());
            crate::outln!("its signing secret:                {}", secret.expose());
        }
        KeysCommand::Create { name, tenant: Some(tenant), .. } => {
            let key = ApiKey::generate();
            if store.add_key(tenant, &name, key.hash(), now).await?.is_none() {
                anyhow::bail!(
                    "there is no tenant {tenant} (see the TENANT column of: jobhook keys list); \
                     without --tenant, keys create makes a new tenant"
                );
            }
            let secret = store.signing_secrets(tenant, now).await?.into_iter().next();
            crate::outln!("API key ({name}) of tenant {tenant}, shown only now: {}", key.expose());
            if let Some(secret) = secret {
                crate::outln!("the tenant's signing secret (unchanged):  {}", secret.expose());
            }
        }
        KeysCommand::List { .. } => {
            crate::outln!("{:>4}  {:>6}  {:<8}  {:<24}  {:<24}  name", "id", "tenant", "source", "created", "revoked");
            for key in store.list_keys().await? {
                let revoked = key.revoked_at.map(Timestamp::rfc3339).unwrap_or_else(|| "-".into());
                let created = key.created_at.rfc3339();
                crate::outln!(
                    "{:>4}  {:>6}  {:<8}  {created:<24}  {revoked:<24}  {}",
                    key.id,
                    key.tenant_id,
                    key.source,
                    key.name
                );
            }
        }
        KeysCommand::Revoke { id, .. } => {
            let key = store.list_keys().await?.into_iter().find(|k| k.id == id);
            let Some(key) = key else {
                anyhow::bail!("there is no key with ID {id} (see: jobhook keys list)");
            };
            if key.revoked_at.is_some() {
                crate::outln!("key {id} was already revoked");
                return Ok(());
            }
            if !store.revoke_key(id, now).await? {
                anyhow::bail!("key {id} could not be revoked (see: jobhook keys list)");
            }
            crate::outln!("key {id} revoked; it answers 401 from now on");
            if key.source == "config" {
                crate::outln!(
                    "it comes from --api-keys (JOBHOOK_API_KEYS): remove it from there too; it stays revoked \
                     across restarts meanwhile"
                );
            }
        }
        KeysCommand::Secret => {} // printed above, without a store
    }
    Ok(())
}

/// The store the key commands manage. They never make one: run in the wrong directory, they would
/// otherwise create an empty `./jobhook.db` and manage keys no service reads.
pub(super) async fn open_existing_store(database_url: &str) -> anyhow::Result<Arc<dyn Store>> {
    crate::store::check_url(database_url)
        .map_err(|m| anyhow::anyhow!("invalid setting --database-url (JOBHOOK_DATABASE_URL): {m}"))?;
    if let Some(file) = crate::store::sqlite_file(database_url)
        && !std::path::Path::new(file).exists()
    {
        let full = std::path::absolute(file).map(|p| p.display().to_string()).unwrap_or_else(|_| file.to_owned());
        anyhow::bail!(
            "no jobhook store at {full}; pass --database-url (or set JOBHOOK_DATABASE_URL) to the store \
             `jobhook serve` uses (`jobhook serve` or `jobhook migrate` creates one)"
        );
    }
    let store = crate::store::open(database_url)
        .await
        .with_context(|| format!("cannot open the store {}", crate::config::file::mask_password(database_url)))?;
    Ok(store)
}
