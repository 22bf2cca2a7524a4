//! Server memory per idle authenticated connection (results: `docs/capacity.md`).
//!
//! Starts the real `herald` binary (the one cargo builds for this bench, release profile) as a
//! separate process with 2 shards and a one-hour heartbeat, then:
//!
//! 1. samples the server at rest (the *raw* baseline);
//! 2. opens `--warmup` authenticated connections, closes them, waits until the server has
//!    dropped them, and samples again (the *warmed* baseline: the shard scratch buffers, the
//!    allocator's first pages, the topic index for `all` and the slabs have been touched once);
//! 3. opens connections up to `--first` (default N/3), lets them idle, samples;
//! 4. opens more up to `--connections` (N), lets them idle, samples.
//!
//! Every connection is `GET /ws/bench` with its own `sub` (so it holds two subscriptions: `all`
//! and `user.<sub>`) from one of 127.0.0.2..=127.0.0.9, and reads its welcome frame. Bytes per
//! connection are RSS deltas divided by connection counts; the slope between the two points
//! cancels every fixed cost. Kernel memory (`/proc/net/sockstat` TCP pages, `/proc/meminfo`
//! slab) is reported separately: on loopback it covers both ends of each connection.
//!
//! The whole sequence runs twice, in two server processes: with `MIMALLOC_ALLOW_THP=0` (4 KiB
//! pages: RSS follows the bytes touched) and with mimalloc's default, which madvises its arenas
//! for transparent huge pages so RSS moves in 2 MiB steps.
//!
//! ```text
//! cargo bench --bench idle_memory -- --connections 15000
//! ```
//!
//! Options: `--connections N` (default 15000), `--first N` (default N/3), `--warmup N`
//! (default 500), `--idle-secs S` (default 3), `--shards N` (default 2), `--threads N`
//! (client threads, default 8), `--io-driver auto|legacy`, `--thp both|off|default` (default
//! both), `--server PATH` (another herald binary; default: the one cargo built, i.e.
//! `target/release/herald`). Both processes hold one descriptor per connection, so N must stay
//! under the open-files limit (minus 100). Output: markdown tables, then one JSON line.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use herald::auth::Claims;
use herald::pubsub::Sub;
use herald::ws::conn::{Conn, Identity};
use herald::ws::session::Session;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use socket2::{Domain, Protocol, Socket, Type};

const PROJECT: &str = "bench";
const KID: &str = "k1";
/// Source addresses 127.0.0.2 .. 127.0.0.(1 + SOURCE_IPS): each has its own ephemeral ports.
const SOURCE_IPS: usize = 8;
/// Descriptors the bench needs besides its connections.
const FD_SLACK: u64 = 100;

struct Opts {
    connections: usize,
    first: usize,
    warmup: usize,
    idle: Duration,
    shards: usize,
    threads: usize,
    io_driver: String,
    thp: Vec<Thp>,
    server: PathBuf,
}

fn usage() -> &'static str {
    "usage: cargo bench --bench idle_memory -- [--connections N] [--first N] [--warmup N] \
     [--idle-secs S] [--shards N] [--threads N] [--io-driver auto|legacy] [--thp both|off|default] [--server PATH]"
}

