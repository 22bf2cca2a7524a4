//! Shared helpers of the integration tests.
//!
//! - [`TestServer`]: the real server in-process on port 0 (two projects, `shop` and `blog`),
//!   shut down and joined on drop.
//! - [`mint`]: tokens signed with the `jsonwebtoken` crate directly, an independent path from
//!   the server's own minting.
//! - [`connect`] and friends: a real tungstenite client over a std `TcpStream`.
//! - [`RawClient`]: hand-made frames (masked or not) and the server's frames as raw bytes.
//! - [`http`]: a tiny HTTP/1.1 client for the API and for refused handshakes.
//! - [`RedisServer`]: a `redis-server` of the test's own on a free loopback port, and
//!   [`cluster_node`]: a `herald serve` process sharing publishes through it.
//! - [`HeraldProcess`]: the real binary, `herald serve` on a config file ([`write_config`]),
//!   with its ready line and log; [`run_herald`] runs a CLI command to completion.
//!
//! Every blocking read has a timeout ([`TIMEOUT`]); nothing sleeps to synchronise.

// Each test binary compiles this module and uses a different subset of it.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald::config::{Config, IoDriver, KeyConfig, ProjectConfig, Secret};
use herald::hub::Hub;
use herald::server::ServerHandle;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

/// Upper bound of every wait in the tests.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// HS256 secret of project `shop` (kid `k1`).
pub const SHOP_SECRET: &str = "shop-test-secret-0123456789abcdef";
/// HS256 secret of project `blog` (kid `k1`, like shop's: kids are per project).
pub const BLOG_SECRET: &str = "blog-test-secret-0123456789abcdef";
/// API key of `shop`.
pub const SHOP_API_KEY: &str = "shop-api-key-for-tests";
/// API key of `blog`.
pub const BLOG_API_KEY: &str = "blog-api-key-for-tests";
/// Admin API key.
pub const ADMIN_KEY: &str = "admin-key-for-tests";
/// A valid `Sec-WebSocket-Key` (the RFC 6455 sample).
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// The test configuration: port 0 everywhere, 2 unpinned shards, projects `shop` and `blog`,
/// and a short drain so dropping a server is quick.
pub fn config() -> Config {
    let project = |id: &str, secret: &str, api_key: &str| ProjectConfig {
        id: id.into(),
        api_key: Some(Secret(api_key.into())),
        keys: vec![KeyConfig {
            kid: Some("k1".into()),
            alg: "HS256".into(),
            secret: Some(Secret(secret.into())),
            ..KeyConfig::default()
        }],
        ..ProjectConfig::default()
    };
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".parse().expect("literal address");
    c.server.api_listen = "127.0.0.1:0".parse().expect("literal address");
    c.server.shards = 2;
    c.server.pin_cores = false;
    c.server.drain_timeout_ms = 1000;
    c.api.admin_key = Some(Secret(ADMIN_KEY.into()));
    // The tests connect many clients from 127.0.0.1 and send and publish in bursts:
    // per-address, per-connection and per-key limits off unless a test turns them on
    // (tests/protection.rs).
    c.limits.handshakes_per_ip_per_sec = 0;
    c.limits.connections_per_ip = 0;
    c.limits.max_pending_handshakes_per_ip = 0;
    c.limits.messages_per_conn_per_sec = 0;
    c.limits.api_requests_per_key_per_sec = 0;
    c.projects = vec![
        project("shop", SHOP_SECRET, SHOP_API_KEY),
        project("blog", BLOG_SECRET, BLOG_API_KEY),
    ];
    c
}

/// A running in-process server; shut down (drain) and joined on drop.
pub struct TestServer {
    handle: Option<ServerHandle>,
    /// Private `server.state_dir`, removed on drop.
    state_dir: std::path::PathBuf,
    /// Client WebSocket address.
    pub listen: SocketAddr,
    /// API address.
    pub api: SocketAddr,
    /// The node handle (counters, phase).
    pub hub: Arc<Hub>,
}

