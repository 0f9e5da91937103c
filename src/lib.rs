//! jobhook turns polling into push.
//!
//! A caller registers an upstream job ID with a callback URL ([`api`]). The registration is committed to
//! the [`store`] before the answer. The [`poller`] keeps one entry per job in memory and polls the
//! upstream ([`upstream`]) until the job is Succeed or Failed; then, in one transaction, it stores the
//! result and one delivery per subscriber. The [`delivery`] dispatcher POSTs the result to each callback,
//! signed with Standard Webhooks, and retries on a schedule until the receiver answers 2xx.
//!
//! ```text
//! caller ─POST─▶ api ─commit─▶ store ─▶ poller ─GET─▶ upstream
//!                                          │ Pending: reschedule in memory (no write)
//!                                          │ Succeed/Failed: result + deliveries, one transaction
//!                                          ▼
//!                                      dispatcher ─signed POST─▶ callback (retry per schedule)
//! ```
//!
//! [`app`] wires the parts and shuts them down together; [`config`] holds every setting;
//! [`domain`] the types that untrusted input is parsed into; [`keys`] API keys and signing secrets;
//! [`mock_upstream`] a simulated job API for the quick start and the tests.

pub mod api;
pub mod app;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod console;
pub mod delivery;
pub mod domain;
pub mod health;
pub mod housekeeping;
pub mod keys;
pub mod metrics;
pub mod mock_upstream;
pub mod partition;
pub mod poller;
pub mod recent;
pub mod schedule;
pub mod store;
pub mod upstream;

/// Writes to standard output. A reader that has gone away (`jobhook config check | grep -q …`,
/// `| head`) is not an error: the rest of the output is dropped and the command finishes normally,
/// where `print!` would panic. Any other write error is reported once on stderr.
pub fn write_stdout(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush())
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("error: cannot write to standard output: {e}");
    }
}

/// `print!` without the panic on a closed pipe (see [`write_stdout`]).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::write_stdout(format_args!($($arg)*)) };
}

/// `println!` without the panic on a closed pipe (see [`write_stdout`]).
#[macro_export]
macro_rules! outln {
    () => { $crate::write_stdout(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Installs the TLS crypto provider (ring) once per process; safe to call again.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An error and its causes on one line (`what: why: deeper why`), for logs: the outermost message alone
/// often hides the reason. A cause whose text its wrapper already quotes is not repeated.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = self.0.to_string();
        f.write_str(&shown)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            let text = e.to_string();
            if !shown.ends_with(&text) {
                write!(f, ": {text}")?;
                shown = text;
            }
            cause = e.source();
        }
        Ok(())
    }
}