fn parse_opts() -> Result<Opts, String> {
    let mut o = Opts {
        connections: 15_000,
        first: 0,
        warmup: 500,
        idle: Duration::from_secs(3),
        shards: 2,
        threads: 8,
        io_driver: "auto".into(),
        thp: vec![Thp::Off, Thp::Default],
        server: PathBuf::from(env!("CARGO_BIN_EXE_herald")),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        // cargo appends `--bench` when it runs a bench target.
        if a == "--bench" {
            continue;
        }
        if a == "--help" || a == "-h" {
            return Err(usage().into());
        }
        let v = args
            .next()
            .ok_or_else(|| format!("{a} needs a value\n{}", usage()))?;
        let num = || {
            v.parse::<usize>()
                .map_err(|_| format!("{a}: `{v}` is not a number"))
        };
        match a.as_str() {
            "--connections" => o.connections = num()?,
            "--first" => o.first = num()?,
            "--warmup" => o.warmup = num()?,
            "--idle-secs" => o.idle = Duration::from_secs(num()? as u64),
            "--shards" => o.shards = num()?,
            "--threads" => o.threads = num()?.max(1),
            "--server" => o.server = PathBuf::from(&v),
            "--io-driver" => o.io_driver = v,
            "--thp" => {
                o.thp = match v.as_str() {
                    "off" => vec![Thp::Off],
                    "default" => vec![Thp::Default],
                    "both" => vec![Thp::Off, Thp::Default],
                    _ => return Err(format!("--thp: `{v}` is not off, default or both")),
                }
            }
            _ => return Err(format!("unknown option {a}\n{}", usage())),
        }
    }
    if o.first == 0 {
        o.first = o.connections / 3;
    }
    if o.first == 0 || o.first >= o.connections {
        return Err(format!(
            "need 0 < --first ({}) < --connections ({})",
            o.first, o.connections
        ));
    }
    Ok(o)
}

/// Raises the soft open-files limit to the hard one and checks that N connections fit.
fn check_fd_limit(n: usize) -> Result<u64, String> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(format!("getrlimit: {}", std::io::Error::last_os_error()));
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: lim is a valid rlimit; failure leaves the old limit.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
        // SAFETY: as above.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    }
    if n as u64 + FD_SLACK > lim.rlim_cur {
        return Err(format!(
            "--connections {n} needs {} open files per process but the limit is {}",
            n as u64 + FD_SLACK,
            lim.rlim_cur
        ));
    }
    Ok(lim.rlim_cur)
}

/// The server process; killed and its temp dir removed on drop.
struct Server {
    child: Child,
    pid: u32,
    listen: SocketAddr,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_server(o: &Opts, secret: &str, thp: Thp) -> Result<Server, String> {
    if !o.server.exists() {
        return Err(format!(
            "{} not found: run `cargo build --release` first",
            o.server.display()
        ));
    }
    let dir = std::env::temp_dir().join(format!(
        "herald-idle-memory-{}-{}",
        std::process::id(),
        thp.key()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let config = dir.join("herald.toml");
    let text = format!(
        r#"[server]
listen = "127.0.0.1:0"
api_listen = "127.0.0.1:0"
shards = {shards}
io_driver = "{driver}"

[ws]
# 30 minutes (the most herald allows): no heartbeat ping touches an idle connection during the run.
heartbeat_interval_ms = 1800000

[limits]
# A benchmark opens thousands of connections from a few addresses: no per-IP handshake limit.
handshakes_per_ip_per_sec = 0
connections_per_ip = 0
max_pending_handshakes_per_ip = 0
messages_per_conn_per_sec = 0
api_requests_per_key_per_sec = 0

[log]
level = "warn"

[[projects]]
id = "{PROJECT}"

[[projects.keys]]
kid = "{KID}"
alg = "HS256"
secret = "{secret}"
"#,
        shards = o.shards,
        driver = o.io_driver,
    );
    std::fs::write(&config, text).map_err(|e| format!("{}: {e}", config.display()))?;
    let log = std::fs::File::create(dir.join("stderr.log")).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&o.server);
    match thp {
        Thp::Default => cmd.env_remove("MIMALLOC_ALLOW_THP"),
        Thp::Off => cmd.env("MIMALLOC_ALLOW_THP", "0"),
    };
    let mut child = cmd
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", o.server.display()))?;
    let pid = child.id();
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Forward the first line, then keep draining so the server never blocks on stdout.
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(tx) = tx.take() {
                let _ = tx.send(line);
            }
        }
    });
    let mut server = Server {
        child,
        pid,
        listen: "0.0.0.0:0".parse().expect("literal"),
        dir,
    };
    let line = rx.recv_timeout(Duration::from_secs(60)).map_err(|_| {
        let log = std::fs::read_to_string(server.dir.join("stderr.log")).unwrap_or_default();
        format!("no ready line from the server within 60 s; its stderr:\n{log}")
    })?;
    let ready: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| format!("bad ready line `{line}`: {e}"))?;
    if ready["event"] != "ready" {
        return Err(format!("unexpected first line `{line}`"));
    }
    server.listen = ready["listen"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no listen address in `{line}`"))?;
    Ok(server)
}

