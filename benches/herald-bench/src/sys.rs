//! What the bench reads from the operating system: the shared monotonic clock, the server's
//! memory and CPU time, kernel socket memory, machine facts, and the open-files limit.
//!
//! Everything here is Linux `/proc`; a figure that cannot be read is `None`, never a guess.

use std::collections::BTreeMap;
use std::fs;

use serde::Serialize;

/// `CLOCK_MONOTONIC` in nanoseconds. The clock is system-wide, so the publisher (parent) and
/// the receivers (worker processes) stamp and compare times on the same clock.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Raises the soft open-files limit to the hard limit; returns the resulting soft limit.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// Memory of one process from `/proc/<pid>/status`, in bytes.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct ProcMemory {
    /// Resident set size (`VmRSS`): what the process holds in RAM.
    pub rss_bytes: u64,
    /// Anonymous resident memory (`RssAnon`): heap and stacks, without mapped files.
    pub rss_anon_bytes: u64,
}

/// Reads `VmRSS` and `RssAnon` of `pid`.
pub fn proc_memory(pid: u32) -> Option<ProcMemory> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|k| k * 1024)
    };
    Some(ProcMemory {
        rss_bytes: kib("VmRSS:")?,
        rss_anon_bytes: kib("RssAnon:").unwrap_or(0),
    })
}

/// User + system CPU time of `pid` so far, in seconds (`/proc/<pid>/stat` fields 14 and 15).
pub fn proc_cpu_secs(pid: u32) -> Option<f64> {
    proc_cpu_split(pid).map(|(user, system)| user + system)
}

/// User and system CPU time of `pid` so far, in seconds (`/proc/<pid>/stat` fields 14 and
/// 15).
pub fn proc_cpu_split(pid: u32) -> Option<(f64, f64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces: fields are counted after its `)`.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime / hz, stime / hz))
}

/// Kernel-side TCP figures, system-wide.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct KernelTcp {
    /// TCP sockets in use (`/proc/net/sockstat`, `TCP: inuse`).
    pub inuse: u64,
    /// Sockets in TIME_WAIT (`tw`).
    pub time_wait: u64,
    /// Pages of socket buffer memory (`mem`), times the page size.
    pub mem_bytes: u64,
    /// Kernel slab memory (`/proc/meminfo`, `Slab`): socket structures, inodes, file objects.
    pub slab_bytes: u64,
}

/// Reads `/proc/net/sockstat` and the `Slab` line of `/proc/meminfo`.
pub fn kernel_tcp() -> Option<KernelTcp> {
    let text = fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let field = |name: &str| {
        words
            .iter()
            .position(|w| *w == name)
            .and_then(|i| words.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    let slab = fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("Slab:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    });
    Some(KernelTcp {
        inuse: field("inuse")?,
        time_wait: field("tw").unwrap_or(0),
        mem_bytes: field("mem")? * page,
        slab_bytes: slab.unwrap_or(0) * 1024,
    })
}

/// The machine a run happened on, as far as `/proc` tells.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Host name.
    pub hostname: String,
    /// Kernel release.
    pub kernel: String,
    /// CPU model name.
    pub cpu_model: String,
    /// Cores this process may run on.
    pub nr_cpus: usize,
    /// Total RAM, in bytes.
    pub mem_total_bytes: u64,
    /// Soft open-files limit of this process after raising it to the hard limit.
    pub nofile_limit: u64,
    /// A few kernel settings that bound connection counts.
    pub sysctl: BTreeMap<String, String>,
}

/// Collects [`Machine`].
pub fn machine() -> Machine {
    let read = |p: &str| {
        fs::read_to_string(p)
            .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    let cpu_model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_default();
    let mem_total_bytes = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024;
    let sysctl = [
        "net/ipv4/ip_local_port_range",
        "net/core/somaxconn",
        "net/ipv4/tcp_mem",
        "net/ipv4/tcp_rmem",
        "net/ipv4/tcp_wmem",
        "net/ipv4/tcp_tw_reuse",
        "fs/file-max",
        "fs/nr_open",
    ]
    .into_iter()
    .map(|k| (k.replace('/', "."), read(&format!("/proc/sys/{k}"))))
    .collect();
    Machine {
        hostname: read("/proc/sys/kernel/hostname"),
        kernel: read("/proc/sys/kernel/osrelease"),
        cpu_model,
        nr_cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        mem_total_bytes,
        nofile_limit: raise_nofile_limit(),
        sysctl,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let m = proc_memory(std::process::id()).unwrap();
        assert!(m.rss_bytes > 0);
        assert!(proc_cpu_secs(std::process::id()).is_some());
        assert!(kernel_tcp().is_some());
        assert!(mono_ns() > 0);
    }
}
