//! The sd_notify handshake against a real Unix datagram socket passed as `NOTIFY_SOCKET`:
//! `READY=1` once the node serves, `WATCHDOG=1` repeatedly while the shards tick, `RELOADING=1`
//! then `READY=1` around SIGHUP, and `STOPPING=1` on SIGTERM, then exit 0.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::{HeraldProcess, TempDir};

/// Receives datagrams until one contains `line` (as a whole line) or `deadline` passes;
/// returns every datagram seen, the matching one last.
fn recv_until(sock: &UnixDatagram, line: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let hit = msg.lines().any(|l| l == line);
                seen.push(msg);
                if hit {
                    return seen;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("recv: {e}"),
        }
    }
    panic!("no `{line}` within {within:?}; got {seen:?}");
}

fn has_line(msgs: &[String], line: &str) -> usize {
    msgs.iter().filter(|m| m.lines().any(|l| l == line)).count()
}

#[test]
fn ready_watchdog_reload_stopping() {
    let dir = TempDir::new("notify");
    let sock_path = dir.0.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let config = format!(
        r#"[server]
shards = 2
pin_cores = false
drain_timeout_ms = 1000
state_dir = "{state}"

[ws]
heartbeat_interval_ms = 1000

[api]
admin_key = "notify-test-admin-key-0123456789abcdef"

[log]
level = "info"

[[projects]]
id = "shop"
api_key = "notify-test-api-key-0123456789abcdef"

[[projects.keys]]
kid = "k1"
alg = "HS256"
secret = "notify-test-secret-0123456789abcdef0123"
"#,
        state = dir.0.join("state").display(),
    );
    let (mut server, ready) = HeraldProcess::start(
        &dir,
        &config,
        &[
            ("NOTIFY_SOCKET", sock_path.as_os_str()),
            ("WATCHDOG_USEC", "200000".as_ref()),
        ],
    );

    let first = recv_until(&sock, "READY=1", Duration::from_secs(20));
    assert_eq!(
        has_line(&first, "WATCHDOG=1"),
        0,
        "a watchdog ping before READY=1: {first:?}"
    );
    assert!(
        first.last().unwrap().contains("STATUS="),
        "READY=1 carries a status: {first:?}"
    );

    // Pings every 100 ms while both shards tick (every 125 ms): several within 1.5 s.
    let start = Instant::now();
    let mut pings = 0;
    let mut buf = [0u8; 4096];
    while start.elapsed() < Duration::from_millis(1500) {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            pings += usize::from(msg.lines().any(|l| l == "WATCHDOG=1"));
        }
    }
    assert!(pings >= 3, "expected several WATCHDOG=1, got {pings}");

    server.signal(libc::SIGHUP);
    let reload = recv_until(&sock, "RELOADING=1", Duration::from_secs(10));
    let reloading = reload.last().unwrap();
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "RELOADING=1 carries MONOTONIC_USEC: {reloading:?}"
    );
    recv_until(&sock, "READY=1", Duration::from_secs(10));

    server.signal(libc::SIGTERM);
    recv_until(&sock, "STOPPING=1", Duration::from_secs(10));
    let status = server.wait(Duration::from_secs(15));
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(
        ready.line["event"], "ready",
        "ready line on stdout: {}",
        ready.line
    );
}