impl TestServer {
    /// Starts a server on [`config`] changed by `tweak`; returns once it serves.
    pub fn start(tweak: impl FnOnce(&mut Config)) -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let state_dir =
            std::env::temp_dir().join(format!("herald-test-{}-{n}", std::process::id()));
        let mut cfg = config();
        // Projects and keys made through the API persist: never into the user's home.
        cfg.server.state_dir = Some(state_dir.clone());
        tweak(&mut cfg);
        let handle = herald::server::start(&cfg).expect("server starts");
        Self {
            state_dir,
            listen: handle.listen,
            api: handle.api_listen,
            hub: handle.hub.clone(),
            handle: Some(handle),
        }
    }

    /// Starts a server with the given shard count and I/O driver.
    pub fn with_shards(shards: usize, driver: IoDriver) -> Self {
        Self::start(|c| {
            c.server.shards = shards;
            c.server.io_driver = driver;
        })
    }

    /// Starts the drain (close 1001 to every client) and returns a thread that joins the
    /// server: it ends once every shard has drained or hit `server.drain_timeout_ms`.
    pub fn drain_in_background(mut self) -> std::thread::JoinHandle<()> {
        let handle = self.handle.take().expect("running");
        let state_dir = self.state_dir.clone();
        handle.shutdown();
        std::thread::spawn(move || {
            handle.join();
            let _ = std::fs::remove_dir_all(&state_dir);
        })
    }

    /// Sum of one counter over every shard.
    pub fn stat(&self, pick: impl Fn(&herald::metrics::ShardStats) -> u64) -> u64 {
        self.hub.stats.iter().map(|s| pick(s)).sum()
    }

    /// Connections closed as slow consumers (4008), over every shard.
    pub fn slow_consumer_closes(&self) -> u64 {
        self.stat(|s| herald::metrics::read(&s.slow_consumer_closes))
    }

    /// Authenticated connections open now, as the server counts them.
    pub fn nr_connections(&self) -> usize {
        self.hub
            .nr_connections
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits (polling, bounded by [`TIMEOUT`]) until the server counts `n` connections.
    pub fn wait_connections(&self, n: usize) {
        wait_until("the server to count the connections", || {
            self.nr_connections() == n
        });
    }

    /// Publishes `data` (raw JSON, sent byte for byte) to one topic with the project's API
    /// key; returns the message id.
    pub fn publish(&self, project: &str, topic: &str, data: &str) -> String {
        let body = format!(r#"{{"project":"{project}","topic":"{topic}","data":{data}}}"#);
        let r = publish(self.api, api_key_of(project), &body);
        assert_eq!(r.status, 200, "publish refused: {}", r.text());
        r.json()["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no id in {}", r.text()))
            .to_owned()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
            h.join();
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// Polls `done` every few milliseconds until it holds; panics after [`TIMEOUT`]. For state
/// that has no signal of its own (counters).
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A fresh directory for one test's files, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// `$TMPDIR/herald-test-<pid>-<name>`, emptied.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("herald-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    /// Writes `text` to `file` in the directory; returns its path.
    pub fn write(&self, file: &str, text: &str) -> std::path::PathBuf {
        let path = self.0.join(file);
        std::fs::write(&path, text).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Spawns the `herald` binary with `args`, `env` added to the environment (the test
/// runner's own systemd variables are never passed on), stdin empty, stdout and stderr piped.
fn spawn_herald(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> std::process::Child {
    use std::process::{Command, Stdio};
    Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn herald")
}

/// Runs the `herald` binary to completion (at most 3 × [`TIMEOUT`]); returns (status, stdout,
/// stderr).
pub fn run_herald(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let mut child = spawn_herald(args, &[]);
    let (tx, rx) = std::sync::mpsc::channel();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        let mut o = String::new();
        let mut e = String::new();
        let _ = out.read_to_string(&mut o);
        let _ = err.read_to_string(&mut e);
        let _ = tx.send((o, e));
    });
    let (o, e) = rx.recv_timeout(TIMEOUT * 3).unwrap_or_else(|_| {
        let _ = child.kill();
        panic!("herald {args:?} did not finish");
    });
    let status = child.wait().expect("wait");
    (status, o, e)
}

/// Writes `toml` as `herald.toml` in `dir`; returns its path.
pub fn write_config(dir: &TempDir, toml: &str) -> std::path::PathBuf {
    dir.write("herald.toml", toml)
}

/// The addresses of a ready line: `{"event":"ready","listen":..,"api_listen":..,..}`.
pub struct Ready {
    /// The whole line.
    pub line: Value,
    /// The client (WebSocket) address.
    pub listen: SocketAddr,
    /// The API address.
    pub api: SocketAddr,
}

/// A `herald serve` process, killed on drop if it is still running. Its stdout (the ready
/// line, then anything else) and its log (stderr) are read on threads, so the process never
/// blocks on a full pipe.
pub struct HeraldProcess {
    /// The process.
    pub child: std::process::Child,
    /// Lines of stdout not yet taken, as they come.
    pub stdout: std::sync::mpsc::Receiver<String>,
    /// Lines of stderr so far.
    stderr: Arc<std::sync::Mutex<Vec<String>>>,
    /// The threads reading stdout and stderr; they end with the process.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl HeraldProcess {
    /// Writes `config_toml` to `herald.toml` in `dir` ([`write_config`]; the config names its
    /// own state directory), starts `herald serve` on it with port 0 for clients and the API
    /// and `env` added to the environment, and waits for the ready line.
    pub fn start(
        dir: &TempDir,
        config_toml: &str,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> (Self, Ready) {
        let process = Self::spawn_on(dir, config_toml, env);
        let ready = process.ready();
        (process, ready)
    }

    /// [`HeraldProcess::start`] without waiting for the ready line: for a start that is
    /// expected to fail.
    pub fn spawn_on(dir: &TempDir, config_toml: &str, env: &[(&str, &std::ffi::OsStr)]) -> Self {
        let config = write_config(dir, config_toml);
        Self::spawn(
            &[
                "--config",
                config.to_str().expect("utf-8 path"),
                "--listen",
                "127.0.0.1:0",
                "--api-listen",
                "127.0.0.1:0",
            ],
            env,
        )
    }

    /// Spawns `herald serve <args>` ([`spawn_herald`]); does not wait for anything.
    pub fn spawn(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Self {
        use std::io::{BufRead, BufReader};
        let mut child = spawn_herald(&[&["serve"], args].concat(), env);
        let (tx, stdout) = std::sync::mpsc::channel();
        let out = child.stdout.take().expect("piped stdout");
        let stderr = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = stderr.clone();
        let err = child.stderr.take().expect("piped stderr");
        let readers = vec![
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            }),
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            }),
        ];
        Self {
            child,
            stdout,
            stderr,
            readers,
        }
    }

    /// Waits for the next line of stdout, at most 3 × [`TIMEOUT`], and reads it as the ready
    /// line; panics with the log if none comes.
    pub fn ready(&self) -> Ready {
        let line = self
            .stdout
            .recv_timeout(TIMEOUT * 3)
            .unwrap_or_else(|e| panic!("no ready line ({e:?}); stderr: {}", self.stderr()));
        let line: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: ready line {line}"));
        let addr = |key: &str| -> SocketAddr {
            line[key]
                .as_str()
                .unwrap_or_else(|| panic!("no `{key}` in the ready line {line}"))
                .parse()
                .expect("an address")
        };
        Ready {
            listen: addr("listen"),
            api: addr("api_listen"),
            line,
        }
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends signal `sig` to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// The log so far, one line per line.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// The log after its first `at` lines, one line per line.
    pub fn log_since(&self, at: usize) -> String {
        self.stderr.lock().unwrap()[at..].join("\n")
    }

    /// Lines of the log so far.
    pub fn log_len(&self) -> usize {
        self.stderr.lock().unwrap().len()
    }

    /// Waits (at most [`TIMEOUT`]) until the log has a line containing `needle` after its
    /// first `after` lines; returns that line.
    pub fn wait_log(&self, needle: &str, after: usize) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(l) = self.stderr.lock().unwrap()[after..]
                .iter()
                .find(|l| l.contains(needle))
            {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no `{needle}` in the log:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the exit, at most `limit`, then for the last lines of stdout and stderr.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {limit:?}; log:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        status
    }

    /// Lines printed on stdout and not yet taken, once the process has exited.
    pub fn extra_stdout(&self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(line) = self.stdout.recv_timeout(TIMEOUT) {
            lines.push(line);
        }
        lines
    }
}

impl Drop for HeraldProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// The HS256 secret of a test project.
pub fn secret_of(project: &str) -> &'static str {
    match project {
        "shop" => SHOP_SECRET,
        "blog" => BLOG_SECRET,
        other => panic!("no test project `{other}`"),
    }
}

/// The API key of a test project.
pub fn api_key_of(project: &str) -> &'static str {
    match project {
        "shop" => SHOP_API_KEY,
        "blog" => BLOG_API_KEY,
        other => panic!("no test project `{other}`"),
    }
}

