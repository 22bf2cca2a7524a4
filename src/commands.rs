//! The binary's one-shot subcommands (everything but `serve`, which is
//! [`crate::lifecycle::run`]): each takes its parsed arguments, prints its result on stdout or
//! its error on stderr (`herald: ...`), and returns the process's exit status.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::auth::{Claims, Registry, now_secs};
use crate::config::{Config, ConfigError, production_template};

/// The config in `path`, or the embedded development default without one.
///
/// # Errors
/// The file cannot be read or parsed; the error is printed and the exit status (2) returned.
pub fn load_or_report(path: Option<&Path>) -> Result<Config, ExitCode> {
    let Some(path) = path else {
        return Ok(Config::development());
    };
    Config::load(path).map_err(|e| {
        eprintln!("herald: {e}");
        ExitCode::from(2)
    })
}

/// `herald token`'s arguments (parsed by the binary's command line).
#[derive(Debug, Clone, clap::Args)]
pub struct TokenRequest {
    /// Project id.
    #[arg(long)]
    pub project: String,
    /// Subject (user id).
    #[arg(long)]
    pub sub: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl: u64,
    /// Allowed topics, comma separated (`prefix*` allowed).
    #[arg(long, value_delimiter = ',')]
    pub topics: Option<Vec<String>>,
    /// Device id.
    #[arg(long)]
    pub device: Option<String>,
    /// TOML config file (default: the embedded development default).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// State directory holding the projects and keys made through the API (default: the
    /// server's, i.e. server.state_dir or its default).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

/// `herald token`: prints a JWT the server accepts, signed with the project's first HMAC key
/// (projects and keys made through the API included). Exit status 2 on any error.
pub fn token(req: TokenRequest) -> ExitCode {
    let cfg = match load_or_report(req.config.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let state_dir = req
        .state_dir
        .or_else(|| cfg.server.state_dir.clone())
        .unwrap_or_else(crate::store::default_dir);
    let registry = match cfg
        .validate()
        .map_err(|e| e.to_string())
        .and_then(|()| crate::store::read_state(&state_dir).map_err(|e| e.to_string()))
        .and_then(|state| Registry::build(&cfg, &state, None).map_err(|e| e.to_string()))
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("herald: {e}");
            return ExitCode::from(2);
        }
    };
    let project = &req.project;
    let Some(p) = registry.project(project) else {
        eprintln!(
            "herald: no project `{project}` in the config or in {}",
            state_dir.join(crate::store::STATE_FILE).display()
        );
        return ExitCode::from(2);
    };
    if let Err(e) = crate::pubsub::check_id(&req.sub) {
        eprintln!("herald: --sub {e}");
        return ExitCode::from(2);
    }
    if let Some(Err(e)) = req.device.as_deref().map(crate::pubsub::check_id) {
        eprintln!("herald: --device {e}");
        return ExitCode::from(2);
    }
    let ttl = req.ttl;
    if ttl > p.max_token_lifetime_secs {
        eprintln!(
            "herald: --ttl {ttl} is longer than project `{project}`'s \
             max_token_lifetime_secs ({}): the server would refuse the token",
            p.max_token_lifetime_secs
        );
        return ExitCode::from(2);
    }
    let claims = Claims {
        sub: req.sub,
        exp: Some(now_secs() + ttl),
        topics: req.topics,
        device: req.device,
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

/// `herald genconfig`: prints a commented production config with fresh random secrets.
pub fn genconfig() -> ExitCode {
    print!("{}", production_template());
    ExitCode::SUCCESS
}

/// `herald check-host`: prints the host check's table for `connections` (default:
/// `server.max_connections`) and exits 1 when the host falls short.
pub fn check_host(config: Option<&Path>, connections: Option<u64>) -> ExitCode {
    let cfg = match load_or_report(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let report = crate::system::hostcheck::check(&cfg, connections);
    print!("{}", report.table());
    if report.short() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// `herald check-config`: validates a config file and loads its projects and keys; with
/// `connect`, also connects to the `[engine]` it names and checks its version. Exits 1 naming
/// the bad key, or saying why the engine cannot be used.
pub fn check_config(config: &Path, connect: bool) -> ExitCode {
    let c = match Config::load(config).and_then(|c| c.validate().map(|()| c)) {
        Ok(c) => c,
        // Read and parse errors name the file themselves.
        Err(e @ (ConfigError::Read { .. } | ConfigError::Parse { .. })) => {
            eprintln!("herald: {e}");
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("herald: {}: {e}", config.display());
            return ExitCode::from(1);
        }
    };
    if let Err(e) = Registry::from_config(&c) {
        eprintln!("herald: {}: {e}", config.display());
        return ExitCode::from(1);
    }
    if connect {
        let Some(engine) = &c.engine else {
            eprintln!(
                "herald: {}: --connect: no [engine] section, nothing to connect to",
                config.display()
            );
            return ExitCode::from(1);
        };
        let checked = crate::settings::EngineSettings::new(engine)
            .map_err(|e| e.to_string())
            .and_then(|s| crate::broker::redis::check_engine(&s));
        match checked {
            Ok(version) => println!("{}: engine: Redis {version}, reachable", config.display()),
            Err(e) => {
                eprintln!("herald: {}: engine: {e}", config.display());
                return ExitCode::from(1);
            }
        }
    }
    println!("{}: ok", config.display());
    ExitCode::SUCCESS
}
