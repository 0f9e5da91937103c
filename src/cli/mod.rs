//! The `jobhook` command line: its subcommands and what each one does. `main.rs` parses, starts the
//! logs and calls [`run`]; every setting of `serve` lives in [`crate::config`].

pub mod demo;
mod keys;
mod purge;
#[cfg(test)]
mod tests;
pub mod verify;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::app::Application;
use crate::config::file::{self, FromFile};
use crate::config::{ServeArgs, StoreArgs};
use verify::VerifyArgs;

#[derive(Debug, Parser)]
#[command(
    name = "jobhook",
    version,
    about = "Turns polling into push: polls async jobs, POSTs signed callbacks when they end."
)]
#[command(args_conflicts_with_subcommands = true, args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// A TOML file holding settings (keys: the flags of `serve` without the dashes); the environment and
    /// flags override it.
    #[arg(long, global = true, env = "JOBHOOK_CONFIG", value_name = "FILE")]
    pub config: Option<String>,

    /// Log lines as human-readable text or as JSON objects (one per line). Level: RUST_LOG.
    #[arg(long, global = true, env = "JOBHOOK_LOG_FORMAT", default_value = "text", value_enum)]
    pub log_format: LogFormat,

    /// Settings of `serve`, which is what plain `jobhook` runs.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the API and the workers (the default).
    Serve(Box<ServeArgs>),
    /// Manage API keys stored in the database.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Apply the database migrations and exit (serve applies them too, at start).
    Migrate(StoreArgs),
    /// Run a simulated AetherForge job API, for the quick start, the tests and the benchmark.
    MockUpstream(crate::mock_upstream::MockCommand),
    /// See the whole loop in a few seconds: a simulated upstream, jobhook on a temporary store and a
    /// receiver, all on 127.0.0.1; three jobs, each step printed as it happens.
    Demo,
    /// Check a captured delivery's signature against a secret, step by step (exit 0: verified, 1: not).
    Verify(VerifyArgs),
    /// Check a config file, or print a commented example of one.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Delete subscriptions that ended longer ago than --older-than, with their delivery attempts and
    /// the jobs nobody refers to any more (what housekeeping does on its schedule), and say how many.
    Purge(purge::PurgeArgs),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the settings (file, environment and flags together) and print the effective ones, with
    /// secrets masked and where each came from.
    Check(Box<ServeArgs>),
    /// Print a config file with every setting at its default, commented.
    Example,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create an API key (a new tenant with its own signing secret, or with --tenant another key of an
    /// existing tenant); the key is shown once.
    Create {
        #[command(flatten)]
        store: StoreArgs,
        /// A name to recognise the key by.
        #[arg(long, default_value = "default")]
        name: String,
        /// Add the key to this existing tenant (the TENANT column of `keys list`) instead of making a new
        /// one: it sees the tenant's subscriptions and signs with its secret (to replace a lost key).
        #[arg(long, value_name = "ID")]
        tenant: Option<i64>,
    },
    /// List the keys and their tenants (never the keys themselves: they are stored only as hashes).
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Revoke a key by the ID `keys list` shows; it answers 401 from then on.
    Revoke {
        #[command(flatten)]
        store: StoreArgs,
        /// The key's ID.
        id: i64,
    },
    /// Print a new random signing secret (`whsec_…`), for --signing-secret (JOBHOOK_SIGNING_SECRET);
    /// touches no store.
    Secret,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable text (coloured on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

/// Runs the parsed command; `matches` and `from_file` serve `config check`'s report of where each
/// setting came from.
pub fn run(cli: Cli, matches: &clap::ArgMatches, from_file: &FromFile, user_argv: &[OsString]) -> ExitCode {
    match &cli.command {
        Some(Command::Verify(args)) => return check_capture(args),
        Some(Command::Config { command }) => return config(command, matches, from_file, user_argv),
        _ => {}
    }
    crate::install_crypto();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            None => serve(cli.serve, cli.config.as_deref()).await,
            Some(Command::Serve(args)) => serve(*args, cli.config.as_deref()).await,
            Some(Command::Keys { command }) => keys::run(command).await,
            Some(Command::MockUpstream(args)) => crate::mock_upstream::run(args).await,
            Some(Command::Migrate(store)) => migrate(&store.database_url).await,
            Some(Command::Demo) => demo::run().await,
            Some(Command::Purge(args)) => purge::run(args).await,
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

fn check_capture(args: &VerifyArgs) -> ExitCode {
    match verify::read(args) {
        Ok(captured) => {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let (report, ok) = verify::check(&args.secret, &captured, now);
            crate::out!("{report}");
            if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn config(
    command: &ConfigCommand,
    matches: &clap::ArgMatches,
    from_file: &FromFile,
    user_argv: &[OsString],
) -> ExitCode {
    match command {
        ConfigCommand::Example => {
            crate::out!("{}", file::example(&<Cli as clap::CommandFactory>::command()));
            ExitCode::SUCCESS
        }
        ConfigCommand::Check(args) => {
            let check = matches.subcommand_matches("config").and_then(|m| m.subcommand_matches("check"));
            if let Some(check) = check {
                crate::out!(
                    "{}",
                    file::describe(&<Cli as clap::CommandFactory>::command(), check, from_file, user_argv)
                );
            }
            let checked = args.clone().into_config().map_err(anyhow::Error::from).and_then(|mut config| {
                if let Some(path) = &from_file.path {
                    config.add_profiles(path)?;
                }
                Ok(config)
            });
            match checked {
                Ok(config) => {
                    crate::out!("{}", file::describe_profiles(&config.upstreams));
                    crate::outln!("# ok: the settings are valid");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
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

async fn serve(args: ServeArgs, config_file: Option<&str>) -> anyhow::Result<()> {
    let mut config = args.into_config()?;
    if let Some(path) = config_file {
        config.add_profiles(path)?;
    }
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

async fn migrate(database_url: &str) -> anyhow::Result<()> {
    crate::store::check_url(database_url)
        .map_err(|m| anyhow::anyhow!("invalid setting --database-url (JOBHOOK_DATABASE_URL): {m}"))?;
    crate::store::open(database_url).await?;
    crate::outln!("the database is migrated");
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