/// Signs `claims` with HS256, kid `k1` and `secret`.
pub fn mint_with(secret: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("k1".into());
    jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("test claims encode")
}

/// A token of `project` carrying exactly `claims`.
pub fn mint(project: &str, claims: &Value) -> String {
    mint_with(secret_of(project), claims)
}

/// A token of `project` for `sub`, valid for an hour; returns it with its `exp`.
pub fn token(project: &str, sub: &str) -> (String, u64) {
    let exp = now_secs() + 3600;
    (mint(project, &json!({"sub": sub, "exp": exp})), exp)
}

// ---------------------------------------------------------------------------------------------
// WebSocket clients (tungstenite)

/// A client connection.
pub type Client = WebSocket<TcpStream>;

/// Where the client puts its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `Authorization: Bearer <jwt>`.
    Header,
    /// `?token=<jwt>`.
    Query,
    /// `Sec-WebSocket-Protocol: herald.v1, bearer.<jwt>`.
    Subprotocol,
}

/// The server's welcome frame, as text and split into the parts tests check.
#[derive(Debug, Clone)]
pub struct Welcome {
    /// The frame's text, exactly as received.
    pub text: String,
    /// `conn`.
    pub conn: String,
    /// The shard encoded in `conn` (`<shard hex>-<slot hex>-<gen hex>`).
    pub shard: u16,
}

/// A TCP connection to `addr` from source address `from` (any port).
pub fn tcp_from(from: &str, addr: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .expect("socket");
    let local: SocketAddr = format!("{from}:0").parse().expect("literal address");
    s.bind(&local.into())
        .expect("bind the client to a loopback address");
    s.connect_timeout(&addr.into(), TIMEOUT)
        .expect("TCP connect");
    let s: TcpStream = s.into();
    set_timeouts(&s);
    s
}

/// A TCP connection with read and write timeouts.
pub fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, TIMEOUT).expect("TCP connect");
    set_timeouts(&s);
    s
}

/// Sets [`TIMEOUT`] on reads and writes and disables Nagle.
pub fn set_timeouts(s: &TcpStream) {
    s.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    s.set_write_timeout(Some(TIMEOUT)).expect("write timeout");
    s.set_nodelay(true).expect("nodelay");
}

/// The upgrade request for `/ws/{project}` with the token in `transport`.
pub fn ws_request(
    addr: SocketAddr,
    project: &str,
    token: &str,
    transport: Transport,
) -> tungstenite::handshake::client::Request {
    let url = match transport {
        Transport::Query => format!("ws://{addr}/ws/{project}?token={token}"),
        _ => format!("ws://{addr}/ws/{project}"),
    };
    let mut req = url.into_client_request().expect("valid URL");
    let h = req.headers_mut();
    match transport {
        Transport::Header => {
            h.insert(
                "Authorization",
                HeaderValue::from_str(&format!("Bearer {token}")).expect("header value"),
            );
        }
        Transport::Subprotocol => {
            h.insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_str(&format!("herald.v1, bearer.{token}")).expect("header value"),
            );
        }
        Transport::Query => {}
    }
    req
}