/// What one sample reads: the server's memory and descriptors, and the kernel's TCP memory.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    conns: usize,
    vm_rss_kib: u64,
    rss_anon_kib: u64,
    rss_file_kib: u64,
    anon_huge_kib: u64,
    fds: usize,
    tcp_inuse: u64,
    tcp_mem_pages: u64,
    slab_kib: u64,
}

fn status_fields(pid: u32) -> Result<HashMap<String, u64>, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e} (did the server die?)"))?;
    Ok(kib_fields(&text))
}

/// `Name:   123 kB` lines of a /proc file.
fn kib_fields(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let v = v.trim().strip_suffix(" kB")?.trim().parse().ok()?;
            Some((k.to_owned(), v))
        })
        .collect()
}

/// `TCP: inuse X orphan X tw X alloc X mem X` from /proc/net/sockstat.
fn sockstat_tcp() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("TCP:")) else {
        return (0, 0);
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    let field = |name: &str| {
        words
            .iter()
            .position(|w| *w == name)
            .and_then(|i| words.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("inuse"), field("mem"))
}

fn sample(server: &Server, conns: usize) -> Result<Sample, String> {
    let st = status_fields(server.pid)?;
    let rollup = kib_fields(
        &std::fs::read_to_string(format!("/proc/{}/smaps_rollup", server.pid)).unwrap_or_default(),
    );
    let meminfo = kib_fields(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default());
    let fds = std::fs::read_dir(format!("/proc/{}/fd", server.pid))
        .map(|d| d.count())
        .unwrap_or(0);
    let (tcp_inuse, tcp_mem_pages) = sockstat_tcp();
    Ok(Sample {
        conns,
        vm_rss_kib: st.get("VmRSS").copied().unwrap_or(0),
        rss_anon_kib: st.get("RssAnon").copied().unwrap_or(0),
        rss_file_kib: st.get("RssFile").copied().unwrap_or(0),
        anon_huge_kib: rollup.get("AnonHugePages").copied().unwrap_or(0),
        fds,
        tcp_inuse,
        tcp_mem_pages,
        slab_kib: meminfo.get("Slab").copied().unwrap_or(0),
    })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn token(key: &EncodingKey, sub: String) -> Result<String, String> {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(KID.into());
    let claims = Claims {
        sub,
        exp: Some(now_secs() + 24 * 3600),
        topics: None,
        device: None,
    };
    jsonwebtoken::encode(&header, &claims, key).map_err(|e| format!("minting a token: {e}"))
}

/// One authenticated connection from `src`: the upgrade, the 101, the welcome frame.
fn open_one(server: SocketAddr, src: Ipv4Addr, jwt: &str) -> Result<TcpStream, String> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| format!("socket: {e}"))?;
    sock.bind(&SocketAddr::from((src, 0)).into())
        .map_err(|e| format!("bind {src}: {e}"))?;
    sock.connect_timeout(&server.into(), Duration::from_secs(10))
        .map_err(|e| format!("connect {server} from {src}: {e}"))?;
    let mut s: TcpStream = sock.into();
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .map_err(|e| e.to_string())?;
    let req = format!(
        "GET /ws/{PROJECT} HTTP/1.1\r\nHost: {server}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {jwt}\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("sending the upgrade: {e}"))?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = s
            .read(&mut chunk)
            .map_err(|e| format!("reading the answer: {e}"))?;
        if n == 0 {
            return Err(format!(
                "server closed the connection; got: {}",
                String::from_utf8_lossy(&buf)
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        if !buf.starts_with(b"HTTP/1.1 101") {
            return Err(format!("refused: {}", String::from_utf8_lossy(&buf)));
        }
        if let Some(payload) = text_frame(&buf[end + 4..]) {
            if !payload.windows(9).any(|w| w == b"\"welcome\"") {
                return Err(format!(
                    "first frame is not a welcome: {}",
                    String::from_utf8_lossy(payload)
                ));
            }
            s.set_read_timeout(None).map_err(|e| e.to_string())?;
            return Ok(s);
        }
    }
}

/// The payload of a complete unmasked server text frame at the start of `b`, if complete.
fn text_frame(b: &[u8]) -> Option<&[u8]> {
    if b.len() < 2 {
        return None;
    }
    let (len, start) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    b.get(start..start + len)
}

/// Opens connections `from..to` (sub `<prefix><i>`) on `threads` threads.
fn open_many(
    server: SocketAddr,
    key: &EncodingKey,
    prefix: &str,
    from: usize,
    to: usize,
    threads: usize,
) -> Result<Vec<TcpStream>, String> {
    let per = (to - from).div_ceil(threads).max(1);
    let results: Vec<Result<Vec<TcpStream>, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (from..to)
            .step_by(per)
            .map(|start| {
                let end = (start + per).min(to);
                scope.spawn(move || {
                    let mut out = Vec::with_capacity(end - start);
                    for i in start..end {
                        let src = Ipv4Addr::new(127, 0, 0, 2 + (i % SOURCE_IPS) as u8);
                        let jwt = token(key, format!("{prefix}{i:07}"))?;
                        out.push(open_one(server, src, &jwt).map_err(|e| format!("#{i}: {e}"))?);
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("client thread panicked".into()))
            })
            .collect()
    });
    let mut all = Vec::with_capacity(to - from);
    for r in results {
        all.extend(r?);
    }
    Ok(all)
}

/// Waits until the server holds at most `fds` descriptors (closed connections removed).
fn wait_for_fds(server: &Server, fds: usize) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = std::fs::read_dir(format!("/proc/{}/fd", server.pid))
            .map_err(|e| format!("server gone: {e}"))?
            .count();
        if now <= fds {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "server still holds {now} descriptors (want {fds}) 30 s after the close"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How many connections are still open (no EOF, no error) without consuming anything.
fn count_alive(streams: &[TcpStream]) -> usize {
    let mut byte = [0u8; 1];
    streams
        .iter()
        .filter(|s| {
            s.set_nonblocking(true).is_ok()
                && match s.peek(&mut byte) {
                    Ok(n) => n > 0,
                    Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                }
        })
        .count()
}

/// Bytes per connection between two samples, from a field in bytes.
fn per_conn(a: &Sample, b: &Sample, bytes: impl Fn(&Sample) -> u64) -> f64 {
    let n = b.conns.abs_diff(a.conns).max(1) as f64;
    (bytes(b) as f64 - bytes(a) as f64) / n
}

fn type_sizes() -> Vec<(&'static str, usize)> {
    use std::mem::size_of;
    vec![
        (
            "Conn (the slab entry: a connection has no task)",
            size_of::<Conn>(),
        ),
        ("Identity (boxed)", size_of::<Identity>()),
        ("Session", size_of::<Session>()),
        ("Sub", size_of::<Sub>()),
        (
            "Rc<RefCell<Shard>>",
            size_of::<Rc<RefCell<herald::shard::Shard>>>(),
        ),
    ]
}

/// Allocator mode of one measured server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Thp {
    /// mimalloc's default: arenas are `madvise(MADV_HUGEPAGE)`d, so RSS moves in 2 MiB steps.
    Default,
    /// `MIMALLOC_ALLOW_THP=0`: 4 KiB pages, so RSS follows the bytes actually touched.
    Off,
}

impl Thp {
    fn label(self) -> &'static str {
        match self {
            Thp::Default => "mimalloc default (transparent huge pages allowed)",
            Thp::Off => "MIMALLOC_ALLOW_THP=0 (4 KiB pages)",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Thp::Default => "thp_default",
            Thp::Off => "thp_off",
        }
    }
}

/// The samples of one server run.
struct Run {
    thp: Thp,
    driver: String,
    raw: Sample,
    warmed: Sample,
    p1: Sample,
    p2: Sample,
}

fn measure(o: &Opts, thp: Thp) -> Result<Run, String> {
    let secret = herald::config::random_secret();
    let key = EncodingKey::from_secret(secret.as_bytes());
    let server = start_server(o, &secret, thp)?;
    eprintln!(
        "[{}] server pid {} on {} ({} shards)",
        thp.key(),
        server.pid,
        server.listen,
        o.shards
    );
    std::thread::sleep(Duration::from_secs(1));
    let raw = sample(&server, 0)?;

    let t = Instant::now();
    let warm = open_many(server.listen, &key, "w", 0, o.warmup, o.threads)?;
    std::thread::sleep(Duration::from_secs(1));
    drop(warm);
    wait_for_fds(&server, raw.fds)?;
    std::thread::sleep(Duration::from_secs(1));
    let warmed = sample(&server, 0)?;
    eprintln!(
        "[{}] warm-up: {} opened and closed in {:.1?}",
        thp.key(),
        o.warmup,
        t.elapsed()
    );

    let mut streams = Vec::with_capacity(o.connections);
    let mut points = Vec::new();
    for target in [o.first, o.connections] {
        let t = Instant::now();
        let from = streams.len();
        streams.extend(open_many(
            server.listen,
            &key,
            "u",
            from,
            target,
            o.threads,
        )?);
        let took = t.elapsed();
        eprintln!(
            "[{}] {target} connections open ({} new in {took:.1?}, {:.0}/s); idling {:?}",
            thp.key(),
            target - from,
            (target - from) as f64 / took.as_secs_f64(),
            o.idle
        );
        std::thread::sleep(o.idle);
        points.push(sample(&server, target)?);
    }
    let alive = count_alive(&streams);
    let fds_ok = points[1].fds >= raw.fds + o.connections;
    if alive != o.connections || !fds_ok {
        return Err(format!(
            "only {alive} of {} connections alive at the end (server fds {}, baseline {})",
            o.connections, points[1].fds, raw.fds
        ));
    }
    let log = std::fs::read_to_string(server.dir.join("stderr.log")).unwrap_or_default();
    let driver = if o.io_driver == "legacy" {
        "epoll (io_driver = legacy)"
    } else if log.contains("io_uring is not available") {
        "epoll (io_uring unavailable, fallback)"
    } else {
        "io_uring"
    };
    drop(streams);
    drop(server);
    Ok(Run {
        thp,
        driver: driver.into(),
        raw,
        warmed,
        p1: points[0],
        p2: points[1],
    })
}

fn page_bytes() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as u64 } else { 4096 }
}

