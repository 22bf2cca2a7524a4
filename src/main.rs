//! The `herald` binary: CLI → config → logging → server. Nothing else.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use herald::auth::{Claims, Registry, now_secs};
use herald::config::{Config, ConfigError, LogFormat, Overrides, production_template};
use tracing::{error, warn};

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
    Token {
        /// Project id.
        #[arg(long)]
        project: String,
        /// Subject (user id).
        #[arg(long)]
        sub: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Allowed topics, comma separated (`prefix*` allowed).
        #[arg(long, value_delimiter = ',')]
        topics: Option<Vec<String>>,
        /// Device id.
        #[arg(long)]
        device: Option<String>,
        /// TOML config file (default: the embedded development default).
        #[arg(long)]
        config: Option<PathBuf>,
        /// State directory holding the projects and keys made through the API (default: the
        /// server's, i.e. server.state_dir or its default).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Print a commented production config with fresh random secrets.
    Genconfig,
    /// Validate a config file; exits non-zero naming the bad key.
    CheckConfig {
        /// TOML config file.
        #[arg(long)]
        config: PathBuf,
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

fn load(config: &Option<PathBuf>) -> Result<(Config, bool), String> {
    match config {
        Some(path) => Config::load(path)
            .map(|c| (c, false))
            .map_err(|e| e.to_string()),
        None => Ok((Config::development(), true)),
    }
}

/// [`load`], printing the error and giving the exit code (2) on failure.
fn load_or_report(config: &Option<PathBuf>) -> Result<(Config, bool), ExitCode> {
    load(config).map_err(|e| {
        eprintln!("herald: {e}");
        ExitCode::from(2)
    })
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            listen,
            api_listen,
            shards,
            log_json,
            state_dir,
            handover,
        } => {
            let (mut cfg, dev) = match load_or_report(&config) {
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
            if !cfg.server.transparent_huge_pages {
                // SAFETY: prctl with integer arguments only; affects this process's memory map.
                let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
                if r != 0 {
                    warn!(
                        "could not disable transparent huge pages: {}",
                        std::io::Error::last_os_error()
                    );
                }
            }
            match herald::hostcheck::raise_nofile() {
                Ok(Some((old, new))) => {
                    tracing::info!(
                        old,
                        new,
                        "raised the open-files soft limit to the hard limit"
                    )
                }
                Ok(None) => {}
                Err(e) => warn!("could not raise the open-files soft limit: {e}"),
            }
            let report = herald::hostcheck::check(&cfg, None);
            if report.short() {
                warn!("{}", report.summary());
            } else {
                tracing::info!("{}", report.summary());
            }
            if dev || cfg.uses_dev_keys() {
                warn!(
                    "!!! DEVELOPMENT MODE: public development secrets are in use ({}). Loopback only. \
                     Never run this in production: generate a config with `herald genconfig` !!!",
                    cfg.dev_key_users().join(", ")
                );
            }
            serve(
                &cfg,
                herald::server::Options {
                    config_path: config,
                    overrides,
                },
            )
        }
        Command::Token {
            project,
            sub,
            ttl,
            topics,
            device,
            config,
            state_dir,
        } => {
            let (cfg, _) = match load_or_report(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let state_dir = state_dir
                .or_else(|| cfg.server.state_dir.clone())
                .unwrap_or_else(herald::store::default_dir);
            let registry = match cfg
                .validate()
                .map_err(|e| e.to_string())
                .and_then(|()| herald::store::read_state(&state_dir).map_err(|e| e.to_string()))
                .and_then(|state| Registry::build(&cfg, &state, None).map_err(|e| e.to_string()))
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("herald: {e}");
                    return ExitCode::from(2);
                }
            };
            let Some(p) = registry.project(&project) else {
                eprintln!(
                    "herald: no project `{project}` in the config or in {}",
                    state_dir.join(herald::store::STATE_FILE).display()
                );
                return ExitCode::from(2);
            };
            if let Err(e) = herald::pubsub::check_id(&sub) {
                eprintln!("herald: --sub {e}");
                return ExitCode::from(2);
            }
            if let Some(Err(e)) = device.as_deref().map(herald::pubsub::check_id) {
                eprintln!("herald: --device {e}");
                return ExitCode::from(2);
            }
            if ttl > p.max_token_lifetime_secs {
                eprintln!(
                    "herald: --ttl {ttl} is longer than project `{project}`'s \
                     max_token_lifetime_secs ({}): the server would refuse the token",
                    p.max_token_lifetime_secs
                );
                return ExitCode::from(2);
            }
            let claims = Claims {
                sub,
                exp: Some(now_secs() + ttl),
                topics,
                device,
            };
            match p.mint(&claims) {
                Ok(t) => {
                    println!("{t}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("herald: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Genconfig => {
            print!("{}", production_template());
            ExitCode::SUCCESS
        }
        Command::CheckHost {
            config,
            connections,
        } => {
            let (cfg, _) = match load_or_report(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let report = herald::hostcheck::check(&cfg, connections);
            print!("{}", report.table());
            if report.short() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::CheckConfig { config } => {
            match Config::load(&config).and_then(|c| c.validate().map(|()| c)) {
                Ok(c) => match Registry::from_config(&c) {
                    Ok(_) => {
                        println!("{}: ok", config.display());
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("herald: {}: {e}", config.display());
                        ExitCode::from(1)
                    }
                },
                // Read and parse errors name the file themselves.
                Err(e @ (ConfigError::Read { .. } | ConfigError::Parse { .. })) => {
                    eprintln!("herald: {e}");
                    ExitCode::from(1)
                }
                Err(e) => {
                    eprintln!("herald: {}: {e}", config.display());
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn serve(cfg: &Config, opts: herald::server::Options) -> ExitCode {
    let handle = match herald::server::start_with(cfg, opts) {
        Ok(h) => h,
        Err(e) => {
            error!("cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    let hub = handle.hub.clone();
    let admin = handle.admin.clone();
    let signal_set = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];
    let mut signals = match signal_hook::iterator::Signals::new(signal_set) {
        Ok(s) => s,
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };
    std::thread::Builder::new()
        .name("herald-signals".into())
        .spawn(move || {
            let mut draining = false;
            for sig in signals.forever() {
                if sig == libc::SIGHUP {
                    if draining {
                        tracing::info!("SIGHUP while draining: ignored");
                        continue;
                    }
                    herald::notify::reloading();
                    match admin.reload() {
                        Ok(()) => herald::notify::reloaded("serving (reloaded)"),
                        Err(reason) => herald::notify::reload_refused(&reason),
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
                tracing::info!(signal = sig, "draining: closing every connection with 1001");
                herald::notify::stopping("draining: closing every connection with 1001");
                draining = true;
                hub.drain();
            }
        })
        .expect("spawning the signal thread");
    // Only now: a SIGTERM sent as soon as this line is read must find the handlers installed.
    println!(
        "{}",
        serde_json::json!({
            "event": "ready",
            "listen": handle.listen.to_string(),
            "api_listen": handle.api_listen.to_string(),
            "shards": handle.hub.nr_shards(),
        })
    );
    herald::notify::ready(&format!(
        "serving on {} ({} shards), API on {}",
        handle.listen,
        handle.hub.nr_shards(),
        handle.api_listen
    ));
    herald::notify::spawn_watchdog(
        handle.hub.clone(),
        herald::shard::Limits::from_config(cfg).tick(),
    );
    let hub = handle.hub.clone();
    handle.join();
    if let Some(shard) = hub.failed_shard() {
        error!(
            shard,
            "stopped after shard {shard} failed; exiting with status 70"
        );
        // EX_SOFTWARE: an internal error; systemd's Restart=on-failure restarts the node.
        return ExitCode::from(70);
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}