/// Completes the client handshake over `stream` and reads the welcome frame.
pub fn handshake(
    stream: TcpStream,
    req: tungstenite::handshake::client::Request,
) -> (Client, tungstenite::handshake::client::Response, Welcome) {
    let (mut ws, resp) = match tungstenite::client(req, stream) {
        Ok(ok) => ok,
        Err(tungstenite::HandshakeError::Failure(e)) => panic!("handshake failed: {e}"),
        Err(tungstenite::HandshakeError::Interrupted(_)) => panic!("handshake timed out"),
    };
    let text = recv_text(&mut ws);
    let welcome = parse_welcome(&text);
    (ws, resp, welcome)
}

/// Splits a welcome frame; panics unless it is one with a well-formed connection id.
pub fn parse_welcome(text: &str) -> Welcome {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(v["type"], "welcome", "first frame is not a welcome: {text}");
    let conn = v["conn"]
        .as_str()
        .unwrap_or_else(|| panic!("no conn in {text}"))
        .to_owned();
    let parts: Vec<&str> = conn.split('-').collect();
    assert_eq!(parts.len(), 3, "conn id is <shard>-<slot>-<gen>: {conn}");
    for p in &parts {
        assert!(
            !p.is_empty() && p.chars().all(|c| c.is_ascii_hexdigit()),
            "conn id parts are hex: {conn}"
        );
    }
    let shard = u16::from_str_radix(parts[0], 16).expect("hex shard");
    Welcome {
        text: text.to_owned(),
        conn,
        shard,
    }
}

/// Connects to `project` with `token` in `transport`.
pub fn connect_via(
    addr: SocketAddr,
    project: &str,
    token: &str,
    transport: Transport,
) -> (Client, tungstenite::handshake::client::Response, Welcome) {
    handshake(tcp(addr), ws_request(addr, project, token, transport))
}

/// Connects to `project` with `Authorization: Bearer`.
pub fn connect(addr: SocketAddr, project: &str, token: &str) -> (Client, Welcome) {
    let (ws, _, w) = connect_via(addr, project, token, Transport::Header);
    (ws, w)
}

/// Connects as `user` of `project` with a fresh hour-long token.
pub fn connect_user(addr: SocketAddr, project: &str, user: &str) -> (Client, Welcome) {
    connect(addr, project, &token(project, user).0)
}

/// Connects as `user` until the connections cover both shards of a two-shard server and
/// number at least `min` (the kernel spreads accepts by a hash, so a few connections may all
/// land on one shard).
pub fn connect_spread(
    addr: SocketAddr,
    project: &str,
    user: &str,
    min: usize,
) -> Vec<(Client, Welcome)> {
    let mut conns: Vec<(Client, Welcome)> = Vec::new();
    for _ in 0..64 {
        let shards: std::collections::BTreeSet<u16> = conns.iter().map(|(_, w)| w.shard).collect();
        if conns.len() >= min && shards.len() >= 2 {
            return conns;
        }
        conns.push(connect_user(addr, project, user));
    }
    panic!("64 connections did not cover both shards");
}

/// The next text frame; pings and pongs are skipped (tungstenite answers pings itself).
/// Panics on a close, an error or a timeout.
pub fn recv_text(ws: &mut Client) -> String {
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => return t.as_str().to_owned(),
            Ok(Message::Ping(_) | Message::Pong(_)) => {}
            Ok(other) => panic!("expected a text frame, got {other:?}"),
            Err(e) => panic!("expected a text frame, got error {e}"),
        }
    }
}

/// The next text frame as JSON.
pub fn recv_json(ws: &mut Client) -> Value {
    let t = recv_text(ws);
    serde_json::from_str(&t).unwrap_or_else(|e| panic!("{e}: {t}"))
}

/// The next frame, a message of `topic` with history: (offset, data as an integer).
pub fn message_at(ws: &mut Client, topic: &str) -> (u64, i64) {
    let m = recv_json(ws);
    assert_eq!(m["type"], "message", "{m}");
    assert_eq!(m["topic"], topic, "{m}");
    (
        m["offset"]
            .as_u64()
            .unwrap_or_else(|| panic!("no offset: {m}")),
        m["data"].as_i64().unwrap_or_else(|| panic!("no data: {m}")),
    )
}

/// Sends a text frame.
pub fn send_text(ws: &mut Client, text: &str) {
    ws.send(Message::text(text)).expect("send");
}

/// Sends a request and returns the next text frame (the reply) as JSON.
pub fn request(ws: &mut Client, text: &str) -> Value {
    send_text(ws, text);
    recv_json(ws)
}

/// Subscribes to `topic` and checks the exact ack.
pub fn subscribe(ws: &mut Client, topic: &str) {
    send_text(
        ws,
        &format!(r#"{{"op":"subscribe","topic":"{topic}","id":"s-{topic}"}}"#),
    );
    assert_eq!(
        recv_text(ws),
        format!(r#"{{"type":"ack","id":"s-{topic}"}}"#)
    );
}

/// Reads until the server's close frame; returns the text frames seen before it, the close
/// code and the reason. Then completes the closing handshake (tungstenite sends its echo on
/// the next read) and checks the server closes the TCP connection. Panics on an error, a
/// timeout or a close without a frame.
pub fn read_until_close(ws: &mut Client) -> (Vec<String>, u16, String) {
    let mut texts = Vec::new();
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => texts.push(t.as_str().to_owned()),
            Ok(Message::Ping(_) | Message::Pong(_)) => {}
            Ok(Message::Close(Some(f))) => {
                let (code, reason) = (u16::from(f.code), f.reason.as_str().to_owned());
                match ws.read() {
                    Err(tungstenite::Error::ConnectionClosed) => {}
                    Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::ConnectionReset => {}
                    other => panic!("after close {code}, expected the end, got {other:?}"),
                }
                return (texts, code, reason);
            }
            Ok(other) => panic!("expected a close frame, got {other:?}"),
            Err(e) => panic!(
                "expected a close frame, got error {e} after {} text frames",
                texts.len()
            ),
        }
    }
}