/// Prints the tables of one run and returns its JSON.
fn report(run: &Run) -> serde_json::Value {
    let rss = |s: &Sample| s.vm_rss_kib * 1024;
    let anon = |s: &Sample| s.rss_anon_kib * 1024;
    let page = page_bytes();
    let tcp = |s: &Sample| s.tcp_mem_pages * page;
    let slab = |s: &Sample| s.slab_kib * 1024;
    let (raw, warmed, p1, p2) = (&run.raw, &run.warmed, &run.p1, &run.p2);

    println!("\n### {} — driver {}\n", run.thp.label(), run.driver);
    println!(
        "| point | connections | VmRSS KiB | RssAnon KiB | RssFile KiB | AnonHuge KiB | \
         server fds | TCP sockets (all) | TCP mem pages | kernel Slab KiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let rows = [
        ("raw baseline", raw),
        ("warmed baseline", warmed),
        ("first point", p1),
        ("second point", p2),
    ];
    for (name, s) in rows {
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.conns,
            s.vm_rss_kib,
            s.rss_anon_kib,
            s.rss_file_kib,
            s.anon_huge_kib,
            s.fds,
            s.tcp_inuse,
            s.tcp_mem_pages,
            s.slab_kib
        );
    }
    let figures = [
        ("vs raw baseline", raw, p1),
        ("vs raw baseline", raw, p2),
        ("vs warmed baseline", warmed, p1),
        ("vs warmed baseline", warmed, p2),
        ("slope", p1, p2),
    ];
    println!("\n| user space, bytes per connection | connections | VmRSS | RssAnon |");
    println!("|---|---:|---:|---:|");
    let mut user = Vec::new();
    for (what, a, b) in figures {
        let (r, an) = (per_conn(a, b, rss), per_conn(a, b, anon));
        let n = if a.conns > 0 {
            format!("{} → {}", a.conns, b.conns)
        } else {
            b.conns.to_string()
        };
        println!("| {what} | {n} | {r:.0} | {an:.0} |");
        user.push(json!({"figure": what, "from": a.conns, "to": b.conns,
            "vm_rss_bytes_per_conn": r.round(), "rss_anon_bytes_per_conn": an.round()}));
    }
    let tcp_slope = per_conn(p1, p2, tcp);
    let tcp_warm = per_conn(warmed, p2, tcp);
    let slab_slope = per_conn(p1, p2, slab);
    let slab_warm = per_conn(warmed, p2, slab);
    println!("\n| kernel, bytes per connection (both loopback ends) | vs warmed | slope |");
    println!("|---|---:|---:|");
    println!("| TCP buffers (sockstat `mem` pages) | {tcp_warm:.0} | {tcp_slope:.0} |");
    println!("| slab (meminfo `Slab`, machine-wide) | {slab_warm:.0} | {slab_slope:.0} |");
    let samples: Vec<_> = rows
        .iter()
        .map(|(name, s)| {
            json!({"point": name, "connections": s.conns, "vm_rss_kib": s.vm_rss_kib,
                "rss_anon_kib": s.rss_anon_kib, "rss_file_kib": s.rss_file_kib,
                "anon_huge_kib": s.anon_huge_kib, "fds": s.fds,
                "tcp_inuse": s.tcp_inuse, "tcp_mem_pages": s.tcp_mem_pages,
                "slab_kib": s.slab_kib})
        })
        .collect();
    json!({
        "allocator": run.thp.key(),
        "driver": run.driver,
        "samples": samples,
        "user_space": user,
        "kernel": {
            "tcp_mem_bytes_per_conn": tcp_warm.round(),
            "tcp_mem_bytes_per_conn_slope": tcp_slope.round(),
            "slab_bytes_per_conn": slab_warm.round(),
            "slab_bytes_per_conn_slope": slab_slope.round(),
        },
    })
}

