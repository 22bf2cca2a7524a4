//! Every scenario at small N against the real herald binary (and the peer contract against a
//! tiny in-test peer), asserting exact delivery counts, zero loss, zero reordering and zero
//! failures. No timing assertions.
//!
//! herald must be built first: `cargo build --bins` (the workspace's `scripts/test` does).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The herald binary beside this crate's binary in the workspace target dir.
fn herald_bin() -> PathBuf {
    let bench = Path::new(env!("CARGO_BIN_EXE_herald-bench"));
    let bin = bench
        .parent()
        .expect("the bench binary has a parent directory")
        .join("herald");
    assert!(
        bin.exists(),
        "{} is missing: build the server first with `cargo build --bins` (or `cargo build -p herald`)",
        bin.display()
    );
    bin
}

struct Run {
    dir: PathBuf,
}

impl Run {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("herald-bench-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("herald.toml"),
            r#"[server]
listen = "127.0.0.1:0"
api_listen = "127.0.0.1:0"
shards = 2
[limits]
handshakes_per_ip_per_sec = 0
connections_per_ip = 0
max_pending_handshakes_per_ip = 0
messages_per_conn_per_sec = 0
api_requests_per_key_per_sec = 0
[api]
admin_key = "test-admin-key-0123456789"
[log]
level = "warn"
[[projects]]
id = "bench"
[[projects.keys]]
kid = "k1"
alg = "HS256"
secret = "test-secret-0123456789abcdef"
"#,
        )
        .unwrap();
        Self { dir }
    }

    /// Runs `herald-bench <args> --spawn-herald .. --herald-config .. --json ..`; returns the JSON.
    fn herald(&self, args: &[&str]) -> Value {
        let cfg = self.dir.join("herald.toml");
        let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        full.extend([
            "--spawn-herald".into(),
            herald_bin().display().to_string(),
            "--herald-config".into(),
            cfg.display().to_string(),
            "--herald-log".into(),
            self.dir.join("herald.log").display().to_string(),
        ]);
        self.bench(&full)
    }

    fn bench(&self, args: &[String]) -> Value {
        let json = self.dir.join("out.json");
        let out = Command::new(env!("CARGO_BIN_EXE_herald-bench"))
            .args(args)
            .arg("--quiet")
            .arg("--json")
            .arg(&json)
            .output()
            .expect("running herald-bench");
        assert!(
            out.status.success(),
            "herald-bench {args:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&json).expect("the JSON output");
        serde_json::from_str(&text).expect("valid JSON output")
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn u(v: &Value, path: &str) -> u64 {
    let mut cur = v;
    for part in path.split('.') {
        cur = &cur[part];
    }
    cur.as_u64()
        .unwrap_or_else(|| panic!("{path} is not a number in {v:#}"))
}

fn empty(v: &Value, path: &str) {
    let mut cur = v;
    for part in path.split('.') {
        cur = &cur[part];
    }
    assert!(
        cur.as_object().is_some_and(|o| o.is_empty()),
        "{path} should be empty: {cur}"
    );
}

fn assert_clean(r: &Value, n: u64) {
    assert_eq!(u(r, "connect.attempted"), n, "{r:#}");
    assert_eq!(u(r, "connect.connected"), n, "{r:#}");
    empty(r, "connect.failures");
    empty(r, "held.closes");
    empty(r, "held.unexpected");
    assert_eq!(u(r, "held.open_at_end"), n);
    assert_eq!(
        r["problems"].as_array().map(Vec::len),
        Some(0),
        "{:#}",
        r["problems"]
    );
}

fn assert_delivered(r: &Value, n: u64, m: u64, publishes: u64) {
    assert_clean(r, n);
    assert_eq!(u(r, "publish.published"), publishes);
    assert_eq!(u(r, "publish.planned"), publishes);
    empty(r, "publish.failures");
    assert_eq!(u(r, "delivery.expected"), n * m);
    assert_eq!(u(r, "delivery.delivered"), n * m);
    assert_eq!(u(r, "delivery.lost_open"), 0);
    assert_eq!(u(r, "delivery.lost_closed"), 0);
    assert_eq!(u(r, "delivery.reordered"), 0);
    assert_eq!(u(r, "delivery.conns_with_loss"), 0);
    assert_eq!(u(r, "delivery.latency.count"), n * m);
    assert_eq!(u(r, "delivery.complete_publishes"), publishes);
    assert_eq!(u(r, "delivery.incomplete_publishes"), 0);
}

#[test]
fn hold_measures_the_server() {
    let run = Run::new("hold");
    let r = run.herald(&[
        "hold",
        "-n",
        "120",
        "--hold-secs",
        "1",
        "--settle-ms",
        "200",
    ]);
    assert_clean(&r, 120);
    assert_eq!(r["scenario"], "hold");
    assert!(u(&r, "memory.server_after.rss_bytes") > 0);
    assert!(r["memory"]["server_rss_per_conn_bytes"].is_number());
    assert!(u(&r, "memory.kernel_after.inuse") >= 120);
    assert_eq!(u(&r, "target.shards"), 2);
}

#[test]
fn broadcast_flat_out_across_worker_processes_and_sources() {
    let run = Run::new("broadcast");
    let md = run.dir.join("summary.md");
    let plots = run.dir.join("plots");
    let r = run.herald(&[
        "broadcast",
        "-n",
        "150",
        "-m",
        "6",
        "--workers",
        "2",
        "--source",
        "127.0.0.2-127.0.0.4",
        "--settle-ms",
        "100",
        "--markdown",
        md.to_str().unwrap(),
        "--plots",
        plots.to_str().unwrap(),
    ]);
    assert_delivered(&r, 150, 6, 6);
    assert_eq!(u(&r, "workers"), 2);
    assert_eq!(u(&r, "sources"), 3);
    let each = r["delivery"]["per_publish_completion_us"]
        .as_array()
        .unwrap();
    assert_eq!(each.len(), 6);
    assert!(each.iter().all(Value::is_number));
    let text = std::fs::read_to_string(&md).unwrap();
    assert!(text.contains("## Delivery"), "{text}");
    assert!(text.contains("broadcast-latency.svg"), "{text}");
    for name in ["latency", "completion", "connect"] {
        let svg = std::fs::read_to_string(plots.join(format!("broadcast-{name}.svg"))).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }
}

#[test]
fn broadcast_at_a_fixed_rate() {
    let run = Run::new("broadcast-rate");
    let r = run.herald(&[
        "broadcast",
        "-n",
        "60",
        "-m",
        "8",
        "--rate",
        "40",
        "--topic",
        "news",
        "--settle-ms",
        "100",
    ]);
    assert_delivered(&r, 60, 8, 8);
}

#[test]
fn groups_with_a_partial_last_group() {
    let run = Run::new("groups");
    // 105 connections in groups of 10: 11 groups, the last of 5.
    let r = run.herald(&[
        "groups",
        "-n",
        "105",
        "-m",
        "3",
        "--workers",
        "2",
        "--publishers",
        "3",
        "--settle-ms",
        "100",
    ]);
    assert_delivered(&r, 105, 3, 33);
}

#[test]
fn unicast_batched() {
    let run = Run::new("unicast");
    let r = run.herald(&[
        "unicast",
        "-n",
        "70",
        "-m",
        "3",
        "--batch",
        "8",
        "--publishers",
        "3",
        "--settle-ms",
        "100",
    ]);
    assert_delivered(&r, 70, 3, 210);
}

#[test]
fn churn_keeps_its_base_and_fails_nothing() {
    let run = Run::new("churn");
    let r = run.herald(&[
        "churn",
        "-n",
        "30",
        "--rate",
        "100",
        "--duration-secs",
        "2",
        "--hold-ms",
        "200",
        "--workers",
        "2",
        "--settle-ms",
        "100",
    ]);
    assert_clean(&r, 30);
    let attempted = u(&r, "load.attempted");
    assert!(attempted > 0);
    assert_eq!(u(&r, "load.succeeded"), attempted, "{:#}", r["load"]);
    assert_eq!(u(&r, "load.skipped"), 0);
    empty(&r, "load.failures");
    empty(&r, "load.early_closes");
}

#[test]
fn handshake_hs256() {
    let run = Run::new("handshake");
    let r = run.herald(&[
        "handshake",
        "--alg",
        "HS256",
        "--concurrency",
        "8",
        "--duration-secs",
        "1",
        "--token-pool",
        "50",
    ]);
    let attempted = u(&r, "load.attempted");
    assert!(attempted > 0);
    assert_eq!(u(&r, "load.succeeded"), attempted, "{:#}", r["load"]);
    empty(&r, "load.failures");
    assert_eq!(u(&r, "load.latency.count"), attempted);
}

#[test]
fn refusals_are_counted_by_reason() {
    let run = Run::new("refused");
    let r = run.herald(&[
        "hold",
        "-n",
        "12",
        "--hold-secs",
        "0",
        "--settle-ms",
        "0",
        "--secret",
        "not-the-secret-of-this-project",
    ]);
    assert_eq!(u(&r, "connect.connected"), 0);
    assert_eq!(u(&r, "connect.failures.http_401"), 12, "{:#}", r["connect"]);
    assert_eq!(r["problems"].as_array().map(Vec::len), Some(1));
}

/// A minimal peer speaking the common contract: `GET /ws?topic=T[&topic=U]` subscribes on
/// connect; `POST /publish?topic=T` sends the body to each subscriber of T as a text frame.
mod peer {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

    type Subs = Arc<Mutex<HashMap<String, Vec<mpsc::UnboundedSender<String>>>>>;

    fn topics(query: &str) -> Vec<String> {
        query
            .split('&')
            .filter_map(|kv| kv.strip_prefix("topic="))
            .map(|t| t.replace("%3A", ":").replace("%2A", "*"))
            .collect()
    }

    async fn publish(mut s: TcpStream, mut buf: Vec<u8>, subs: Subs) {
        loop {
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                let mut chunk = [0u8; 4096];
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 4096];
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let query = path.split_once('?').map(|(_, q)| q).unwrap_or("");
            for t in topics(query) {
                if let Some(list) = subs.lock().unwrap().get(&t) {
                    for tx in list {
                        let _ = tx.send(body.clone());
                    }
                }
            }
            buf.drain(..end + 4 + len);
            if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                .await
                .is_err()
            {
                return;
            }
        }
    }

    // The callback's signature is tungstenite's (`Result<Response, ErrorResponse>`).
    #[allow(clippy::result_large_err)]
    async fn serve(s: TcpStream, subs: Subs) {
        let mut first = vec![0u8; 8];
        let Ok(n) = s.peek(&mut first).await else {
            return;
        };
        if first[..n].starts_with(b"POST") {
            return publish(s, Vec::new(), subs).await;
        }
        let mut query = String::new();
        let Ok(ws) = tokio_tungstenite::accept_hdr_async(s, |req: &Request, resp: Response| {
            query = req.uri().query().unwrap_or("").to_owned();
            Ok(resp)
        })
        .await
        else {
            return;
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        for t in topics(&query) {
            subs.lock().unwrap().entry(t).or_default().push(tx.clone());
        }
        drop(tx);
        let (mut sink, mut stream) = ws.split();
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(text) => if sink.send(Message::text(text)).await.is_err() { return },
                    None => return,
                },
                m = stream.next() => match m {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    _ => {}
                },
            }
        }
    }

    /// Starts the peer on a free loopback port in a background thread; returns its address.
    pub fn start() -> std::net::SocketAddr {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(l.local_addr().unwrap()).unwrap();
                let subs = Subs::default();
                loop {
                    let Ok((s, _)) = l.accept().await else {
                        continue;
                    };
                    tokio::spawn(serve(s, subs.clone()));
                }
            });
        });
        rx.recv().unwrap()
    }
}

#[test]
fn peer_contract_broadcast_and_groups() {
    let addr = peer::start();
    let run = Run::new("peer");
    let url = format!("ws://{addr}");
    let b = run.bench(
        &[
            "broadcast",
            "--target",
            "peer",
            "--url",
            &url,
            "-n",
            "40",
            "-m",
            "4",
            "--settle-ms",
            "100",
        ]
        .map(String::from),
    );
    assert_delivered(&b, 40, 4, 4);
    assert_eq!(b["target"]["kind"], "peer");
    let g = run.bench(
        &[
            "groups",
            "--target",
            "peer",
            "--url",
            &url,
            "-n",
            "25",
            "-m",
            "2",
            "--settle-ms",
            "100",
        ]
        .map(String::from),
    );
    assert_delivered(&g, 25, 2, 6);
}