/// The close code and reason of the server's close frame (text frames before it skipped).
pub fn expect_close(ws: &mut Client) -> (u16, String) {
    let (_, code, reason) = read_until_close(ws);
    (code, reason)
}

/// Closes from the client side with 1000 and waits for the server's answer.
pub fn close(mut ws: Client) {
    ws.close(Some(tungstenite::protocol::CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
    .expect("send close");
    let (_, code, _) = read_until_close(&mut ws);
    assert_eq!(code, 1000);
}

/// Splits a delivery frame into (topic, data as raw text, id, ts) after checking the exact
/// frame layout of protocol.md.
pub fn split_message(text: &str) -> (String, String, String, u64) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(v["type"], "message", "not a message: {text}");
    let topic = v["topic"].as_str().expect("topic").to_owned();
    let id = v["id"].as_str().expect("id").to_owned();
    let ts = v["ts"].as_u64().expect("ts");
    let prefix = format!(r#"{{"type":"message","topic":"{topic}","data":"#);
    let suffix = format!(r#","id":"{id}","ts":{ts}}}"#);
    assert!(
        text.starts_with(&prefix) && text.ends_with(&suffix),
        "frame layout: {text}"
    );
    let data = text[prefix.len()..text.len() - suffix.len()].to_owned();
    (topic, data, id, ts)
}

/// The exact delivery frame for a publication.
pub fn message_text(topic: &str, data: &str, id: &str, ts: u64) -> String {
    format!(r#"{{"type":"message","topic":"{topic}","data":{data},"id":"{id}","ts":{ts}}}"#)
}

/// Reads the next frame and checks it is exactly the delivery of (topic, data, id), with a
/// timestamp in `[after_ms, now]`.
pub fn expect_message(ws: &mut Client, topic: &str, data: &str, id: &str, after_ms: u64) {
    let text = recv_text(ws);
    let (_, _, _, ts) = split_message(&text);
    assert_eq!(text, message_text(topic, data, id, ts));
    assert!(
        ts >= after_ms && ts <= now_ms(),
        "ts {ts} outside the publish window (from {after_ms})"
    );
}

// ---------------------------------------------------------------------------------------------
// Raw frames

/// A frame as it went over the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// FIN bit.
    pub fin: bool,
    /// RSV1-3 bits (`0bXYZ`).
    pub rsv: u8,
    /// Opcode.
    pub opcode: u8,
    /// Whether the frame carried a mask (server frames must not).
    pub masked: bool,
    /// Unmasked payload.
    pub payload: Vec<u8>,
}

/// Opcodes.
pub mod op {
    /// Continuation.
    pub const CONT: u8 = 0x0;
    /// Text.
    pub const TEXT: u8 = 0x1;
    /// Binary.
    pub const BINARY: u8 = 0x2;
    /// Close.
    pub const CLOSE: u8 = 0x8;
    /// Ping.
    pub const PING: u8 = 0x9;
    /// Pong.
    pub const PONG: u8 = 0xA;
}

/// Encodes a frame by hand: `rsv` is the three reserved bits (`0bXYZ`), `mask` none for an
/// (illegal) unmasked client frame.
pub fn encode_frame(
    fin: bool,
    rsv: u8,
    opcode: u8,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | ((rsv & 0b111) << 4) | (opcode & 0x0f)];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n < 65536 => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(m) => {
            out.extend_from_slice(&m);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A final, masked client frame.
pub fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    encode_frame(true, 0, opcode, payload, Some([0x37, 0xfa, 0x21, 0x3d]))
}

/// The HTTP upgrade request for `path` with extra header lines (each ending in `\r\n`).
pub fn upgrade_request(path: &str, extra_headers: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {WS_KEY}\r\n{extra_headers}\r\n"
    )
}

/// A client on a bare socket: writes whatever bytes a test makes, parses the server's frames
/// itself.
pub struct RawClient {
    /// The socket.
    pub stream: TcpStream,
    /// Bytes read but not parsed yet.
    buf: Vec<u8>,
}

impl RawClient {
    /// A TCP connection with timeouts, nothing sent.
    pub fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: tcp(addr),
            buf: Vec::new(),
        }
    }

    /// Upgrades to `project` with `jwt` (Authorization header), checks the `101` and returns
    /// the client and the welcome frame.
    pub fn upgrade(addr: SocketAddr, project: &str, jwt: &str) -> (Self, Welcome) {
        let mut c = Self::connect(addr);
        c.send(
            upgrade_request(
                &format!("/ws/{project}"),
                &format!("Authorization: Bearer {jwt}\r\n"),
            )
            .as_bytes(),
        );
        let head = c.read_http_head();
        assert!(
            head.starts_with("HTTP/1.1 101 "),
            "expected 101, got {head}"
        );
        let f = c.read_frame().expect("welcome frame");
        assert_eq!((f.fin, f.opcode, f.masked), (true, op::TEXT, false));
        let welcome = parse_welcome(std::str::from_utf8(&f.payload).expect("UTF-8 welcome"));
        (c, welcome)
    }

    /// Writes bytes as they are.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
        self.stream.flush().expect("flush");
    }

    /// Writes bytes, ignoring a failure (the peer may have closed already).
    pub fn try_send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// Reads one chunk into the buffer; false at EOF (or reset).
    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => false,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("read timed out after {TIMEOUT:?}")
            }
            Err(e) => panic!("read: {e}"),
        }
    }

    /// Reads the HTTP response head (up to the blank line); the rest stays buffered.
    pub fn read_http_head(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..end + 4).collect();
                return String::from_utf8(head).expect("ASCII head");
            }
            assert!(self.fill(), "EOF before the end of the HTTP head");
        }
    }

    /// The next frame from the server; `None` at EOF.
    pub fn read_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some((frame, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            if !self.fill() {
                assert!(self.buf.is_empty(), "EOF inside a frame: {:x?}", self.buf);
                return None;
            }
        }
    }

    /// Reads frames until the server's close frame (skipping data and ping frames, which
    /// must be unmasked); returns its code and reason.
    pub fn expect_close(&mut self) -> (u16, String) {
        loop {
            let f = self
                .read_frame()
                .expect("EOF before the server's close frame");
            assert!(!f.masked, "server frames are never masked");
            if f.opcode == op::CLOSE {
                assert!(f.fin && f.payload.len() >= 2, "close frame {f:?}");
                let code = u16::from_be_bytes([f.payload[0], f.payload[1]]);
                let reason = String::from_utf8(f.payload[2..].to_vec()).expect("UTF-8 reason");
                return (code, reason);
            }
        }
    }

    /// Reads (and discards) until EOF; returns how long it took. Panics after [`TIMEOUT`].
    pub fn expect_eof(&mut self) -> Duration {
        let start = Instant::now();
        loop {
            self.buf.clear();
            if !self.fill() {
                return start.elapsed();
            }
        }
    }
}

