//! systemd service notifications (`sd_notify(3)`), for `Type=notify` units.
//!
//! - `READY=1` once every shard listens and the API is up;
//! - `RELOADING=1` (with `MONOTONIC_USEC`) then `READY=1` around a SIGHUP reload; a refused
//!   reload's `READY=1` carries `STATUS=reload refused, …` and `ERRNO=22`;
//! - `STOPPING=1` when a drain starts;
//! - `WATCHDOG=1` every half `WATCHDOG_USEC`, **only while every shard is responsive**: each
//!   shard's sweep tick bumps its own `ShardStats::sweeps` counter, and the watchdog thread
//!   pings only if every counter advanced within the stall window. A shard stuck in a busy
//!   loop or a blocking call stops the pings, and systemd restarts the node after
//!   `WatchdogSec`.
//!
//! Without `NOTIFY_SOCKET` (not under systemd) every call is a no-op. Errors are logged, never
//! fatal: a supervisor that cannot be told is not a reason to stop serving.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tracing::{debug, info, warn};

use crate::hub::{Hub, Phase};

fn send(states: &[NotifyState]) {
    // `false`: never unset the environment (set_var/remove_var are unsound once threads run).
    if let Err(e) = sd_notify::notify(false, states) {
        warn!("sd_notify failed: {e}");
    }
}

/// True when a service manager listens (`NOTIFY_SOCKET` is set).
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty())
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `RELOADING=1` with `MONOTONIC_USEC` (what `Type=notify-reload` expects; harmless otherwise).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("reloading"),
        ]),
        Err(_) => send(&[NotifyState::Reloading, NotifyState::Status("reloading")]),
    }
}

/// Closes a refused reload: `READY=1` (the node serves on, with its old settings) with
/// `STATUS=reload refused: …` and `ERRNO=22` (EINVAL), so `systemctl status` shows that the
/// new file was not applied instead of a successful reload. A later successful reload sends
/// `ERRNO=0`.
pub fn reload_refused(reason: &str) {
    let status = format!("reload refused, old settings stay: {}", one_line(reason));
    send(&[
        NotifyState::Ready,
        NotifyState::Status(&status),
        NotifyState::Errno(libc::EINVAL as u32),
    ]);
}

/// Closes a successful reload: `READY=1`, a status line and `ERRNO=0` (clears a refusal).
pub fn reloaded(status: &str) {
    send(&[
        NotifyState::Ready,
        NotifyState::Status(status),
        NotifyState::Errno(0),
    ]);
}

/// A status value is one line of the notification datagram.
fn one_line(text: &str) -> String {
    text.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// `STOPPING=1` with a status line.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// The watchdog period asked by systemd: `WATCHDOG_USEC`, when `WATCHDOG_PID` is unset or is
/// this process (as `sd_watchdog_enabled(3)`).
pub fn watchdog_usec() -> Option<Duration> {
    if !enabled() {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.trim().parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    Some(Duration::from_micros(usec))
}

/// How long a shard may go without a sweep tick before it counts as stalled: three ticks, and
/// never less than one ping period.
pub fn stall_window(tick: Duration, period: Duration) -> Duration {
    (tick * 3).max(period)
}

/// Starts the watchdog thread when systemd asked for one (`WATCHDOG_USEC`). `tick` is the
/// shards' sweep period. The thread ends when the node is stopped.
pub fn spawn_watchdog(hub: Arc<Hub>, tick: Duration) {
    let Some(usec) = watchdog_usec() else { return };
    let period = usec / 2;
    let window = stall_window(tick, period);
    if window >= usec {
        warn!(
            watchdog_ms = usec.as_millis() as u64,
            sweep_tick_ms = tick.as_millis() as u64,
            "WatchdogSec is too short for the shards' sweep tick: a stalled shard would be \
             noticed only after the watchdog fires anyway; use WatchdogSec >= 10 s"
        );
    }
    info!(
        period_ms = period.as_millis() as u64,
        stall_window_ms = window.as_millis() as u64,
        "systemd watchdog enabled"
    );
    let spawned = std::thread::Builder::new()
        .name("herald-watchdog".into())
        .spawn(move || watchdog_loop(&hub, period, window));
    if let Err(e) = spawned {
        warn!("cannot start the watchdog thread: {e}");
    }
}

fn watchdog_loop(hub: &Hub, period: Duration, window: Duration) {
    let sweeps = |i: usize| {
        hub.stats[i]
            .sweeps
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let n = hub.nr_shards();
    let start = Instant::now();
    let mut last: Vec<u64> = (0..n).map(sweeps).collect();
    let mut advanced_at = vec![start; n];
    let mut stalled_reported = false;
    loop {
        std::thread::sleep(period);
        let now = Instant::now();
        for (i, (l, at)) in last.iter_mut().zip(advanced_at.iter_mut()).enumerate() {
            let v = sweeps(i);
            if v != *l {
                *l = v;
                *at = now;
            }
        }
        match hub.phase() {
            Phase::Stopped => return,
            // A drain has its own deadline (server.drain_timeout_ms) and shards finish one by
            // one; TimeoutStopSec is the backstop there.
            Phase::Draining => send(&[NotifyState::Watchdog]),
            Phase::Starting | Phase::Running => {
                let stalled: Vec<usize> = (0..n)
                    .filter(|&i| now.duration_since(advanced_at[i]) > window)
                    .collect();
                if stalled.is_empty() {
                    if stalled_reported {
                        info!("every shard is responsive again; watchdog pings resumed");
                        stalled_reported = false;
                    }
                    debug!("WATCHDOG=1");
                    send(&[NotifyState::Watchdog]);
                } else if !stalled_reported {
                    warn!(
                        ?stalled,
                        window_ms = window.as_millis() as u64,
                        "shard(s) made no sweep tick within the window: withholding the \
                         watchdog ping (systemd restarts the node after WatchdogSec)"
                    );
                    stalled_reported = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stall_window_is_at_least_one_period() {
        let w = stall_window(Duration::from_millis(125), Duration::from_millis(100));
        assert_eq!(w, Duration::from_millis(375));
        let w = stall_window(Duration::from_millis(20), Duration::from_secs(15));
        assert_eq!(w, Duration::from_secs(15));
    }
}
