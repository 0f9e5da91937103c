//! The `jobhook` command: parse the command line, start logging, run a subcommand ([`jobhook::cli`]).

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use jobhook::cli::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let user_argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // The config file's settings become flags before the user's own (see config/file.rs).
    let (argv, from_file) = match jobhook::config::file::merge(&Cli::command(), user_argv.clone()) {
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
    match cli.log_format {
        // One JSON object per line, with the current span and its parents (request_id, job_id,
        // subscription_id) as fields.
        LogFormat::Json => logs.json().with_current_span(true).with_span_list(true).init(),
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    for setting in &from_file.overridden {
        tracing::info!(setting = %setting, "the config file's value is overridden by its JOBHOOK_* environment variable");
    }
    jobhook::cli::run(cli, &matches, &from_file, &user_argv)
}

/// `RUST_LOG` (or the default level), with PostgreSQL's notices held at `warn` unless it names sqlx
/// itself: every start would otherwise log "relation \"_sqlx_migrations\" already exists, skipping".
fn log_filter(rust_log: Option<String>, default_level: &str) -> EnvFilter {
    let wanted = rust_log.filter(|s| !s.trim().is_empty()).unwrap_or_else(|| default_level.to_owned());
    let directives = if wanted.contains("sqlx") { wanted } else { format!("{wanted},sqlx::postgres::notice=warn") };
    EnvFilter::try_new(directives).unwrap_or_else(|_| EnvFilter::new(default_level))
}
