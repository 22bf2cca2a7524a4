//! A served node's life, from process setup to exit: prepare the process
//! ([`crate::system::process`]), build the [`Settings`], wire the node ([`crate::server::wire`]),
//! install the signal handlers, announce readiness (the `ready` line on stdout, then systemd's
//! `READY=1` and its watchdog), and wait for the end.
//!
//! Signals, on their own thread (`herald-signals`):
//! - SIGTERM/SIGINT: drain (close 1001 to every client, `STOPPING=1`); a second one during
//!   the drain exits at once with status 128 + the signal.
//! - SIGHUP: reload ([`crate::admin::Admin::reload`]) between `RELOADING=1` and `READY=1`;
//!   ignored while draining.
//!
//! What it hands back is an [`Outcome`]; the binary turns it into an exit status.

use tracing::{error, info};

use crate::config::Config;
use crate::hub::Hub;
use crate::server::{self, Options, StartError};
use crate::settings::Settings;
use crate::system::notify;

/// How a served node ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Drained and stopped after a stop signal.
    Stopped,
    /// A shard thread panicked; the rest drained. The node must be restarted.
    ShardFailed(usize),
}

/// Why a node could not be served.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The node did not start.
    #[error("cannot start: {0}")]
    Start(#[from] StartError),
    /// The signal handlers could not be installed (the node was not announced ready).
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Serves `cfg` until a stop signal drains the node or a shard fails. `opts.config_path` is
/// the file SIGHUP re-reads; `None` means the embedded development default.
///
/// # Errors
/// [`RunError`]: nothing was served.
pub fn run(cfg: &Config, opts: Options) -> Result<Outcome, RunError> {
    crate::system::process::prepare(cfg, opts.config_path.is_none());
    let settings = Settings::from_config(cfg).map_err(StartError::from)?;
    let handle = server::wire(cfg, &settings, opts)?;
    let hub = handle.hub.clone();
    spawn_signal_thread(&handle).map_err(RunError::Signals)?;
    // Only now: a SIGTERM sent as soon as this line is read must find the handlers installed.
    println!(
        "{}",
        serde_json::json!({
            "event": "ready",
            "listen": handle.listen.to_string(),
            "api_listen": handle.api_listen.to_string(),
            "shards": hub.nr_shards(),
        })
    );
    notify::ready(&format!(
        "serving on {} ({} shards), API on {}",
        handle.listen,
        hub.nr_shards(),
        handle.api_listen
    ));
    notify::spawn_watchdog(hub.clone(), settings.limits.tick());
    handle.join();
    Ok(outcome(&hub))
}

/// How the node ended, logged.
fn outcome(hub: &Hub) -> Outcome {
    if let Some(shard) = hub.failed_shard() {
        error!(
            shard,
            "stopped after shard {shard} failed; exiting with status 70"
        );
        return Outcome::ShardFailed(shard);
    }
    info!("stopped");
    Outcome::Stopped
}

/// Installs the SIGTERM/SIGINT/SIGHUP handlers and the thread that acts on them.
fn spawn_signal_thread(handle: &server::ServerHandle) -> std::io::Result<()> {
    let hub = handle.hub.clone();
    let admin = handle.admin.clone();
    let mut signals =
        signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT, libc::SIGHUP])?;
    std::thread::Builder::new()
        .name("herald-signals".into())
        .spawn(move || {
            let mut draining = false;
            for sig in signals.forever() {
                if sig == libc::SIGHUP {
                    if draining {
                        info!("SIGHUP while draining: ignored");
                        continue;
                    }
                    notify::reloading();
                    match admin.reload() {
                        Ok(()) => notify::reloaded("serving (reloaded)"),
                        Err(reason) => notify::reload_refused(&reason),
                    }
                    continue;
                }
                if draining {
                    // A second SIGTERM/SIGINT: the operator does not want to wait for the drain.
                    error!(
                        signal = sig,
                        "second stop signal during the drain: exiting now with status {}, \
                         without waiting for the clients",
                        128 + sig
                    );
                    std::process::exit(128 + sig);
                }
                info!(signal = sig, "draining: closing every connection with 1001");
                notify::stopping("draining: closing every connection with 1001");
                draining = true;
                hub.drain();
            }
        })
        .expect("spawning the signal thread");
    Ok(())
}
