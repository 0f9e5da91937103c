//! The `jobhook` command: parse the command line, start logging, run a subcommand.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches};
use jobhook::app::Application;
use jobhook::config::{Cli, Command, ConfigCommand, KeysCommand, ServeArgs};
use jobhook::keys::{ApiKey, SigningSecret};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let user_argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // The config file's settings become flags before the user's own (see config/file.rs).
    let (argv, from_file) = match jobhook::config::file::merge(user_argv.clone()) {
        Ok(merged) => merged,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let matches = match Cli::command().try_get_matches_from(&argv) {
        Ok(matches) => matches,
        Err(e) => {
            // clap names the flag; when the value came from the config file, say so too.
            let from_the_file = e
                .get(clap::error::ContextKind::InvalidArg)
                .and_then(|arg| {
                    arg.to_string().split_whitespace().next().map(|f| f.trim_start_matches('-').replace('-', "_"))
                })
                .filter(|id| from_file.applied.contains(id));
            let _ = e.print();
            if let (Some(key), Some(path)) = (from_the_file, &from_file.path) {
                eprintln!("note: that value is `{key}` in the config file {path}");
            }
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The demo prints its own story; the service's own lines would drown it (RUST_LOG still shows them).
    let default_level = if matches!(cli.command, Some(Command::Demo)) { "warn" } else { "info" };
    let filter = log_filter(std::env::var("RUST_LOG").ok(), default_level);
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cli.log_format == "json" {
        // One JSON object per line, with the current span and its parents (request_id, job_id,
        // subscription_id) as fields.
        logs.json().with_current_span(true).with_span_list(true).init();
    } else {
        logs.with_ansi(std::io::stderr().is_terminal()).init();
    }
    for setting in &from_file.overridden {
        tracing::info!(setting = %setting, "the config file's value is overridden by its JOBHOOK_* environment variable");
    }
    if let Some(Command::Verify(args)) = &cli.command {
        return match jobhook::verify::read(args) {
            Ok(captured) => {
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                let (report, ok) = jobhook::verify::check(&args.secret, &captured, now);
                jobhook::out!("{report}");
                if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        };
    }
    if let Some(Command::Config { command }) = &cli.command {
        return match command {
            ConfigCommand::Example => {
                jobhook::out!("{}", jobhook::config::file::example());
                ExitCode::SUCCESS
            }
            ConfigCommand::Check(args) => {
                let check = matches.subcommand_matches("config").and_then(|m| m.subcommand_matches("check"));
                if let Some(check) = check {
                    jobhook::out!("{}", jobhook::config::file::describe(check, &from_file, &user_argv));
                }
                match args.clone().into_config() {
                    Ok(_) => {
                        jobhook::outln!("# ok: the settings are valid");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::from(2)
                    }
                }
            }
        };
    }
    jobhook::install_crypto();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            None => serve(cli.serve).await,
            Some(Command::Serve(args)) => serve(*args).await,
            Some(Command::Keys { command }) => keys(command).await,
            Some(Command::MockUpstream(args)) => jobhook::mock_upstream::run(args).await,
            Some(Command::Migrate(store)) => migrate(&store.database_url).await,
            Some(Command::Demo) => jobhook::demo::run().await,
            Some(Command::Purge(args)) => purge(args).await,
            Some(Command::Config { .. } | Command::Verify(_)) => Ok(()), // answered above
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", explain(&e));
            ExitCode::from(2)
        }
    }
}

/// `RUST_LOG` (or the default level), with PostgreSQL's notices held at `warn` unless it names sqlx
/// itself: every start would otherwise log "relation \"_sqlx_migrations\" already exists, skipping".
fn log_filter(rust_log: Option<String>, default_level: &str) -> EnvFilter {
    let wanted = rust_log.filter(|s| !s.trim().is_empty()).unwrap_or_else(|| default_level.to_owned());
    let directives = if wanted.contains("sqlx") { wanted } else { format!("{wanted},sqlx::postgres::notice=warn") };
    EnvFilter::try_new(directives).unwrap_or_else(|_| EnvFilter::new(default_level))
}

/// The error and its causes, joined with ": ". Many errors (sqlx's among them) already show their
/// source in their own message; a cause whose text is already there is not repeated.
fn explain(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    text
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    // A file-size limit (RLIMIT_FSIZE) reached by the store must fail the write — which the store reports
    // as "unavailable" and the API as 503 — not kill the process with SIGXFSZ. A handler, once set, stays.
    #[cfg(unix)]
    let _file_size_limit = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(25));
    let app = Application::build(config).await?;
    let token = app.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        token.cancel();
    });
    app.run_until_stopped().await
}

