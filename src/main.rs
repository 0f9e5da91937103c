//! The `jobhook` command: parse the command line, start logging, run a subcommand.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use jobhook::app::Application;
use jobhook::config::{Cli, Command, KeysCommand, ServeArgs};
use jobhook::keys::{ApiKey, SigningSecret};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
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
            Some(Command::Keys { command: KeysCommand::Create { store, name } }) => {
                create_key(&store.database_url, &name).await
            }
            Some(Command::MockUpstream(args)) => jobhook::mock_upstream::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    let app = Application::build(config).await?;
    let token = app.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        token.cancel();
    });
    app.run_until_stopped().await
}

async fn create_key(database_url: &str, name: &str) -> anyhow::Result<()> {
    jobhook::store::check_url(database_url)
        .map_err(|m| anyhow::anyhow!("invalid setting --database-url (JOBHOOK_DATABASE_URL): {m}"))?;
    let store = jobhook::store::open(database_url).await?;
    let key = ApiKey::generate();
    let secret = SigningSecret::generate();
    store.create_key(name, key.hash(), &secret, jobhook::store::now_ms()).await?;
    println!("API key ({name}), shown only now: {}", key.expose());
    println!("its signing secret:                {}", secret.expose());
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