/// Parses one server frame from the start of `buf`; `None` while incomplete.
pub fn parse_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let fin = buf[0] & 0x80 != 0;
    let rsv = (buf[0] >> 4) & 0b111;
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let (len, mut at) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes")) as usize,
            10,
        ),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    let mask = if masked {
        if buf.len() < at + 4 {
            return None;
        }
        let m = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    if buf.len() < at + len {
        return None;
    }
    let mut payload = buf[at..at + len].to_vec();
    if let Some(m) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= m[i % 4];
        }
    }
    Some((
        Frame {
            fin,
            rsv,
            opcode,
            masked,
            payload,
        },
        at + len,
    ))
}

// ---------------------------------------------------------------------------------------------
// HTTP

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers in order (names as sent).
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }
}

/// Sends `request` as is, reads the response until the server closes (or Content-Length is
/// reached) and parses it.
pub fn http(addr: SocketAddr, request: &[u8]) -> HttpResponse {
    let mut s = tcp(addr);
    s.write_all(request).expect("write request");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(r) = parse_http(&buf) {
            return r;
        }
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading the HTTP response: {e}"),
        }
    }
    parse_http(&buf).unwrap_or_else(|| {
        panic!(
            "incomplete HTTP response: {:?}",
            String::from_utf8_lossy(&buf)
        )
    })
}

/// A complete response at the start of `buf` (needs Content-Length).
pub fn parse_http(buf: &[u8]) -> Option<HttpResponse> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf).expect("well-formed HTTP response") {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return None,
    };
    let headers: Vec<(String, String)> = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_owned(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let status = resp.code.expect("status code");
    let len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.trim().parse().expect("numeric Content-Length"))
        // 204 and 304 have no body and need no Content-Length (RFC 9110 §8.6).
        .or((status == 204 || status == 304).then_some(0))
        .expect("responses carry Content-Length");
    if buf.len() < head_len + len {
        return None;
    }
    Some(HttpResponse {
        status,
        headers,
        body: buf[head_len..head_len + len].to_vec(),
    })
}

/// A request with `Connection: close`, `Content-Length` and a Bearer key.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: &str,
    body: &str,
) -> HttpResponse {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {bearer}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    http(addr, req.as_bytes())
}

/// `POST /api/v1/publish` with a raw JSON body.
pub fn publish(api: SocketAddr, key: &str, body: &str) -> HttpResponse {
    http_request(api, "POST", "/api/v1/publish", key, body)
}

/// The `/metrics` samples: (name, labels as text, value).
pub fn scrape(api: SocketAddr) -> Vec<(String, String, f64)> {
    let r = http_request(api, "GET", "/metrics", "", "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("Content-Type")
            .is_some_and(|c| c.starts_with("application/openmetrics-text")),
        "{:?}",
        r.header("Content-Type")
    );
    r.text()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("sample line");
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {l}"));
            (name.to_owned(), labels.to_owned(), value)
        })
        .collect()
}

/// Sum of the samples of `name` whose labels contain `label` (e.g. `shard="0"`, or "").
pub fn metric(samples: &[(String, String, f64)], name: &str, label: &str) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| n == name && l.contains(label))
        .map(|(_, _, v)| v)
        .sum()
}