async fn keys(command: KeysCommand) -> anyhow::Result<()> {
    let store = match &command {
        KeysCommand::Create { store, .. } | KeysCommand::List { store } | KeysCommand::Revoke { store, .. } => store,
        KeysCommand::Secret => {
            jobhook::outln!("{}", SigningSecret::generate().expose());
            return Ok(());
        }
    };
    let store = open_existing_store(&store.database_url).await?;
    let now = jobhook::store::now_ms();
    match command {
        KeysCommand::Create { name, tenant: None, .. } => {
            let key = ApiKey::generate();
            let secret = SigningSecret::generate();
            store.create_key(&name, key.hash(), &secret, now).await?;
            jobhook::outln!("API key ({name}), shown only now: {}", key.expose());
            jobhook::outln!("its signing secret:                {}", secret.expose());
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
            jobhook::outln!("API key ({name}) of tenant {tenant}, shown only now: {}", key.expose());
            if let Some(secret) = secret {
                jobhook::outln!("the tenant's signing secret (unchanged):  {}", secret.expose());
            }
        }
        KeysCommand::List { .. } => {
            jobhook::outln!(
                "{:>4}  {:>6}  {:<8}  {:<24}  {:<24}  name",
                "id",
                "tenant",
                "source",
                "created",
                "revoked"
            );
            for key in store.list_keys().await? {
                let revoked = key.revoked_at.map(jobhook::api::rfc3339).unwrap_or_else(|| "-".into());
                let created = jobhook::api::rfc3339(key.created_at);
                jobhook::outln!(
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
                jobhook::outln!("key {id} was already revoked");
                return Ok(());
            }
            if !store.revoke_key(id, now).await? {
                anyhow::bail!("key {id} could not be revoked (see: jobhook keys list)");
            }
            jobhook::outln!("key {id} revoked; it answers 401 from now on");
            if key.source == "config" {
                jobhook::outln!(
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
async fn open_existing_store(database_url: &str) -> anyhow::Result<std::sync::Arc<dyn jobhook::store::Store>> {
    jobhook::store::check_url(database_url)
        .map_err(|m| anyhow::anyhow!("invalid setting --database-url (JOBHOOK_DATABASE_URL): {m}"))?;
    if let Some(file) = jobhook::store::sqlite_file(database_url)
        && !std::path::Path::new(file).exists()
    {
        let full = std::path::absolute(file).map(|p| p.display().to_string()).unwrap_or_else(|_| file.to_owned());
        anyhow::bail!(
            "no jobhook store at {full}; pass --database-url (or set JOBHOOK_DATABASE_URL) to the store \
             `jobhook serve` uses (`jobhook serve` or `jobhook migrate` creates one)"
        );
    }
    let store = jobhook::store::open(database_url)
        .await
        .with_context(|| format!("cannot open the store {}", jobhook::config::file::mask_password(database_url)))?;
    Ok(store)
}

async fn migrate(database_url: &str) -> anyhow::Result<()> {
    jobhook::store::check_url(database_url)
        .map_err(|m| anyhow::anyhow!("invalid setting --database-url (JOBHOOK_DATABASE_URL): {m}"))?;
    jobhook::store::open(database_url).await?;
    jobhook::outln!("the database is migrated");
    Ok(())
}

/// `jobhook purge`: the housekeeping purge, once, from the command line.
async fn purge(args: jobhook::config::PurgeArgs) -> anyhow::Result<()> {
    let store = open_existing_store(&args.store.database_url).await?;
    let older = humantime::format_duration(args.older_than);
    let ended_before =
        jobhook::store::now_ms().saturating_sub(i64::try_from(args.older_than.as_millis()).unwrap_or(i64::MAX));
    if args.dry_run {
        let would = store.purgeable(ended_before).await?;
        jobhook::outln!(
            "would delete {} subscription(s) that ended more than {older} ago, {} delivery attempt(s) and {} job(s) (dry run: nothing deleted)",
            would.subscriptions,
            would.attempts,
            would.jobs
        );
        return Ok(());
    }
    match jobhook::housekeeping::purge(store.as_ref(), ended_before).await? {
        Some(done) => jobhook::outln!(
            "deleted {} subscription(s) that ended more than {older} ago, {} delivery attempt(s) and {} job(s)",
            done.subscriptions,
            done.attempts,
            done.jobs
        ),
        None => anyhow::bail!("another jobhook instance is purging this database now; try again later"),
    }
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