fn run(o: &Opts) -> Result<(), String> {
    let limit = check_fd_limit(o.connections)?;
    eprintln!("open-files limit {limit}");
    let mut runs = Vec::new();
    for thp in o.thp.clone() {
        runs.push(measure(o, thp)?);
    }
    println!(
        "\n## herald idle connection memory: {} shards, warm-up {}, idle {:?}\n",
        o.shards, o.warmup, o.idle
    );
    println!("Each connection holds `all` and `user.<sub>`; RSS is the server process's only.");
    let results: Vec<_> = runs.iter().map(report).collect();
    let sizes = type_sizes();
    println!("\n| type (this build) | size_of, bytes |");
    println!("|---|---:|");
    for (name, size) in &sizes {
        println!("| {name} | {size} |");
    }
    let sizes: serde_json::Map<_, _> = sizes
        .iter()
        .map(|(n, s)| ((*n).to_owned(), json!(s)))
        .collect();
    println!(
        "\n{}",
        json!({
            "bench": "idle_memory",
            "shards": o.shards,
            "first": o.first,
            "connections": o.connections,
            "warmup": o.warmup,
            "idle_secs": o.idle.as_secs(),
            "page_bytes": page_bytes(),
            "runs": results,
            "type_sizes": sizes,
        })
    );
    Ok(())
}

fn main() -> ExitCode {
    let opts = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("idle_memory: {e}");
            ExitCode::FAILURE
        }
    }
}
