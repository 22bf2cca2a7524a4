//! The host check: how many connections this host lets one herald process hold, against the
//! number it should hold, and what to change when it falls short.
//!
//! Every connection is one file descriptor, so the ceiling is the open-files limit
//! (RLIMIT_NOFILE; herald raises its soft limit to the hard one at start), itself capped by
//! `fs.nr_open`, and the system-wide `fs.file-max`, less the descriptors the node itself uses
//! (listeners, eventfds, io_uring rings, the API, logs: [`reserved_fds`]). `net.core.somaxconn`
//! silently truncates `server.listen_backlog`. `net.ipv4.ip_local_port_range` only matters for
//! outbound connections (a proxy in front of herald, or a load generator on the same host), so
//! it is informational.
//!
//! The tuning profiles in `tuning/` (`c100k`, `c1m`) set these values; `herald check-host`
//! prints this report as a table and `herald serve` logs it once at start.

use std::fmt::Write as _;
use std::path::Path;

use crate::config::Config;

/// Descriptors a node keeps from its client connections: `api.max_connections` API
/// connections plus [`FD_HEADROOM`] (listeners, eventfds, io_uring rings, state, logs, std
/// streams), at least 4 per shard plus 64, and never less than 1024, the reserve of
/// `tuning/herald-tune`'s rules (with the default `api.max_connections` of 768 the two are
/// equal, so both tools ask for the same limits). Client sockets are refused above
/// `RLIMIT_NOFILE` less this ([`client_fd_ceiling`]), so what `check-host` reports as the
/// ceiling is where clients are cut.
pub fn reserved_fds(cfg: &Config) -> u64 {
    let shards = 64 + 4 * cfg.nr_shards() as u64;
    let api = (cfg.api.max_connections as u64).saturating_add(FD_HEADROOM);
    api.max(shards).max(1024)
}

/// Descriptors beyond the API's connections that the node itself needs.
pub const FD_HEADROOM: u64 = 256;

/// The highest descriptor a client socket may have, out of `nofile` (RLIMIT_NOFILE), with
/// `reserve` ([`reserved_fds`]) kept for the node, the reserve being at most half of `nofile`
/// (a small limit still leaves clients half). The kernel hands out the lowest free
/// descriptor, so a client socket numbered at or above it means at least that many
/// descriptors are open; closing it keeps the top descriptors for the API, whatever the
/// clients do.
pub fn client_fd_ceiling(nofile: u64, reserve: u64) -> u64 {
    nofile - reserve.min(nofile / 2)
}

/// The fewest API connections allowed however small `RLIMIT_NOFILE` is: an operator's
/// health checks and a few management calls.
pub const MIN_API_CONNECTIONS: usize = 16;

/// The API connections the node may hold with `nofile` (RLIMIT_NOFILE; `None`: unknown) and
/// `reserve` ([`reserved_fds`]): `configured` (`api.max_connections`), lowered to what the
/// reserve actually granted ([`client_fd_ceiling`] keeps at most half of `nofile`) less
/// [`FD_HEADROOM`], but never below [`MIN_API_CONNECTIONS`] for it. Above it, API connections would
/// take descriptors the client port counts on.
pub fn api_connection_cap(nofile: Option<u64>, reserve: u64, configured: usize) -> usize {
    let Some(nofile) = nofile else {
        return configured;
    };
    let granted = nofile - client_fd_ceiling(nofile, reserve);
    let fits = usize::try_from(granted.saturating_sub(FD_HEADROOM)).unwrap_or(usize::MAX);
    configured.min(fits.max(MIN_API_CONNECTIONS))
}

/// `net.core.somaxconn` that `target` connections need: herald-tune's rule
/// `min(65535, max(4096, pow2(N / 16)))`, one second of a reconnect storm spread over 16 s
/// waiting in each listener's queue.
pub fn somaxconn_for(target: u64) -> u64 {
    target
        .div_ceil(16)
        .checked_next_power_of_two()
        .unwrap_or(u64::MAX)
        .clamp(4096, 65535)
}

/// The open-files limit (soft, hard).
pub fn nofile() -> Option<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0;
    ok.then_some((r.rlim_cur, r.rlim_max))
}

/// Raises the soft open-files limit to the hard one. Returns `(old, new)` when it changed.
///
/// # Errors
/// The `setrlimit` error.
pub fn raise_nofile() -> std::io::Result<Option<(u64, u64)>> {
    let Some((soft, hard)) = nofile() else {
        return Err(std::io::Error::last_os_error());
    };
    if soft >= hard {
        return Ok(None);
    }
    let r = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Some((soft, hard)))
}

