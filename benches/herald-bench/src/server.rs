//! The server under test when the bench starts it: `herald serve` on free loopback ports,
//! its ready line read from stdout, SIGTERM at the end.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// herald's ready line: `{"event":"ready","listen":..,"api_listen":..,"shards":N}`.
#[derive(Debug, Clone, Deserialize)]
pub struct Ready {
    /// Client port address.
    pub listen: String,
    /// API port address.
    pub api_listen: String,
    /// Shards started.
    pub shards: u64,
}

/// A herald process the bench started.
pub struct Spawned {
    child: Child,
    /// Its pid.
    pub pid: u32,
    /// What it said when ready.
    pub ready: Ready,
    /// Where its stderr (logs) went.
    pub log: PathBuf,
    /// The temporary state directory the bench made for it (removed at the end).
    state: Option<PathBuf>,
}

/// Starts `bin serve [--config FILE] --listen 127.0.0.1:0 --api-listen 127.0.0.1:0
/// --state-dir TEMP EXTRA..` and waits for its ready line. The port options are left out when
/// `extra` sets them; the state directory (where herald persists API-made projects, locked
/// by one process) is a fresh temporary one unless the config (`config_sets_state_dir`) or
/// `extra` names one, so a bench never touches an operator's state and runs side by side.
///
/// # Errors
/// The binary does not start, exits, or is not ready within 60 s.
pub async fn spawn(
    bin: &Path,
    config: Option<&Path>,
    config_sets_state_dir: bool,
    extra: &[String],
    log: Option<&Path>,
) -> Result<Spawned> {
    let log = log.map(Path::to_owned).unwrap_or_else(|| {
        std::env::temp_dir().join(format!("herald-bench-{}-herald.log", std::process::id()))
    });
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve");
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let sets = |flag: &str| {
        extra
            .iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
    };
    if !sets("--listen") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    if !sets("--api-listen") {
        cmd.args(["--api-listen", "127.0.0.1:0"]);
    }
    let mut state = None;
    if !config_sets_state_dir && !sets("--state-dir") {
        let dir = std::env::temp_dir().join(format!(
            "herald-bench-{}-{}-state",
            std::process::id(),
            sys_nanos()
        ));
        cmd.arg("--state-dir").arg(&dir);
        state = Some(dir);
    }
    cmd.args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id().context("herald exited at once")?;
    let stdout = child.stdout.take().context("herald stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if let Ok(r) = serde_json::from_str::<serde_json::Value>(&line)
                && r["event"] == "ready"
            {
                return Ok::<_, anyhow::Error>(Some(serde_json::from_value::<Ready>(r)?));
            }
        }
        Ok(None)
    })
    .await;
    let ready = match ready {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => bail!(
            "{} exited before its ready line; its log is {}",
            bin.display(),
            log.display()
        ),
        Ok(Err(e)) => return Err(e),
        Err(_) => bail!("{} was not ready within 60 s", bin.display()),
    };
    // Keep draining stdout so the server never blocks on it.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Spawned {
        child,
        pid,
        ready,
        log,
        state,
    })
}

fn sys_nanos() -> u64 {
    crate::sys::mono_ns()
}

impl Spawned {
    /// SIGTERM, then up to 20 s for a clean exit, then SIGKILL. Returns the exit status text.
    pub async fn stop(mut self) -> String {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        let status = match tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await {
            Ok(Ok(s)) => s.to_string(),
            Ok(Err(e)) => format!("wait failed: {e}"),
            Err(_) => {
                let _ = self.child.kill().await;
                "killed after 20 s without exiting on SIGTERM".into()
            }
        };
        if let Some(dir) = &self.state {
            let _ = std::fs::remove_dir_all(dir);
        }
        status
    }
}
