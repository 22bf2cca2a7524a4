//! The `herald` binary: CLI → config → logging → server. Nothing else: serving is
//! [`herald::lifecycle::run`], the other subcommands are [`herald::commands`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use herald::commands::{self, TokenRequest};
use herald::config::{Config, LogFormat, Overrides};
use herald::lifecycle::{Outcome, RunError};
use tracing::error;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "herald", version, about = "WebSocket push center")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (without --config: the embedded development default).
    Serve {
        /// TOML config file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Client WebSocket address (overrides server.listen).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// API address (overrides server.api_listen).
        #[arg(long)]
        api_listen: Option<SocketAddr>,
        /// Number of shards (overrides server.shards).
        #[arg(long)]
        shards: Option<usize>,
        /// Log as JSON lines (overrides log.format).
        #[arg(long)]
        log_json: bool,
        /// Where API-made projects and keys persist (overrides server.state_dir).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Share the client port with a node already listening there, for a zero-downtime
        /// upgrade (sets server.handover); without it such a start is refused.
        #[arg(long)]
        handover: bool,
    },
    /// Print a JWT the server accepts, signed with the project's first HMAC key (projects and
    /// keys made through the API included).
    Token(TokenRequest),
    /// Print a commented production config with fresh random secrets.
    Genconfig,
    /// Validate a config file; exits non-zero naming the bad key.
    CheckConfig {
        /// TOML config file.
        #[arg(long)]
        config: PathBuf,
        /// Also connect to the `[engine]` and check it is Redis 7.0 or later.
        #[arg(long)]
        connect: bool,
    },
    /// Check the host's limits (open files, sysctls) against a connection target; prints a
    /// table and exits 1 when the host falls short.
    CheckHost {
        /// TOML config file (default: the embedded development default).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Target connections (default: server.max_connections; none when that is 0).
        #[arg(long)]
        connections: Option<u64>,
    },
}

fn init_logging(cfg: &Config, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log.level));
    // Colours only for a person at a terminal: never escape codes in journald or a log file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if json || cfg.log.format == LogFormat::Json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// The exit status of a served node: 0 stopped, 1 not started, 70 (EX_SOFTWARE: an internal
/// error; systemd's Restart=on-failure restarts the node) after a shard failed.
fn exit_code(result: Result<Outcome, RunError>) -> ExitCode {
    match result {
        Ok(Outcome::Stopped) => ExitCode::SUCCESS,
        Ok(Outcome::ShardFailed(_)) => ExitCode::from(70),
        Err(e) => {
            error!("{e}");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve {
            config,
            listen,
            api_listen,
            shards,
            log_json,
            state_dir,
            handover,
        } => {
            let mut cfg = match commands::load_or_report(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let overrides = Overrides {
                listen,
                api_listen,
                shards,
                state_dir,
                handover,
            };
            overrides.apply(&mut cfg);
            init_logging(&cfg, log_json);
            exit_code(herald::lifecycle::run(
                &cfg,
                herald::server::Options {
                    config_path: config,
                    overrides,
                },
            ))
        }
        Command::Token(req) => commands::token(req),
        Command::Genconfig => commands::genconfig(),
        Command::CheckHost {
            config,
            connections,
        } => commands::check_host(config.as_deref(), connections),
        Command::CheckConfig { config, connect } => commands::check_config(&config, connect),
    }
}
