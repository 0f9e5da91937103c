//! `jobhook purge`: the housekeeping purge, once, from the command line.

use std::time::Duration;

use crate::config::{StoreArgs, parse_duration};
use crate::domain::Timestamp;

#[derive(Debug, clap::Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Subscriptions that ended (delivered, failed, expired, cancelled) longer ago than this are deleted.
    #[arg(long, value_parser = parse_duration)]
    pub older_than: Duration,
    /// Only count what would be deleted.
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn run(args: PurgeArgs) -> anyhow::Result<()> {
    let store = super::keys::open_existing_store(&args.store.database_url).await?;
    let older = humantime::format_duration(args.older_than);
    let ended_before = Timestamp::now() - args.older_than;
    if args.dry_run {
        let would = store.purgeable(ended_before).await?;
        crate::outln!(
            "would delete {} subscription(s) that ended more than {older} ago, {} delivery attempt(s) and {} job(s) (dry run: nothing deleted)",
            would.subscriptions,
            would.attempts,
            would.jobs
        );
        return Ok(());
    }
    match crate::housekeeping::purge(store.as_ref(), ended_before, |_| {}).await? {
        Some(done) => crate::outln!(
            "deleted {} subscription(s) that ended more than {older} ago, {} delivery attempt(s) and {} job(s)",
            done.subscriptions,
            done.attempts,
            done.jobs
        ),
        None => anyhow::bail!("another jobhook instance is purging this database now; try again later"),
    }
    Ok(())
}