/// Checks a pre-upgrade refusal: status, JSON content type, the `{"error","message"}` body
/// with `error` = `code`, and the 401 challenge header.
pub fn assert_refusal(r: &HttpResponse, status: u16, code: &str) {
    assert_eq!(r.status, status, "{r:?} {}", r.text());
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    let body = r.json();
    let obj = body.as_object().expect("JSON object body");
    assert_eq!(obj.len(), 2, "body is exactly {{error, message}}: {body}");
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "human message: {body}"
    );
    if status == 401 {
        assert_eq!(
            r.header("WWW-Authenticate"),
            Some(r#"Bearer error="invalid_token""#)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Clusters

/// A `redis-server` of the test's own on a loopback port, without persistence; killed on
/// drop.
pub struct RedisServer {
    child: Option<std::process::Child>,
    /// Its port.
    pub port: u16,
    /// Its working directory.
    dir: TempDir,
}

impl RedisServer {
    /// Starts one on a free port and waits until it answers PING. The port is free when
    /// picked, not reserved: if another socket takes it before redis-server binds it, the
    /// server exits and another port is tried.
    pub fn start(name: &str) -> Self {
        let mut r = Self {
            child: None,
            port: 0,
            dir: TempDir::new(&format!("redis-{name}")),
        };
        for _ in 0..3 {
            r.port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            if r.run() {
                return r;
            }
        }
        panic!("redis-server did not start on any of three free ports");
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts it again on the same port (after [`RedisServer::stop`]), empty.
    pub fn restart(&mut self) {
        assert!(
            self.run(),
            "redis-server exited at start on port {}",
            self.port
        );
    }

    /// Spawns redis-server on `self.port` and waits until it answers PING (`true`) or exits
    /// (`false`: the port was taken).
    fn run(&mut self) -> bool {
        assert!(self.child.is_none(), "already running");
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(&self.dir.0)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (apt-get install redis-server)");
        self.child = Some(child);
        let mut exited = false;
        wait_until("redis-server answers PING or exits", || {
            exited = self
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            exited
                || self
                    .connection()
                    .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                    .is_ok()
        });
        if exited {
            self.child = None;
            return false;
        }
        // The server that answered is this one, not another test's on a port taken meanwhile.
        let pid = self.child.as_ref().map(std::process::Child::id);
        let info: String = self
            .connection()
            .and_then(|mut c| redis::cmd("INFO").arg("server").query(&mut c))
            .expect("INFO server");
        let answered = info
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|p| p.trim().parse::<u32>().ok());
        if answered != pid {
            self.stop();
            return false;
        }
        true
    }

    /// Kills it (SIGKILL) and waits for its end.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A fresh connection.
    pub fn connection(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection_with_timeout(TIMEOUT)
    }

    /// `PUBSUB NUMSUB channel`: how many connections are subscribed to it.
    pub fn numsub(&self, channel: &str) -> i64 {
        let mut c = self.connection().expect("connect to redis");
        let (_, n): (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query(&mut c)
            .expect("PUBSUB NUMSUB");
        n
    }

    /// Waits until `PUBSUB NUMSUB channel` is `n`.
    pub fn wait_numsub(&self, channel: &str, n: i64) {
        wait_until(&format!("{n} subscribers of {channel}"), || {
            self.numsub(channel) == n
        });
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The TOML of a node of the test cluster: [`config`] (projects `shop` and `blog`, two
/// shards, limits off) with its own state directory in `dir` and `[engine]` on `redis` with
/// `prefix` (other engine settings at their defaults), changed by `tweak`.
pub fn cluster_toml(
    dir: &TempDir,
    redis: &RedisServer,
    prefix: &str,
    tweak: impl FnOnce(&mut herald::config::EngineConfig),
) -> String {
    let mut c = config();
    c.server.state_dir = Some(dir.0.join("state"));
    let mut engine = herald::config::EngineConfig {
        url: redis.url(),
        prefix: prefix.into(),
        ..Default::default()
    };
    tweak(&mut engine);
    c.engine = Some(engine);
    toml::to_string(&c).expect("a config serialises")
}

/// One `herald serve` process of a test cluster ([`cluster_toml`] in a directory of its own
/// named `name`), once its engine is up.
pub fn cluster_node(
    name: &str,
    redis: &RedisServer,
    prefix: &str,
) -> (HeraldProcess, Ready, TempDir) {
    let dir = TempDir::new(name);
    let (p, ready) = HeraldProcess::start(&dir, &cluster_toml(&dir, redis, prefix, |_| ()), &[]);
    wait_engine_up(ready.api, true);
    (p, ready, dir)
}

/// `n` nodes of a test cluster ([`cluster_node`]), named `<name>-<i>`.
pub fn cluster_nodes(
    n: usize,
    name: &str,
    redis: &RedisServer,
    prefix: &str,
) -> Vec<(HeraldProcess, Ready, TempDir)> {
    (0..n)
        .map(|i| cluster_node(&format!("{name}-{i}"), redis, prefix))
        .collect()
}

/// Waits until the node's `herald_engine_up` is 1 (`up`) or 0.
pub fn wait_engine_up(api: SocketAddr, up: bool) {
    wait_until(&format!("herald_engine_up {}", u8::from(up)), || {
        metric(&scrape(api), "herald_engine_up", "") == f64::from(u8::from(up))
    });
}

/// Connections to the engine the node has lost so far (`herald_engine_disconnects_total`).
pub fn engine_disconnects(api: SocketAddr) -> f64 {
    metric(&scrape(api), "herald_engine_disconnects_total", "")
}

/// Waits until the node has lost its engine connection since it had lost `before`, then until
/// the engine is up again. The counter only grows, so an outage shorter than a scrape is seen
/// too (the `herald_engine_up` gauge may be 0 for less than that).
pub fn wait_engine_lost_and_back(api: SocketAddr, before: f64) {
    wait_until("the engine connection to be lost", || {
        engine_disconnects(api) > before
    });
    wait_engine_up(api, true);
}

/// A TCP relay to a port on loopback whose connections can be frozen: a frozen connection
/// moves no byte in either direction and closes nothing, as a link that hangs (or a server
/// that stopped answering without closing) looks to a client. Threads end with their
/// connections.
pub struct Relay {
    /// Where clients connect.
    pub port: u16,
    /// Every connection relayed so far, in accept order.
    conns: Arc<std::sync::Mutex<Vec<Arc<Link>>>>,
}

/// One relayed connection's state, shared by its two forwarding threads.
#[derive(Default)]
struct Link {
    /// Whether the connection is asked to move nothing.
    frozen: std::sync::atomic::AtomicBool,
    /// Forwarding threads that move nothing now: waiting while frozen, or ended. (Both
    /// fields are read and written sequentially consistent: a freeze that reads both threads
    /// idle must not miss one that was resuming.)
    idle: std::sync::atomic::AtomicUsize,
}

impl Relay {
    /// Relays connections on a free loopback port to `127.0.0.1:<to>`.
    pub fn start(to: u16) -> Self {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let port = listener.local_addr().expect("relay address").port();
        let conns: Arc<std::sync::Mutex<Vec<Arc<Link>>>> = Arc::default();
        let list = conns.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                let link = Arc::new(Link::default());
                list.lock().unwrap().push(link.clone());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let link = link.clone();
                    std::thread::spawn(move || {
                        let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            if link.frozen.load(Ordering::SeqCst) {
                                link.idle.fetch_add(1, Ordering::SeqCst);
                                while link.frozen.load(Ordering::SeqCst) {
                                    std::thread::sleep(Duration::from_millis(5));
                                }
                                link.idle.fetch_sub(1, Ordering::SeqCst);
                                continue;
                            }
                            match from.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        ErrorKind::WouldBlock | ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => break,
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        link.idle.fetch_add(1, Ordering::SeqCst);
                    });
                }
            }
        });
        Self { port, conns }
    }

    /// Connections relayed so far.
    pub fn nr_connections(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    /// Freezes (`true`) or resumes connection `i` (in accept order). A freeze returns once
    /// both directions have stopped: no byte sent after it passes, not even one a forwarding
    /// thread was about to read when the flag was set.
    pub fn freeze(&self, i: usize, frozen: bool) {
        self.freeze_all(&[i], frozen);
    }

    /// [`Relay::freeze`] of several connections at once: every flag is set before the first
    /// wait, so none of them moves a byte the others hold back.
    pub fn freeze_all(&self, conns: &[usize], frozen: bool) {
        use std::sync::atomic::Ordering;
        let links: Vec<_> = {
            let all = self.conns.lock().unwrap();
            conns.iter().map(|&i| all[i].clone()).collect()
        };
        for link in &links {
            link.frozen.store(frozen, Ordering::SeqCst);
        }
        if frozen {
            wait_until("both directions of each frozen relay stopped", || {
                links.iter().all(|l| l.idle.load(Ordering::SeqCst) == 2)
            });
        }
    }
}

/// A publication's data: its sequence number and `pad` bytes of padding.
pub fn padded_data(seq: usize, pad: usize) -> String {
    format!(r#"{{"seq":{seq},"pad":"{}"}}"#, "x".repeat(pad))
}

/// The `seq` of a delivery frame on `topic` whose data is [`padded_data`] with `pad`, checked
/// byte for byte.
pub fn padded_seq(text: &str, topic: &str, pad: usize) -> usize {
    let (got_topic, data_text, _, _) = split_message(text);
    assert_eq!(got_topic, topic);
    let v: Value = serde_json::from_str(&data_text).expect("JSON data");
    let seq = v["seq"].as_u64().expect("seq") as usize;
    assert_eq!(data_text, padded_data(seq, pad), "data byte for byte");
    seq
}

/// The maximum segment size [`small_window_client`] announces, bytes: the IPv4 minimum.
const SMALL_WINDOW_MSS: u32 = 536;

/// A connection of `user` with a 4 KiB receive buffer, set before connect so the window is
/// small from the start: what it does not read stays queued at the server. Its maximum
/// segment size is small too: the kernel sizes the server socket's send buffer from the
/// segment size (twice the memory of its initial window of segments), which over loopback's
/// 64 KiB segments is about 4 MiB that the server would hand to the kernel unread.
pub fn small_window_client(addr: SocketAddr, project: &str, user: &str) -> Client {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.set_tcp_mss(SMALL_WINDOW_MSS).unwrap();
    sock.connect_timeout(&addr.into(), TIMEOUT).unwrap();
    let stream: TcpStream = sock.into();
    set_timeouts(&stream);
    let jwt = token(project, user).0;
    handshake(stream, ws_request(addr, project, &jwt, Transport::Header)).0
}