fn sysctl(name: &str) -> Option<String> {
    let path = Path::new("/proc/sys").join(name.replace('.', "/"));
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn sysctl_u64(name: &str) -> Option<u64> {
    sysctl(name)?.parse().ok()
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Row {
    /// What is checked.
    pub name: &'static str,
    /// Its value here (`None`: could not be read).
    pub current: Option<String>,
    /// What the target needs (`None`: informational).
    pub needed: Option<String>,
    /// Whether the host falls short.
    pub short: bool,
    /// What to change.
    pub fix: String,
}

/// The whole check.
#[derive(Debug, Clone)]
pub struct Report {
    /// Connections the node should hold (`None`: no target, report only).
    pub target: Option<u64>,
    /// Descriptors reserved for the node itself.
    pub reserved: u64,
    /// Connections this process can hold here, from the limits alone.
    pub ceiling: Option<u64>,
    /// The tuning profile that fits the target.
    pub profile: &'static str,
    /// The lines.
    pub rows: Vec<Row>,
}

/// The tuning profile for a target connection count.
pub fn profile_for(target: u64) -> &'static str {
    if target <= 100_000 { "c100k" } else { "c1m" }
}

/// Checks the host against `target` connections (`None`: `server.max_connections`, or no
/// target when that is 0).
pub fn check(cfg: &Config, target: Option<u64>) -> Report {
    let target =
        target.or((cfg.server.max_connections > 0).then_some(cfg.server.max_connections as u64));
    let reserved = reserved_fds(cfg);
    let need_fds = target.map(|t| t + reserved);
    let profile = profile_for(target.unwrap_or(100_000));
    let apply = format!(
        "apply tuning profile {profile} (tuning/herald-tune apply --profile {profile}; \
         files tuning/profiles/{profile}/99-herald.conf and herald-limits.conf)"
    );
    let (soft, hard) = match nofile() {
        Some((s, h)) => (Some(s), Some(h)),
        None => (None, None),
    };
    let nr_open = sysctl_u64("fs.nr_open");
    let file_max = sysctl_u64("fs.file-max");
    let somaxconn = sysctl_u64("net.core.somaxconn");
    let port_range = sysctl("net.ipv4.ip_local_port_range");
    let backlog = u64::from(cfg.server.listen_backlog);
    let short_of = |have: Option<u64>, need: Option<u64>| match (have, need) {
        (Some(h), Some(n)) => h < n,
        _ => false,
    };
    let mut rows = Vec::new();
    rows.push(Row {
        name: "RLIMIT_NOFILE (hard)",
        current: hard.map(|v| v.to_string()),
        needed: need_fds.map(|v| v.to_string()),
        short: short_of(hard, need_fds),
        fix: format!(
            "LimitNOFILE= in the unit (systemd drop-in from tuning/profiles/{profile}/) or \
             limits.d `nofile`; must not exceed fs.nr_open"
        ),
    });
    rows.push(Row {
        name: "RLIMIT_NOFILE (soft)",
        current: soft.map(|v| v.to_string()),
        needed: None,
        short: false,
        fix: "herald raises it to the hard limit at start".into(),
    });
    rows.push(Row {
        name: "fs.nr_open",
        current: nr_open.map(|v| v.to_string()),
        needed: need_fds.map(|v| v.to_string()),
        short: short_of(nr_open, need_fds),
        fix: format!("sysctl fs.nr_open: {apply}"),
    });
    rows.push(Row {
        name: "fs.file-max",
        current: file_max.map(|v| v.to_string()),
        needed: need_fds.map(|v| v.to_string()),
        short: short_of(file_max, need_fds),
        fix: format!("sysctl fs.file-max (system-wide, shared with other processes): {apply}"),
    });
    // The backlog herald asks for, and with a target what a reconnect storm of it needs.
    let need_somaxconn = target.map_or(backlog, |t| somaxconn_for(t).max(backlog));
    rows.push(Row {
        name: "net.core.somaxconn",
        current: somaxconn.map(|v| v.to_string()),
        needed: Some(need_somaxconn.to_string()),
        short: short_of(somaxconn, Some(need_somaxconn)),
        fix: format!(
            "the accept queue of each listener: the kernel truncates server.listen_backlog \
             ({backlog}) to it, and a reconnect storm of the target needs \
             {need_somaxconn}: raise net.core.somaxconn ({apply})"
        ),
    });
    rows.push(Row {
        name: "net.ipv4.ip_local_port_range",
        current: port_range,
        needed: None,
        short: false,
        fix: "informational: bounds outbound connections per destination (a proxy or load \
              generator on this host), not inbound clients"
            .into(),
    });
    let ceiling = [hard, file_max]
        .into_iter()
        .flatten()
        .min()
        .map(|m| m.saturating_sub(reserved));
    let ceiling = match (ceiling, cfg.server.max_connections) {
        (Some(c), m) if m > 0 => Some(c.min(m as u64)),
        (c, _) => c,
    };
    Report {
        target,
        reserved,
        ceiling,
        profile,
        rows,
    }
}

impl Report {
    /// True when the host cannot hold the target.
    pub fn short(&self) -> bool {
        self.rows.iter().any(|r| r.short)
    }

    /// The one-line summary logged at start.
    pub fn summary(&self) -> String {
        let ceiling = self
            .ceiling
            .map_or_else(|| "unknown".to_string(), |c| c.to_string());
        let mut s = format!(
            "connection ceiling on this host: {ceiling} (min of RLIMIT_NOFILE hard and \
             fs.file-max, less {} reserved descriptors)",
            self.reserved
        );
        match self.target {
            Some(t) => {
                let _ = write!(s, "; target {t}");
            }
            None => s.push_str(
                "; no connection target (--connections N or server.max_connections), so only \
                 the listen backlog is checked",
            ),
        }
        let short: Vec<&str> = self
            .rows
            .iter()
            .filter(|r| r.short)
            .map(|r| r.name)
            .collect();
        if short.is_empty() {
            s.push_str("; host limits ok");
        } else {
            let _ = write!(
                s,
                "; SHORT: {}; apply tuning profile {} (tuning/herald-tune apply --profile {}) \
                 and LimitNOFILE from tuning/profiles/{}/herald-limits.conf",
                short.join(", "),
                self.profile,
                self.profile,
                self.profile
            );
        }
        s
    }

    /// The report as a table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<30} {:>22} {:>12}  {:<6} what to change",
            "check", "current", "needed", "status"
        );
        for r in &self.rows {
            let status = if r.short {
                "SHORT"
            } else if r.needed.is_none() {
                "info"
            } else if r.current.is_none() {
                "?"
            } else {
                "ok"
            };
            let _ = writeln!(
                out,
                "{:<30} {:>22} {:>12}  {:<6} {}",
                r.name,
                r.current.as_deref().unwrap_or("unknown"),
                r.needed.as_deref().unwrap_or("-"),
                status,
                if r.short || status == "info" || r.needed.is_none() {
                    r.fix.as_str()
                } else {
                    ""
                }
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "{}", self.summary());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_follows_target() {
        assert_eq!(profile_for(50_000), "c100k");
        assert_eq!(profile_for(100_000), "c100k");
        assert_eq!(profile_for(100_001), "c1m");
    }

    #[test]
    fn somaxconn_follows_the_tuning_rule() {
        // The values of tuning/profiles (c100k: 8192, c1m: 65535) and the 4096 floor.
        assert_eq!(somaxconn_for(1), 4096);
        assert_eq!(somaxconn_for(20_000), 4096);
        assert_eq!(somaxconn_for(100_000), 8192);
        assert_eq!(somaxconn_for(1_000_000), 65535);
        assert_eq!(somaxconn_for(u64::MAX), 65535);
        let mut c = Config::development();
        c.server.shards = 2;
        assert_eq!(
            reserved_fds(&c),
            1024,
            "the default is herald-tune's reserve"
        );
        c.server.shards = 1024;
        assert_eq!(reserved_fds(&c), 64 + 4 * 1024);
        c.server.shards = 2;
        c.api.max_connections = 4096;
        assert_eq!(reserved_fds(&c), 4096 + FD_HEADROOM);
    }

    #[test]
    fn the_api_keeps_its_descriptors_but_never_more_than_half() {
        assert_eq!(client_fd_ceiling(20_000, 1024), 20_000 - 1024);
        assert_eq!(client_fd_ceiling(1_048_576, 1280), 1_048_576 - 1280);
        assert_eq!(client_fd_ceiling(1024, 1024), 512);
        assert_eq!(client_fd_ceiling(0, 1024), 0);
    }

    #[test]
    fn api_connections_fit_the_reserve_granted() {
        // Reserve granted in full: the configured cap stands.
        assert_eq!(api_connection_cap(Some(20_000), 1024, 768), 768);
        assert_eq!(api_connection_cap(Some(1_048_576), 4096 + 256, 4096), 4096);
        // A limit of 1024 grants 512 of the 1024 asked: 256 connections after the headroom.
        assert_eq!(api_connection_cap(Some(1024), 1024, 768), 256);
        assert_eq!(api_connection_cap(Some(1024), 1024, 100), 100);
        // Tiny limits still leave the minimum; an unknown limit changes nothing.
        assert_eq!(
            api_connection_cap(Some(256), 1024, 768),
            MIN_API_CONNECTIONS
        );
        assert_eq!(api_connection_cap(Some(0), 1024, 768), MIN_API_CONNECTIONS);
        assert_eq!(api_connection_cap(None, 1024, 768), 768);
        assert_eq!(api_connection_cap(Some(256), 1024, 8), 8);
    }

    #[test]
    fn without_a_target_the_summary_says_so() {
        let r = check(&Config::development(), None);
        assert!(r.target.is_none());
        assert!(
            r.summary().contains("no connection target"),
            "{}",
            r.summary()
        );
        assert!(
            r.rows
                .iter()
                .all(|row| row.needed.is_none() || row.name == "net.core.somaxconn")
        );
    }

    #[test]
    fn huge_target_is_short_and_names_the_profile() {
        let r = check(&Config::development(), Some(u64::MAX / 4));
        assert!(r.short());
        assert!(r.summary().contains("c1m"));
        assert!(r.table().contains("RLIMIT_NOFILE (hard)"));
    }
}
