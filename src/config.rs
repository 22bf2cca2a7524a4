//! Configuration: one documented struct with a sub-config per module.
//!
//! Flow is `load → parse → validate`: [`Config::load`] reads TOML, serde rejects unknown keys
//! (so a typo names itself), and [`Config::validate`] checks cross-field rules and turns the raw
//! strings into parsed values the core never re-checks. What the running node applies is derived
//! from a validated config once, in [`crate::settings`] (which takes the trusted proxies the
//! validation parsed rather than parsing them again). Secrets may come from files; they are
//! never logged (see the `Debug` impl of [`Secret`]).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// HS256 secret of the embedded development project `demo`. Public on purpose: a server using
/// it refuses to bind anything but loopback.
pub const DEV_SECRET: &str = "herald-dev-secret-do-not-use-in-production";
/// Admin API key of the embedded development default. Same rule as [`DEV_SECRET`].
pub const DEV_ADMIN_KEY: &str = "herald-dev-admin";
/// Project of the embedded development default.
pub const DEV_PROJECT: &str = "demo";
/// Default of `projects[].max_token_lifetime_secs`: 30 days.
pub const DEFAULT_MAX_TOKEN_LIFETIME_SECS: u64 = 30 * 24 * 3600;
/// Largest `projects[].max_token_lifetime_secs`: 10 years.
pub const MAX_TOKEN_LIFETIME_SECS: u64 = 10 * 365 * 24 * 3600;
/// Largest `server.write_coalesce_ms`: a wait longer than this is latency, not coalescing.
pub const MAX_WRITE_COALESCE_MS: u32 = 100;

/// Everything herald reads at start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Listeners, shards, shutdown.
    pub server: ServerConfig,
    /// The client (WebSocket) port: limits, heartbeats, deadlines.
    pub ws: WsConfig,
    /// The HTTP API port.
    pub api: ApiConfig,
    /// Logging.
    pub log: LogConfig,
    /// Node-wide IP allow and deny lists (reloaded on SIGHUP).
    pub access: AccessConfig,
    /// Rate limits and concurrency caps.
    pub limits: LimitsConfig,
    /// Trusted reverse proxies (client address from `X-Forwarded-For` or PROXY protocol).
    pub proxy: ProxyConfig,
    /// The engine several nodes share publishes through (`[engine]`); absent, the node runs
    /// on its own.
    pub engine: Option<EngineConfig>,
    /// Tenants. At least one is required.
    pub projects: Vec<ProjectConfig>,
    /// Node-wide flow control: the budget for queued outbound data and the lag target.
    pub flow: crate::flow::FlowConfig,
}

/// The engine nodes of one cluster share publishes through.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// The engine. Only `redis` (Redis 7.0 or later) today.
    #[serde(rename = "type")]
    pub kind: EngineKind,
    /// Where the engine listens: `redis://[USER[:PASSWORD]@]HOST[:PORT][/DB]`,
    /// `rediss://...` (TLS), or `unix:///path/to/redis.sock` (`redis+unix://` too). Never
    /// logged (it may hold a password). Default `redis://127.0.0.1:6379/0`.
    pub url: String,
    /// With `rediss://`: a PEM file of the certificate authorities the server's certificate
    /// must chain to. Default: none, the system's trusted roots.
    pub tls_ca_file: Option<PathBuf>,
    /// With `rediss://`: the node's client certificate chain (PEM), for a Redis that
    /// requires one (`tls-auth-clients yes`); needs `tls_key_file`. Default: none.
    pub tls_cert_file: Option<PathBuf>,
    /// With `rediss://`: the private key (PEM) of `tls_cert_file`. Default: none.
    pub tls_key_file: Option<PathBuf>,
    /// With `rediss://`: accept any server certificate, unverified (a test bench only: it
    /// lets anyone on the path read and forge the traffic). Default false.
    pub tls_insecure: bool,
    /// Prefix of every channel name, so several clusters share one Redis. Printable ASCII
    /// without spaces, 1 to 64 bytes. Default `herald:`.
    pub prefix: String,
    /// This node's name in the cluster, unique among its nodes: it starts every message id
    /// the node makes. `A-Z a-z 0-9 . _ : -`, 1 to 64 bytes. Default: the host name and
    /// the client port (`host:8080`).
    pub node: Option<String>,
    /// Longest wait for a connection to the engine, milliseconds. Default 2000.
    pub connect_timeout_ms: u64,
    /// Longest wait for the engine's answer to a command (a publish waits for it before it
    /// is acknowledged), milliseconds. Default 1000.
    pub command_timeout_ms: u64,
    /// How long the node stays subscribed to a topic's channel after its last local
    /// subscriber leaves, so a topic that comes and goes does not churn, milliseconds.
    /// Default 1000.
    pub unsubscribe_linger_ms: u64,
    /// After this long without a message from Redis, the node publishes a probe on its own
    /// channel and reconnects when the probe does not come back within
    /// `command_timeout_ms` (a subscription that no longer receives, e.g. after a failover),
    /// milliseconds. Default 2000.
    pub probe_interval_ms: u64,
}

/// The engines herald can share publishes through.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// Redis PUB/SUB.
    #[default]
    Redis,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            kind: EngineKind::Redis,
            url: "redis://127.0.0.1:6379/0".into(),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_insecure: false,
            prefix: "herald:".into(),
            node: None,
            connect_timeout_ms: 2000,
            command_timeout_ms: 1000,
            unsubscribe_linger_ms: 1000,
            probe_interval_ms: 2000,
        }
    }
}

impl fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EngineConfig")
            .field("kind", &self.kind)
            .field("url", &"<redacted>")
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("tls_insecure", &self.tls_insecure)
            .field("prefix", &self.prefix)
            .field("node", &self.node)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("command_timeout_ms", &self.command_timeout_ms)
            .field("unsubscribe_linger_ms", &self.unsubscribe_linger_ms)
            .field("probe_interval_ms", &self.probe_interval_ms)
            .finish()
    }
}

impl EngineConfig {
    /// Checks the section; `Ok` holds the parsed address.
    ///
    /// # Errors
    /// The first broken rule, naming its key (`engine.url`, ...). The URL itself is never
    /// quoted: it may hold a password.
    pub fn validate(&self) -> Result<redis::ConnectionInfo, ConfigError> {
        use redis::IntoConnectionInfo;
        let scheme = self.url.split_once("://").map(|(s, _)| s);
        let info = match scheme {
            Some("redis" | "unix" | "redis+unix") => {
                self.url.as_str().into_connection_info().map_err(|e| {
                    invalid(
                        "engine.url",
                        format!(
                            "not a usable Redis address ({}: {}); expected \
                             redis[s]://[USER[:PASSWORD]@]HOST[:PORT][/DB] or unix:///PATH",
                            e.category(),
                            e.detail().unwrap_or("no detail")
                        ),
                    )
                })?
            }
            Some("rediss") => crate::broker::tls::address(&crate::broker::tls::TlsSettings {
                url: &self.url,
                tls_ca_file: self.tls_ca_file.as_deref(),
                tls_cert_file: self.tls_cert_file.as_deref(),
                tls_key_file: self.tls_key_file.as_deref(),
                tls_insecure: self.tls_insecure,
            })
            .map_err(|(key, why)| invalid(key, why))?,
            _ => {
                return Err(invalid(
                    "engine.url",
                    "expected redis[s]://[USER[:PASSWORD]@]HOST[:PORT][/DB] or unix:///PATH",
                ));
            }
        };
        if scheme != Some("rediss") {
            let tls = [
                ("engine.tls_ca_file", self.tls_ca_file.is_some()),
                ("engine.tls_cert_file", self.tls_cert_file.is_some()),
                ("engine.tls_key_file", self.tls_key_file.is_some()),
                ("engine.tls_insecure", self.tls_insecure),
            ];
            if let Some((key, _)) = tls.iter().find(|(_, set)| *set) {
                return Err(invalid(*key, "only with a rediss:// engine.url"));
            }
        }
        if self.prefix.is_empty()
            || self.prefix.len() > 64
            || !self.prefix.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(invalid(
                "engine.prefix",
                "1 to 64 printable ASCII characters without spaces",
            ));
        }
        if let Some(node) = &self.node {
            check_node_name(node).map_err(|reason| invalid("engine.node", reason))?;
        }
        for (key, v, min, max) in [
            (
                "engine.connect_timeout_ms",
                self.connect_timeout_ms,
                10,
                60_000,
            ),
            (
                "engine.command_timeout_ms",
                self.command_timeout_ms,
                10,
                60_000,
            ),
            (
                "engine.unsubscribe_linger_ms",
                self.unsubscribe_linger_ms,
                0,
                60_000,
            ),
            (
                "engine.probe_interval_ms",
                self.probe_interval_ms,
                100,
                60_000,
            ),
        ] {
            if !(min..=max).contains(&v) {
                return Err(invalid(
                    key,
                    format!("must be {min} to {max} milliseconds (is {v})"),
                ));
            }
        }
        Ok(info)
    }
}

/// A node name's rules: 1 to 64 of `A-Z a-z 0-9 . _ : -` (it goes into message ids as is).
///
/// # Errors
/// What is wrong with it.
pub fn check_node_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("1 to 64 characters (is {})", name.len()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(format!("`{c}` is not allowed; use A-Z a-z 0-9 . _ : -"));
    }
    Ok(())
}

/// Listeners, shards and shutdown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Client WebSocket address. Port 0 picks a free port (every shard shares it). Default
    /// `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// HTTP API address. Default `127.0.0.1:8081`.
    pub api_listen: SocketAddr,
    /// Number of shards (one pinned thread each), at most 64. 0 = the number of cores this
    /// process may run on (at most 64). Default 0.
    pub shards: usize,
    /// Pin each shard thread to one core. Default true.
    pub pin_cores: bool,
    /// I/O driver: `auto` (io_uring, or epoll with one warning where io_uring is unavailable)
    /// or `legacy` (always epoll). Default `auto`.
    pub io_driver: IoDriver,
    /// How a shard writes what a batch queued: `io_uring` (one send per connection, all
    /// submitted to the shard's ring with one system call) or `sendmsg` (one system call per
    /// connection). `io_uring` falls back to `sendmsg` with one warning where the kernel
    /// refuses a ring. Default `io_uring`.
    pub write_batch: WriteBatch,
    /// How long a shard waits, in milliseconds, before writing a publication that reaches
    /// many connections when its previous such write ended less than two waits earlier, so
    /// that publications arriving meanwhile go out in the same send to each connection.
    /// Sparse fan-outs and publications that reach few connections are not held. 0 = never
    /// wait; at most 100. Default 5.
    pub write_coalesce_ms: u32,
    /// Listen backlog per shard listener. Default 4096.
    pub listen_backlog: u32,
    /// Upper bound on concurrent client connections across all shards; 0 = unlimited.
    /// Default 0.
    pub max_connections: usize,
    /// How long a drain waits for clients to answer close 1001 before dropping them, in
    /// milliseconds. Default 5000.
    pub drain_timeout_ms: u64,
    /// Let the kernel back herald's heap with transparent huge pages. Off by default: idle
    /// connections are many small allocations, and 2 MiB pages inflate resident memory
    /// (measured in docs/capacity.md). Default false.
    pub transparent_huge_pages: bool,
    /// Start even when another process already listens on `listen`, and share the port with
    /// it (SO_REUSEPORT): the kernel then splits new connections between the two. Only for a
    /// zero-downtime upgrade (start the new node with this, then stop the old one); otherwise
    /// a second node on the same address is refused at start. `--handover` sets it.
    /// Default false.
    pub handover: bool,
    /// Where projects and keys made through the API persist. Default: `$STATE_DIRECTORY`
    /// (systemd's StateDirectory=), else `$XDG_STATE_HOME/herald`, else
    /// `$HOME/.local/state/herald`, else `./herald-state`. `--state-dir` overrides.
    pub state_dir: Option<PathBuf>,
    /// Cap on the memory the node's message history holds (`[[projects.history]]`), in
    /// bytes; the oldest messages of any topic are dropped to stay under it. Default
    /// 67108864 (64 MiB).
    pub history_max_bytes: usize,
    /// Most messages one recovery replays; a client that missed more gets
    /// `"recovered":false` (`over_limit`) and nothing. 1 to 100000. Default 1000.
    pub history_max_replay: u64,
}

/// Which monoio driver the shards run.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum IoDriver {
    /// io_uring where the kernel allows it, else epoll.
    #[default]
    Auto,
    /// epoll (monoio's legacy driver).
    Legacy,
}

/// How a shard submits the sends of a batch.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum WriteBatch {
    /// Every send of a batch through the shard's io_uring, one system call per batch.
    #[default]
    #[serde(rename = "io_uring")]
    IoUring,
    /// One `sendmsg` system call per connection.
    #[serde(rename = "sendmsg")]
    Sendmsg,
}

/// The client port.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WsConfig {
    /// The server pings every connection this often and drops a peer that has sent nothing
    /// (not even a pong) by the next ping, in milliseconds. Default 25000.
    pub heartbeat_interval_ms: u64,
    /// A connection must finish the HTTP upgrade within this, in milliseconds. Default 10000.
    pub handshake_timeout_ms: u64,
    /// Largest upgrade request (request line and headers), in bytes. Default 8192.
    pub max_handshake_bytes: usize,
    /// Largest client message (after reassembling fragments), in bytes; larger closes 1009.
    /// Default 65536.
    pub max_message_bytes: usize,
    /// Cap of one connection's outbound queue, in bytes; a connection over it is closed with
    /// 4008 (slow consumer). It is also the largest message frame: a publish whose frame is
    /// larger is refused with 413. Default 1052672 (1 MiB + 4 KiB: the largest default API
    /// body and its frame envelope fit).
    pub max_outbound_queue_bytes: usize,
    /// Explicit subscriptions one connection may hold (the implicit ones do not count).
    /// Default 128.
    pub max_topics_per_connection: usize,
    /// Error replies one connection may earn before it is closed with 1008. Default 20.
    pub max_bad_requests: u32,
}

/// The HTTP API port.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Admin key: acts on every project. Prefer `admin_key_file`.
    pub admin_key: Option<Secret>,
    /// File holding the admin key (trailing whitespace ignored).
    pub admin_key_file: Option<PathBuf>,
    /// Largest request body, in bytes; larger is refused with 413 (from `Content-Length`,
    /// before the body is read). Default 1048576.
    pub max_body_bytes: usize,
    /// Open API connections at most. At the cap, the connection that has waited longest
    /// for a request is closed to admit a new one. Descriptors for this many connections
    /// are kept out of the client port's reach (with 256 more for the node itself; see
    /// `hostcheck::reserved_fds`). Default 768, so the reserve is the 1024 descriptors the
    /// tuning profiles allow for.
    pub max_connections: usize,
    /// Time for a request head to arrive, counted from when the connection starts waiting
    /// for one (on connect and after each response), in ms; then the connection is closed.
    /// Default 10000.
    pub header_read_timeout_ms: u64,
    /// Time without a byte read or written before a connection is closed, in ms.
    /// Default 60000.
    pub idle_timeout_ms: u64,
    /// Time for a whole request body to arrive, in ms; then 408. Default 10000.
    pub body_read_timeout_ms: u64,
}

/// Node-wide IP access lists, checked right after accept, before a byte is read: a refused
/// peer's socket is closed at once, without an HTTP answer. Entries are CIDR networks
/// (`10.0.0.0/8`, `2001:db8::/32`) or single addresses. Deny wins; a non-empty allow list
/// admits only its networks. Reloaded on SIGHUP; open connections are kept.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AccessConfig {
    /// Networks allowed to connect; empty = any. Default empty.
    pub allow: Vec<String>,
    /// Networks refused. Default empty.
    pub deny: Vec<String>,
}

/// Rate limits and concurrency caps. Every limit is on by default (a fresh install is already
/// protected) and 0 turns it off (benchmarks). Per-address rate state is kept per shard, in maps
/// bounded by `limiter_max_ips`; the concurrent-connection count per address is node-wide.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Handshakes one address may make per second, per shard (token bucket refill); over it
    /// the handshake is refused with 429 and `Retry-After`. 0 = off. Default 50.
    pub handshakes_per_ip_per_sec: u32,
    /// Handshakes one address may make at once (bucket size), per shard. Default 100.
    pub handshake_burst_per_ip: u32,
    /// Addresses each shard's handshake limiter remembers; at the cap the oldest is
    /// forgotten. Default 65536.
    pub limiter_max_ips: usize,
    /// Concurrent connections (handshakes included) from one address across the node; over
    /// it the handshake is refused with 429. Up to `handshake_burst_per_ip` more are read and
    /// answered; beyond that a socket from the address is closed at accept, unread.
    /// 0 = off. Default 1000.
    pub connections_per_ip: u32,
    /// Handshakes in progress (accepted, upgrade not finished) across the node; at it (each
    /// shard has an equal share) a new socket is taken and the shard's oldest handshake in
    /// progress is closed unread to make room. 0 = off. Default 10000.
    pub max_pending_handshakes: usize,
    /// Handshakes in progress one address (an IPv6 /64) may hold across the node; beyond it a
    /// socket from the address is closed at accept, unread. Well below
    /// `max_pending_handshakes`, so a few addresses cannot hold every slot. 0 = off.
    /// Default 64.
    pub max_pending_handshakes_per_ip: u32,
    /// Frames (all but close: text, fragments, pings, pongs) one connection may send per
    /// second; over it the connection is closed with 4029. 0 = off. Default 100.
    pub messages_per_conn_per_sec: u32,
    /// Frames one connection may send at once (bucket size). Default 200.
    pub message_burst_per_conn: u32,
    /// `refresh` ops one connection may make per minute (they verify a token; a legitimate
    /// client refreshes once per token lifetime). Over it the op is answered with the error
    /// `rate_limited` and the connection keeps its token. 0 = off. Default 6.
    pub refreshes_per_conn_per_min: u32,
    /// `refresh` ops one connection may make at once (bucket size). Default 3.
    pub refresh_burst_per_conn: u32,
    /// API requests one key (a project's, or the admin key) may make per second; over it 429
    /// with `Retry-After`. 0 = off. Default 1000.
    pub api_requests_per_key_per_sec: u32,
    /// API requests one key may make at once (bucket size). Default 2000.
    pub api_burst_per_key: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            handshakes_per_ip_per_sec: 50,
            handshake_burst_per_ip: 100,
            limiter_max_ips: 65536,
            connections_per_ip: 1000,
            max_pending_handshakes: 10_000,
            max_pending_handshakes_per_ip: 64,
            messages_per_conn_per_sec: 100,
            message_burst_per_conn: 200,
            refreshes_per_conn_per_min: 6,
            refresh_burst_per_conn: 3,
            api_requests_per_key_per_sec: 1000,
            api_burst_per_key: 2000,
        }
    }
}

/// Reverse proxies and load balancers in front of herald whose word on the client address is
/// trusted. From any other peer, `X-Forwarded-For` is ignored and a PROXY header is refused.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Proxy networks (CIDR or single addresses). Default empty: trust no one.
    pub trusted: Vec<String>,
    /// Connections from a trusted proxy begin with a PROXY protocol header (v1 or v2) naming
    /// the client. When false, the client is the right-most `X-Forwarded-For` address that is
    /// not itself a trusted proxy. Default false.
    pub proxy_protocol: bool,
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (human-readable) or `json` (journald, log shippers). Default `text`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `herald=debug`. `RUST_LOG` overrides it.
    /// Default `info`.
    pub level: String,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// One tenant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProjectConfig {
    /// Project id, `[a-z0-9_-]{1,64}`.
    pub id: String,
    /// API key acting on this project only. Prefer `api_key_file`.
    pub api_key: Option<Secret>,
    /// File holding the API key.
    pub api_key_file: Option<PathBuf>,
    /// Token verification keys; several may be valid at once (chosen by `kid`). At most 32
    /// per project, counting the JWKS and keys added through the API.
    pub keys: Vec<KeyConfig>,
    /// Refuse tokens without `exp`. Default true.
    pub require_exp: bool,
    /// Clock leeway for `exp`/`nbf`/`iat`, in seconds, at most 300. Default 30.
    pub leeway_secs: u64,
    /// Longest token lifetime accepted: a token whose `exp` is more than this (plus
    /// `leeway_secs`) ahead of now is refused, at the handshake and by `refresh`, in seconds.
    /// Default 2592000 (30 days); at most 315360000 (10 years).
    pub max_token_lifetime_secs: u64,
    /// When set, tokens must carry this `iss`.
    pub issuer: Option<String>,
    /// When set, tokens must carry this `aud`.
    pub audience: Option<String>,
    /// Let clients use the `publish` op. Default false.
    pub allow_client_publish: bool,
    /// A disabled project refuses handshakes with 403. Default true.
    pub enabled: bool,
    /// Cap on this project's connections (503 at the cap); 0 = none. Default 0.
    pub max_connections: usize,
    /// Browser origins allowed to connect (exact `scheme://host[:port]`); empty = any.
    /// Default empty.
    pub allowed_origins: Vec<String>,
    /// Client networks allowed to connect to this project (CIDR or address); empty = any
    /// (within the global `[access]` lists). Others get 403 `forbidden`. Default empty.
    pub allow_ips: Vec<String>,
    /// Client networks refused by this project with 403 `forbidden`; wins over `allow_ips`.
    /// Default empty.
    pub deny_ips: Vec<String>,
    /// Inline JWKS document (JSON) with more verification keys; every key needs a `kid`.
    pub jwks: Option<String>,
    /// File holding a JWKS document.
    pub jwks_file: Option<PathBuf>,
    /// Topics whose recent messages the node keeps for recovery (`[[projects.history]]`);
    /// the first entry whose pattern covers a topic applies. Empty (no history) by default.
    pub history: Vec<HistoryConfig>,
}

/// History of the topics a pattern covers (`[[projects.history]]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// A topic name, or a prefix ending in `*` (as in the `topics` claim); `all` and
    /// `user.*` are allowed. Required.
    pub topics: String,
    /// Most messages kept per topic, 1 to 100000. Default 100.
    pub size: usize,
    /// How long a message is kept, in seconds, 1 to 604800 (a week). Default 300.
    pub ttl_secs: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            topics: String::new(),
            size: 100,
            ttl_secs: 300,
        }
    }
}

/// Most messages a `[[projects.history]]` entry keeps per topic.
pub const MAX_HISTORY_SIZE: usize = 100_000;
/// Longest `[[projects.history]]` TTL: a week, in seconds.
pub const MAX_HISTORY_TTL_SECS: u64 = 604_800;

/// One verification key.
#[derive(Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct KeyConfig {
    /// Key id matched against the token header's `kid`. A token without `kid` is tried
    /// against every key of its algorithm, when the project has at most 4 of them; with more,
    /// it is refused (401).
    pub kid: Option<String>,
    /// `HS256/384/512` (secret), `RS256/384/512`, `PS256/384/512`, `ES256/384`, `EdDSA`
    /// (public key PEM).
    pub alg: String,
    /// The HMAC secret. Prefer `secret_file`.
    pub secret: Option<Secret>,
    /// File holding the HMAC secret.
    pub secret_file: Option<PathBuf>,
    /// Public key, PEM (`-----BEGIN PUBLIC KEY-----`).
    pub pem: Option<String>,
    /// File holding the PEM public key.
    pub pem_file: Option<PathBuf>,
}

/// A string that never prints.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiConfig")
            .field("admin_key", &self.admin_key)
            .field("admin_key_file", &self.admin_key_file)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_connections", &self.max_connections)
            .field("header_read_timeout_ms", &self.header_read_timeout_ms)
            .field("idle_timeout_ms", &self.idle_timeout_ms)
            .field("body_read_timeout_ms", &self.body_read_timeout_ms)
            .finish()
    }
}

impl fmt::Debug for KeyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyConfig")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("secret", &self.secret)
            .field("secret_file", &self.secret_file)
            .field("pem_file", &self.pem_file)
            .finish_non_exhaustive()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("literal address"),
            api_listen: "127.0.0.1:8081".parse().expect("literal address"),
            shards: 0,
            pin_cores: true,
            io_driver: IoDriver::Auto,
            write_batch: WriteBatch::IoUring,
            write_coalesce_ms: 5,
            listen_backlog: 4096,
            max_connections: 0,
            drain_timeout_ms: 5000,
            transparent_huge_pages: false,
            handover: false,
            state_dir: None,
            history_max_bytes: 64 << 20,
            history_max_replay: 1000,
        }
    }
}

impl Default for WsConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 25_000,
            handshake_timeout_ms: 10_000,
            max_handshake_bytes: 8192,
            max_message_bytes: 65_536,
            max_outbound_queue_bytes: (1 << 20) + 4096,
            max_topics_per_connection: 128,
            max_bad_requests: 20,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            admin_key: None,
            admin_key_file: None,
            max_body_bytes: 1 << 20,
            max_connections: 768,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            body_read_timeout_ms: 10_000,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

impl Default for ProjectConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            api_key: None,
            api_key_file: None,
            keys: Vec::new(),
            require_exp: true,
            leeway_secs: 30,
            max_token_lifetime_secs: DEFAULT_MAX_TOKEN_LIFETIME_SECS,
            issuer: None,
            audience: None,
            allow_client_publish: false,
            enabled: true,
            max_connections: 0,
            allowed_origins: Vec::new(),
            allow_ips: Vec::new(),
            deny_ips: Vec::new(),
            jwks: None,
            jwks_file: None,
            history: Vec::new(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            ws: WsConfig::default(),
            api: ApiConfig {
                max_body_bytes: 1 << 20,
                ..ApiConfig::default()
            },
            log: LogConfig::default(),
            access: AccessConfig::default(),
            limits: LimitsConfig::default(),
            proxy: ProxyConfig::default(),
            engine: None,
            projects: Vec::new(),
            flow: crate::flow::FlowConfig::default(),
        }
    }
}

/// What is wrong with a configuration. Every variant names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML or schema error (unknown key, wrong type); the message names the key and line.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// serde's message, which names the key.
        message: String,
    },
    /// A value breaks a rule.
    #[error("invalid `{key}`: {reason}")]
    Invalid {
        /// Dotted path of the key, e.g. `projects[0].keys[1].alg`.
        key: String,
        /// What is wrong and what to do.
        reason: String,
    },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

impl Config {
    /// The embedded development default: loopback ports 8080/8081, project `demo` with the
    /// public [`DEV_SECRET`], admin key [`DEV_ADMIN_KEY`].
    pub fn development() -> Self {
        Self {
            api: ApiConfig {
                admin_key: Some(Secret(DEV_ADMIN_KEY.into())),
                ..ApiConfig::default()
            },
            projects: vec![ProjectConfig {
                id: DEV_PROJECT.into(),
                keys: vec![KeyConfig {
                    kid: Some("dev".into()),
                    alg: "HS256".into(),
                    secret: Some(Secret(DEV_SECRET.into())),
                    ..KeyConfig::default()
                }],
                ..ProjectConfig::default()
            }],
            ..Self::default()
        }
    }

    /// Reads and parses a TOML file (without validating it).
    ///
    /// # Errors
    /// [`ConfigError::Read`] or [`ConfigError::Parse`], naming the file and the key.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses TOML text.
    ///
    /// # Errors
    /// Where the error is (line and column), the key when known, and what is wrong; never
    /// the text of the line or the offending value, which may be a secret (see
    /// [`describe_toml_error`]).
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| describe_toml_error(text, e))
    }

    /// Whether a public development secret is configured anywhere.
    pub fn uses_dev_keys(&self) -> bool {
        !self.dev_key_users().is_empty()
    }

    /// What uses a public development secret, for the warning: `project `p``, `admin key
    /// `herald-dev-admin``.
    pub fn dev_key_users(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .projects
            .iter()
            .filter(|p| {
                p.keys
                    .iter()
                    .any(|k| k.secret.as_ref().is_some_and(|s| s.0 == DEV_SECRET))
            })
            .map(|p| format!("project `{}`", p.id))
            .collect();
        if self
            .api
            .admin_key
            .as_ref()
            .is_some_and(|k| k.0 == DEV_ADMIN_KEY)
        {
            out.push(format!("admin key `{DEV_ADMIN_KEY}`"));
        }
        out
    }

    /// Number of shards to start: `server.shards`, or the cores this process may use, at most
    /// [`crate::route::MAX_SHARDS`] (one bit each in the interest table's masks).
    pub fn nr_shards(&self) -> usize {
        if self.server.shards > 0 {
            return self.server.shards;
        }
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(crate::route::MAX_SHARDS)
    }

    /// `Some(bytes)` when `api.max_body_bytes` is larger than what `ws.max_outbound_queue_bytes`
    /// can deliver: publishes whose delivery frame is over the queue cap are then refused with
    /// 413, and `bytes` is the largest body that is always deliverable. A delivery frame is
    /// the data and topic the body carries plus at most
    /// [`crate::ws::frame::MESSAGE_FRAME_OVERHEAD`] bytes, so a body up to the queue cap minus that
    /// overhead always fits.
    pub fn largest_deliverable_body(&self) -> Option<usize> {
        let fits = self
            .ws
            .max_outbound_queue_bytes
            .saturating_sub(crate::ws::frame::MESSAGE_FRAME_OVERHEAD);
        (self.api.max_body_bytes > fits).then_some(fits)
    }

    /// Checks every rule that serde cannot.
    ///
    /// # Errors
    /// The first broken rule, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_parsing_proxies().map(drop)
    }

    /// [`Config::validate`], handing back the trusted proxies it parsed on the way, so that
    /// [`crate::settings::Settings::from_config`] does not parse them a second time.
    ///
    /// # Errors
    /// The first broken rule, naming its key.
    pub(crate) fn validate_parsing_proxies(
        &self,
    ) -> Result<crate::protection::proxy::TrustedProxies, ConfigError> {
        if self.uses_dev_keys() {
            for (key, addr) in [
                ("server.listen", self.server.listen),
                ("server.api_listen", self.server.api_listen),
            ] {
                if !addr.ip().is_loopback() {
                    return Err(invalid(
                        key,
                        format!(
                            "{addr} is not a loopback address and the public development keys are \
                             configured; generate real secrets with `herald genconfig`"
                        ),
                    ));
                }
            }
        }
        if self.server.write_coalesce_ms > MAX_WRITE_COALESCE_MS {
            return Err(invalid(
                "server.write_coalesce_ms",
                format!("at most {MAX_WRITE_COALESCE_MS}"),
            ));
        }
        if self.server.shards > crate::route::MAX_SHARDS {
            return Err(invalid(
                "server.shards",
                "at most 64 shards (one bit each in the interest table)",
            ));
        }
        let ws = &self.ws;
        let positive = [
            (
                "ws.heartbeat_interval_ms",
                ws.heartbeat_interval_ms as usize,
            ),
            ("ws.handshake_timeout_ms", ws.handshake_timeout_ms as usize),
            ("ws.max_message_bytes", ws.max_message_bytes),
            ("ws.max_outbound_queue_bytes", ws.max_outbound_queue_bytes),
            ("api.max_body_bytes", self.api.max_body_bytes),
            ("api.max_connections", self.api.max_connections),
            (
                "api.header_read_timeout_ms",
                self.api.header_read_timeout_ms as usize,
            ),
            ("api.idle_timeout_ms", self.api.idle_timeout_ms as usize),
            (
                "api.body_read_timeout_ms",
                self.api.body_read_timeout_ms as usize,
            ),
            ("server.listen_backlog", self.server.listen_backlog as usize),
            (
                "limits.handshake_burst_per_ip",
                self.limits.handshake_burst_per_ip as usize,
            ),
            ("limits.limiter_max_ips", self.limits.limiter_max_ips),
            (
                "limits.message_burst_per_conn",
                self.limits.message_burst_per_conn as usize,
            ),
            (
                "limits.refresh_burst_per_conn",
                self.limits.refresh_burst_per_conn as usize,
            ),
            (
                "limits.api_burst_per_key",
                self.limits.api_burst_per_key as usize,
            ),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if ws.max_handshake_bytes < 256 {
            return Err(invalid("ws.max_handshake_bytes", "must be at least 256"));
        }
        if ws.max_message_bytes > 64 << 20 {
            return Err(invalid("ws.max_message_bytes", "at most 64 MiB"));
        }
        if self.api.max_body_bytes > 1 << 30 {
            return Err(invalid("api.max_body_bytes", "at most 1 GiB"));
        }
        if self.api.admin_key.is_some() && self.api.admin_key_file.is_some() {
            return Err(invalid(
                "api.admin_key",
                "set admin_key or admin_key_file, not both",
            ));
        }
        let ranges_ms = [
            (
                "ws.heartbeat_interval_ms",
                ws.heartbeat_interval_ms,
                100,
                1_800_000,
            ),
            (
                "ws.handshake_timeout_ms",
                ws.handshake_timeout_ms,
                100,
                300_000,
            ),
            (
                "server.drain_timeout_ms",
                self.server.drain_timeout_ms,
                0,
                3_600_000,
            ),
        ];
        for (key, v, min, max) in ranges_ms {
            if !(min..=max).contains(&v) {
                return Err(invalid(
                    key,
                    format!("must be {min} to {max} milliseconds (is {v})"),
                ));
            }
        }
        let l = &self.limits;
        // Both per-connection limiters: a bounded rate, and a burst of at most 60 periods'
        // worth of it (keeps the GCRA tolerance far from its clock's wrap).
        rate_and_burst(
            (
                "limits.messages_per_conn_per_sec",
                l.messages_per_conn_per_sec,
                1_000_000,
            ),
            ("limits.message_burst_per_conn", l.message_burst_per_conn),
            "60 seconds' worth of messages_per_conn_per_sec",
        )?;
        rate_and_burst(
            (
                "limits.refreshes_per_conn_per_min",
                l.refreshes_per_conn_per_min,
                60_000,
            ),
            ("limits.refresh_burst_per_conn", l.refresh_burst_per_conn),
            "60 minutes' worth of refreshes_per_conn_per_min",
        )?;
        crate::protection::access::IpList::parse(&self.access.allow, &self.access.deny)
            .map_err(|(key, reason)| invalid(format!("access.{key}"), reason))?;
        let proxies = crate::protection::proxy::TrustedProxies::new(
            &self.proxy.trusted,
            self.proxy.proxy_protocol,
        )
        .map_err(|(key, reason)| invalid(format!("proxy.{key}"), reason))?;
        if let Some(engine) = &self.engine {
            engine.validate()?;
        }
        self.validate_history()?;
        if self.projects.is_empty() {
            return Err(invalid(
                "projects",
                "at least one [[projects]] entry is required",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, p) in self.projects.iter().enumerate() {
            let at = format!("projects[{i}]");
            validate_project(&at, p)?;
            if !seen.insert(p.id.as_str()) {
                return Err(invalid(
                    format!("{at}.id"),
                    format!("duplicate project id `{}`", p.id),
                ));
            }
        }
        Ok(proxies)
    }
}

/// Most verification keys one project may have, counting its config `keys`, its JWKS and the
/// keys added through the API: each key costs a parse and a probe on every change to the
/// project and room in the state file, and 32 leave room for rotations across many issuers.
pub const MAX_KEYS_PER_PROJECT: usize = 32;

/// The development config with `nr_keys` keys in its project (`dev`, then copies of it as
/// `k1`, `k2`...), for tests of the key cap.
#[cfg(test)]
pub(crate) fn development_with_keys(nr_keys: usize) -> Config {
    let mut c = Config::development();
    let base = c.projects[0].keys[0].clone();
    for n in 1..nr_keys {
        let mut k = base.clone();
        k.kid = Some(format!("k{n}"));
        c.projects[0].keys.push(k);
    }
    c
}

/// Largest `projects[].leeway_secs`: more would let a token outlive its `exp` by too much.
pub const MAX_LEEWAY_SECS: u64 = 300;

/// Settings given on the command line of `herald serve`: they win over the file, at start and
/// at every reload.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    /// `--listen`: `server.listen`.
    pub listen: Option<SocketAddr>,
    /// `--api-listen`: `server.api_listen`.
    pub api_listen: Option<SocketAddr>,
    /// `--shards`: `server.shards`.
    pub shards: Option<usize>,
    /// `--state-dir`: `server.state_dir`.
    pub state_dir: Option<PathBuf>,
    /// `--handover`: `server.handover = true`.
    pub handover: bool,
}

impl Overrides {
    /// Puts the command-line values into `cfg`.
    pub fn apply(&self, cfg: &mut Config) {
        let s = &mut cfg.server;
        if let Some(a) = self.listen {
            s.listen = a;
        }
        if let Some(a) = self.api_listen {
            s.api_listen = a;
        }
        if let Some(n) = self.shards {
            s.shards = n;
        }
        if let Some(d) = &self.state_dir {
            s.state_dir = Some(d.clone());
        }
        if self.handover {
            s.handover = true;
        }
    }
}

/// What a SIGHUP reload applies: whole sections, or single `section.key`s.
const RELOADED: &[&str] = &["projects", "access", "api.admin_key", "api.admin_key_file"];

/// The keys whose value differs between the running config and a re-read one among those a
/// running node cannot change: everything but the projects, the admin key and the `[access]`
/// lists (see [`keep_restart_only_settings`]). Dotted names, e.g. `ws.max_message_bytes`,
/// in file order of sections.
pub fn restart_only_changes(running: &Config, new: &Config) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(running), serde_json::to_value(new))
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    // serde_json's map is sorted; list the sections in the struct's (and genconfig's) order.
    let order = [
        "server", "ws", "api", "access", "limits", "proxy", "log", "engine", "flow", "projects",
    ];
    let mut sections: Vec<&String> = a.keys().collect();
    sections.sort_by_key(|s| order.iter().position(|o| o == s).unwrap_or(order.len()));
    for section in sections {
        if RELOADED.contains(&section.as_str()) {
            continue;
        }
        match (&a[section], b.get(section)) {
            (serde_json::Value::Object(x), Some(serde_json::Value::Object(y))) => {
                for (key, value) in x {
                    let name = format!("{section}.{key}");
                    if !RELOADED.contains(&name.as_str()) && y.get(key) != Some(value) {
                        out.push(name);
                    }
                }
            }
            (x, y) if Some(x) != y => out.push(section.clone()),
            _ => {}
        }
    }
    out
}

/// Makes a re-read config the one in force: the running config with what a reload applies
/// (projects, `[access]`, the admin key) taken from the file. Every other setting keeps its
/// running value, so the config in force says what the node really runs with (and a later
/// reload of the same file names the same pending changes).
pub fn keep_restart_only_settings(running: &Config, new: &mut Config) {
    let mut kept = running.clone();
    kept.projects = std::mem::take(&mut new.projects);
    kept.access = std::mem::take(&mut new.access);
    kept.api.admin_key = new.api.admin_key.take();
    kept.api.admin_key_file = new.api.admin_key_file.take();
    *new = kept;
}

/// A limiter's rate (`(key, value, max)`) is at most `max`, and its burst (`(key, value)`) at
/// most 60 periods of the rate (`window` says so in the error) when the rate is on.
fn rate_and_burst(
    (rate_key, rate, max): (&str, u32, u32),
    (burst_key, burst): (&str, u32),
    window: &str,
) -> Result<(), ConfigError> {
    if rate > max {
        return Err(invalid(rate_key, format!("at most {max}")));
    }
    if rate > 0 && burst > rate.saturating_mul(60) {
        return Err(invalid(burst_key, format!("at most {window}")));
    }
    Ok(())
}

/// Checks one project's settings; `at` names it in errors (e.g. `projects[2]`).
///
/// # Errors
/// The first broken rule, naming its key.
pub fn validate_project(at: &str, p: &ProjectConfig) -> Result<(), ConfigError> {
    for (i, h) in p.history.iter().enumerate() {
        validate_history_entry(&format!("{at}.history[{i}]"), h)?;
    }
    crate::pubsub::ProjectId::parse(&p.id)
        .map_err(|e| invalid(format!("{at}.id"), e.to_string()))?;
    if p.api_key.is_some() && p.api_key_file.is_some() {
        return Err(invalid(
            format!("{at}.api_key"),
            "set api_key or api_key_file, not both",
        ));
    }
    if p.leeway_secs > MAX_LEEWAY_SECS {
        return Err(invalid(
            format!("{at}.leeway_secs"),
            format!("at most {MAX_LEEWAY_SECS} seconds (is {})", p.leeway_secs),
        ));
    }
    if !(1..=MAX_TOKEN_LIFETIME_SECS).contains(&p.max_token_lifetime_secs) {
        return Err(invalid(
            format!("{at}.max_token_lifetime_secs"),
            format!("between 1 and {MAX_TOKEN_LIFETIME_SECS} (10 years)"),
        ));
    }
    if p.keys.len() > MAX_KEYS_PER_PROJECT {
        return Err(invalid(
            format!("{at}.keys"),
            format!(
                "{} keys, more than {MAX_KEYS_PER_PROJECT} (the most a project may have, with \
                 its JWKS and the keys added through the API)",
                p.keys.len()
            ),
        ));
    }
    let mut kids = std::collections::HashSet::new();
    for (j, k) in p.keys.iter().enumerate() {
        let at = format!("{at}.keys[{j}]");
        crate::auth::keys::parse_alg(&k.alg)
            .map_err(|e| invalid(format!("{at}.alg"), e.to_string()))?;
        let given = [
            k.secret.is_some(),
            k.secret_file.is_some(),
            k.pem.is_some(),
            k.pem_file.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(invalid(
                format!("{at}.secret"),
                "give exactly one of secret, secret_file, pem or pem_file",
            ));
        }
        if let Some(kid) = &k.kid
            && !kids.insert(kid.as_str())
        {
            return Err(invalid(
                format!("{at}.kid"),
                format!("duplicate kid `{kid}` in this project"),
            ));
        }
    }
    if p.jwks.is_some() && p.jwks_file.is_some() {
        return Err(invalid(
            format!("{at}.jwks"),
            "set jwks or jwks_file, not both",
        ));
    }
    crate::protection::access::IpList::parse(&p.allow_ips, &p.deny_ips).map_err(
        |(key, reason)| {
            let key = key
                .replacen("allow", "allow_ips", 1)
                .replacen("deny[", "deny_ips[", 1);
            invalid(format!("{at}.{key}"), reason)
        },
    )?;
    for (j, o) in p.allowed_origins.iter().enumerate() {
        if !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
            return Err(invalid(
                format!("{at}.allowed_origins[{j}]"),
                "an origin is scheme://host[:port] with no path or trailing slash",
            ));
        }
    }
    Ok(())
}

/// A TOML or schema error as `line L, column C, key `K`: what is wrong`.
///
/// The toml crate's own rendering quotes the offending source line, and serde's messages
/// quote the offending value (`invalid type: string "..."`): either may be a secret, and
/// these messages reach stderr and the journal. This keeps the position, the key (from the
/// error's path, else the bare key in front of `=` on that line) and the kind of mistake.
pub fn describe_toml_error(text: &str, mut e: toml::de::Error) -> String {
    let span = e.span();
    let message = crate::redact::redact_values(e.message());
    // Without the input, the crate renders the message and the key path (`in `a.b``) only.
    e.set_input(None);
    let rendered = e.to_string();
    let mut key = rendered
        .lines()
        .filter_map(|l| l.strip_prefix("in `")?.strip_suffix('`'))
        .next_back()
        .map(str::to_owned);
    let mut out = String::new();
    if let Some(span) = span {
        let start = span.start.min(text.len());
        let before = &text.as_bytes()[..start];
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = String::from_utf8_lossy(&before[line_start..])
            .chars()
            .count()
            + 1;
        out = format!("line {line}, column {column}");
        if key.is_none() {
            let rest = &text[line_start..];
            let source_line = rest.split('\n').next().unwrap_or_default();
            // Only a name herald knows: the line may be inside a multi-line string (a PEM,
            // a secret) whose text merely contains `=`.
            key = source_line
                .split_once('=')
                .map(|(k, _)| k.trim())
                .filter(|k| is_config_key(k))
                .map(str::to_owned);
        }
    }
    if let Some(key) = key {
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push_str(&format!("key `{key}`"));
    }
    if out.is_empty() {
        message
    } else {
        format!("{out}: {message}")
    }
}

/// Whether every dotted part of `name` is a section or key name of the config.
fn is_config_key(name: &str) -> bool {
    fn collect(v: &serde_json::Value, names: &mut std::collections::HashSet<String>) {
        if let serde_json::Value::Object(m) = v {
            for (k, v) in m {
                names.insert(k.clone());
                collect(v, names);
            }
        }
    }
    let mut names = std::collections::HashSet::new();
    let samples = [
        serde_json::to_value(Config::default()),
        serde_json::to_value(ProjectConfig::default()),
        serde_json::to_value(KeyConfig::default()),
    ];
    for v in samples.into_iter().flatten() {
        collect(&v, &mut names);
    }
    !name.is_empty() && name.split('.').all(|part| names.contains(part.trim()))
}

/// Reads a document (a PEM, a JWKS) given inline or by file, as it is.
///
/// # Errors
/// The file cannot be read.
pub fn read_inline_or_file(
    inline: &Option<String>,
    file: &Option<PathBuf>,
) -> Result<Option<String>, ConfigError> {
    match (inline, file) {
        (Some(text), _) => Ok(Some(text.clone())),
        (None, Some(path)) => {
            std::fs::read_to_string(path)
                .map(Some)
                .map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })
        }
        (None, None) => Ok(None),
    }
}

/// Shortest API or admin key, in bytes: a bearer key is the whole credential, so it must not
/// be guessable. (`herald genconfig` makes 32-byte keys; the development admin key has 16.)
pub const MIN_API_KEY_BYTES: usize = 16;

/// Reads an API or admin key given inline or by file, and checks its length.
///
/// # Errors
/// As [`read_secret`], or the key is shorter than [`MIN_API_KEY_BYTES`].
pub fn read_api_key(
    key: &str,
    inline: &Option<Secret>,
    file: &Option<PathBuf>,
) -> Result<Option<String>, ConfigError> {
    let k = read_secret(key, inline, file)?;
    if let Some(k) = &k
        && k.len() < MIN_API_KEY_BYTES
    {
        return Err(invalid(
            key,
            format!(
                "API keys must be at least {MIN_API_KEY_BYTES} bytes (this one has {})",
                k.len()
            ),
        ));
    }
    Ok(k)
}

/// Reads a secret given inline or by file.
///
/// # Errors
/// The file cannot be read, or is empty.
pub fn read_secret(
    key: &str,
    inline: &Option<Secret>,
    file: &Option<PathBuf>,
) -> Result<Option<String>, ConfigError> {
    if let Some(s) = inline {
        return Ok(Some(s.0.clone()));
    }
    let Some(path) = file else { return Ok(None) };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let text = text.trim_end().to_owned();
    if text.is_empty() {
        return Err(invalid(key, format!("{} is empty", path.display())));
    }
    Ok(Some(text))
}

/// A commented production configuration with fresh random secrets (`herald genconfig`).
pub fn production_template() -> String {
    let admin = random_secret();
    let api = random_secret();
    let hmac = random_secret();
    let d = Config::default();
    format!(
        r#"# herald configuration (generated by `herald genconfig`).
# Every key is optional. Each value shown is the default, except where a comment says
# "Chosen here": the public listen address, the secrets and the project.
# Secrets below are fresh random values: keep this file readable by herald only (0600),
# or move them to files and use the *_file keys instead.

[server]
# Client WebSocket address; every shard listens on it with SO_REUSEPORT.
# Chosen here: every interface (the default, 127.0.0.1:8080, is loopback only).
listen = "0.0.0.0:8080"
# HTTP API address for project backends and operators. Keep it off the public internet.
api_listen = "127.0.0.1:8081"
# Shards (pinned threads, one io_uring runtime each), at most 64. 0 = one per available core.
shards = 0
pin_cores = true
# "auto" = io_uring (falls back to epoll with a warning), or "legacy" = always epoll.
io_driver = "auto"
# "io_uring" = a batch's sends submitted to the shard's ring with one system call (falls back
# to sendmsg with a warning), or "sendmsg" = one system call per connection.
write_batch = "io_uring"
# Milliseconds a shard waits before writing a publication to many connections when its
# previous such write was less than two waits ago (dense fan-out), so publications arriving
# meanwhile share one send per connection; 0 = never.
write_coalesce_ms = 5
listen_backlog = {backlog}
# Concurrent client connections across all shards; 0 = unlimited (bounded by RLIMIT_NOFILE).
max_connections = 0
# Grace period for clients to answer close 1001 on shutdown, in milliseconds.
drain_timeout_ms = {drain}
# Transparent huge pages for herald's heap: off keeps idle connections lean.
transparent_huge_pages = false
# Share the client port with a node already listening on it (an upgrade in place); without
# it, such a start is refused. Prefer `herald serve --handover` for that one start.
handover = false
# Where projects and keys created through the API persist (systemd: StateDirectory=herald).
# state_dir = "/var/lib/herald"

[ws]
# The server pings every connection this often; a peer silent until the next ping is dropped.
heartbeat_interval_ms = {hb}
# Deadline for finishing the HTTP upgrade.
handshake_timeout_ms = {hs}
max_handshake_bytes = {mhb}
# Largest client message; larger closes the connection with 1009.
max_message_bytes = {mmb}
# Outbound queue cap per connection; a reader that falls this far behind is closed with 4008.
# Also the largest message frame: keep it at least api.max_body_bytes + 114, or larger
# publishes are refused with 413 message_too_large.
max_outbound_queue_bytes = {moq}
max_topics_per_connection = {mtc}
# Error replies before a connection is closed with 1008.
max_bad_requests = {mbr}

[api]
# Admin key: acts on every project. Or: admin_key_file = "/etc/herald/admin.key"
# Chosen here: a fresh random key (default: none, and the admin API refuses every request).
admin_key = "{admin}"
# Largest request body; a larger Content-Length is answered 413 before the body is read.
max_body_bytes = {mbb}
# Open API connections at most (at the cap the one waiting longest for a request is closed);
# their descriptors, and 256 more, are kept out of the client port's reach.
max_connections = {amc}
# Deadlines: a request head (also closes idle keep-alive connections), no byte moved at
# all, a whole body (408 after it).
header_read_timeout_ms = {hrt}
idle_timeout_ms = {ito}
body_read_timeout_ms = {brt}

[access]
# Node-wide IP lists (CIDR or single addresses, IPv4 and IPv6), checked right after accept:
# a refused peer's socket is closed without an answer. Deny wins; a non-empty allow list
# admits only its networks. Reloaded on SIGHUP.
allow = []
deny = []

[limits]
# Per source address and per shard: handshakes per second (0 = off) and burst; over it 429.
handshakes_per_ip_per_sec = {hps}
handshake_burst_per_ip = {hbu}
# Addresses each shard's limiter remembers (the oldest is forgotten at the cap).
limiter_max_ips = {lmi}
# Concurrent connections from one address across the node (0 = off); over it 429.
connections_per_ip = {cpi}
# Handshakes in progress across the node; at it the oldest is closed to make room.
max_pending_handshakes = {mph}
# Handshakes in progress one address (IPv6: one /64) may hold; beyond it closed unread.
max_pending_handshakes_per_ip = {mpi}
# Frames (all but close) per connection per second and burst; over it close 4029.
messages_per_conn_per_sec = {mpc}
message_burst_per_conn = {mbc}
# `refresh` ops per connection per minute (0 = off) and burst; over it the error rate_limited.
refreshes_per_conn_per_min = {rpm}
refresh_burst_per_conn = {rbc}
# API requests per key per second and burst; over it 429 with Retry-After.
api_requests_per_key_per_sec = {arp}
api_burst_per_key = {abk}

[proxy]
# Reverse proxies / load balancers whose word on the client address is trusted (CIDR).
# From them the client address is the right-most X-Forwarded-For entry that is not a proxy,
# or, with proxy_protocol = true, the PROXY protocol (v1/v2) header they must send first.
trusted = []
proxy_protocol = false

[log]
# "text" for people, "json" for journald and log shippers.
format = "text"
level = "info"

# A cluster: nodes with the same Redis url and prefix share every publish (Redis 7.0+).
# Without this section the node runs on its own. The url may hold a password: keep this
# file private.
# [engine]
# type = "redis"
# url = "redis://herald:PASSWORD@10.0.0.5:6379/0"   # or "unix:///run/redis/redis.sock"
# prefix = "herald:"
# node = "web1:8080"                                 # default: host name and client port

# Node-wide flow control: publishes are refused 503 `overloaded` while the outbound data
# queued on the node (every connection's queue plus the shards' inboxes) is at this budget,
# or while a shard with publications waiting lags further behind them.
[flow]
max_queued_bytes = 0        # 0 = an eighth of the node's memory (MemTotal or cgroup limit)
max_delivery_lag_ms = 500

# Chosen here: one project, `main` (there is no default project; at least one is required),
# with a fresh random API key and HMAC key. The other project keys show their defaults.
[[projects]]
id = "main"
# API key for this project's backend (publishes to this project only).
api_key = "{api}"
require_exp = true
leeway_secs = 30
# Tokens whose exp is further ahead than this (plus the leeway) are refused; 30 days.
max_token_lifetime_secs = {mtl}
# issuer = "https://auth.example.com"
# audience = "herald"
allow_client_publish = false
enabled = true
# Cap on this project's connections; 0 = none.
max_connections = 0
# Browser origins allowed to connect; empty = any.
allowed_origins = []
# Client networks for this project (403 otherwise); deny wins.
allow_ips = []
deny_ips = []
# More keys as a JWKS (every key needs a kid): jwks_file = "/etc/herald/main.jwks.json"

# Chosen here: key `k1`, HS256 with a fresh random secret.
[[projects.keys]]
kid = "k1"
alg = "HS256"
secret = "{hmac}"

# An asymmetric key: the backend signs with its private key, herald holds the public one.
# [[projects.keys]]
# kid = "k2"
# alg = "ES256"
# pem_file = "/etc/herald/main-k2.pub.pem"
"#,
        backlog = d.server.listen_backlog,
        drain = d.server.drain_timeout_ms,
        hb = d.ws.heartbeat_interval_ms,
        hs = d.ws.handshake_timeout_ms,
        mhb = d.ws.max_handshake_bytes,
        mmb = d.ws.max_message_bytes,
        moq = d.ws.max_outbound_queue_bytes,
        mtc = d.ws.max_topics_per_connection,
        mbr = d.ws.max_bad_requests,
        mbb = d.api.max_body_bytes,
        amc = d.api.max_connections,
        hrt = d.api.header_read_timeout_ms,
        ito = d.api.idle_timeout_ms,
        brt = d.api.body_read_timeout_ms,
        hps = d.limits.handshakes_per_ip_per_sec,
        hbu = d.limits.handshake_burst_per_ip,
        lmi = d.limits.limiter_max_ips,
        cpi = d.limits.connections_per_ip,
        mph = d.limits.max_pending_handshakes,
        mpi = d.limits.max_pending_handshakes_per_ip,
        mpc = d.limits.messages_per_conn_per_sec,
        mbc = d.limits.message_burst_per_conn,
        rpm = d.limits.refreshes_per_conn_per_min,
        rbc = d.limits.refresh_burst_per_conn,
        mtl = DEFAULT_MAX_TOKEN_LIFETIME_SECS,
        arp = d.limits.api_requests_per_key_per_sec,
        abk = d.limits.api_burst_per_key,
    )
}

/// 32 random bytes, URL-safe base64 (no padding).
pub fn random_secret() -> String {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// `value` (of `key`, in `unit`) is within 1..=`max`.
fn between_1_and(key: String, value: u64, max: u64, unit: &str) -> Result<(), ConfigError> {
    if (1..=max).contains(&value) {
        return Ok(());
    }
    Err(invalid(
        key,
        format!("between 1 and {max} {unit} (is {value})"),
    ))
}

/// One `[[projects.history]]` entry's rules.
fn validate_history_entry(at: &str, h: &HistoryConfig) -> Result<(), ConfigError> {
    let name = h.topics.strip_suffix('*').unwrap_or(&h.topics);
    let valid = h.topics == "*"
        || crate::pubsub::Topic::parse(name).is_ok()
        || name.ends_with('.') && crate::pubsub::Topic::parse(&name[..name.len() - 1]).is_ok();
    if h.topics.is_empty() || !valid {
        return Err(invalid(
            format!("{at}.topics"),
            "a topic name, or a prefix ending in `*` (`news.*`, `user.*`, `all`)",
        ));
    }
    between_1_and(
        format!("{at}.size"),
        h.size as u64,
        MAX_HISTORY_SIZE as u64,
        "messages",
    )?;
    between_1_and(
        format!("{at}.ttl_secs"),
        h.ttl_secs,
        MAX_HISTORY_TTL_SECS,
        "seconds",
    )?;
    Ok(())
}

impl Config {
    /// `server.history_*`.
    fn validate_history(&self) -> Result<(), ConfigError> {
        between_1_and(
            "server.history_max_replay".into(),
            self.server.history_max_replay,
            MAX_HISTORY_SIZE as u64,
            "messages",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[engine]`: the defaults are valid, every bad value is refused naming its key and
    /// never quoting the address, and changing it needs a restart.
    #[test]
    fn engine_settings_are_validated_and_need_a_restart() {
        let ok = |e: &EngineConfig| e.validate().map(drop);
        let d = EngineConfig::default();
        ok(&d).unwrap();
        for url in [
            "redis://127.0.0.1",
            "redis://:pw@10.0.0.5:6380/3",
            "redis://herald:pw@host/0",
            "unix:///run/redis/redis.sock",
            "redis+unix:///run/redis.sock?db=2",
            "rediss://:pw@redis.example:6380/1",
        ] {
            ok(&EngineConfig {
                url: url.into(),
                ..EngineConfig::default()
            })
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        }
        type Tweak = fn(&mut EngineConfig);
        let cases: [(Tweak, &str); 11] = [
            (|e| e.url = "http://secret@h".into(), "engine.url"),
            (
                |e| e.url = "rediss://secret@h#insecure".into(),
                "engine.url",
            ),
            (
                |e| e.tls_ca_file = Some("/ca.pem".into()),
                "engine.tls_ca_file",
            ),
            (
                |e| {
                    e.url = "rediss://secret@h".into();
                    e.tls_insecure = true;
                    e.tls_ca_file = Some("/ca.pem".into());
                },
                "engine.tls_insecure",
            ),
            (
                |e| {
                    e.url = "rediss://secret@h".into();
                    e.tls_cert_file = Some("/cert.pem".into());
                },
                "engine.tls_key_file",
            ),
            (|e| e.url = "redis://secret@h/x".into(), "engine.url"),
            (|e| e.prefix = String::new(), "engine.prefix"),
            (|e| e.prefix = "a b".into(), "engine.prefix"),
            (|e| e.node = Some("é".into()), "engine.node"),
            (|e| e.connect_timeout_ms = 5, "engine.connect_timeout_ms"),
            (
                |e| e.unsubscribe_linger_ms = 60_001,
                "engine.unsubscribe_linger_ms",
            ),
        ];
        for (tweak, key) in cases {
            let mut e = EngineConfig::default();
            tweak(&mut e);
            let err = ok(&e).unwrap_err().to_string();
            assert!(err.starts_with(&format!("invalid `{key}`")), "{err}");
            assert!(!err.contains("secret"), "{err}");
            let mut c = Config::development();
            c.engine = Some(e);
            assert_eq!(c.validate().unwrap_err().to_string(), err);
        }
        assert!(
            !format!("{d:?}").contains("6379"),
            "Debug hides the address"
        );
        let mut c = Config::development();
        let running = c.clone();
        c.engine = Some(d);
        assert_eq!(restart_only_changes(&running, &c), ["engine"]);
    }

    #[test]
    fn development_default_validates() {
        Config::development().validate().unwrap();
    }

    #[test]
    fn template_parses_and_validates() {
        let c = Config::parse(&production_template()).unwrap();
        c.validate().unwrap();
        assert_eq!(c.projects[0].id, "main");
        assert!(!c.uses_dev_keys());
        assert!(
            c.engine.is_none(),
            "a node on its own unless [engine] is uncommented"
        );
        // The commented [engine] example, uncommented, is a valid section.
        let mut in_engine = false;
        let uncommented: String = production_template()
            .lines()
            .map(|l| {
                in_engine = (in_engine || l == "# [engine]") && !l.is_empty();
                match l.strip_prefix("# ") {
                    Some(rest) if in_engine => format!("{rest}\n"),
                    _ => format!("{l}\n"),
                }
            })
            .collect();
        let engine = Config::parse(&uncommented).unwrap().engine.unwrap();
        engine.validate().unwrap();
        assert_eq!(engine.node.as_deref(), Some("web1:8080"));
    }

    /// Every value genconfig writes is the default, or is under a comment saying it is chosen.
    #[test]
    fn genconfig_marks_every_value_that_is_not_the_default() {
        let text = production_template();
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        let project = toml::Value::try_from(ProjectConfig::default()).unwrap();
        let key = toml::Value::try_from(KeyConfig::default()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let mut section = String::new();
        // "Chosen here" in the comments right above a value, or right above its section.
        let mut above = false;
        let mut section_chosen = false;
        let mut marked = 0;
        for line in &lines {
            let line = line.trim();
            if line.starts_with('#') {
                above |= line.contains("Chosen here");
                continue;
            }
            let chosen = std::mem::take(&mut above);
            if line.is_empty() {
                continue;
            }
            if line.starts_with('[') {
                section = line.trim_matches(|c| c == '[' || c == ']').to_owned();
                section_chosen = chosen;
                continue;
            }
            let (k, v) = line.split_once(" = ").expect("key = value");
            let value: toml::Table = toml::from_str(&format!("v = {v}")).unwrap();
            let default = match section.as_str() {
                "projects" => project.get(k),
                "projects.keys" => key.get(k),
                s => defaults.get(s).and_then(|t| t.get(k)),
            };
            if default != value.get("v") {
                assert!(
                    chosen || section_chosen,
                    "{section}.{k} = {v} is not the default and not marked"
                );
                marked += 1;
            }
        }
        // listen, admin_key, the project's id and api_key, the key's kid, alg and secret.
        assert_eq!(marked, 7);
        assert!(text.starts_with("# herald configuration"));
    }

    #[test]
    fn partial_sections_keep_defaults() {
        let c = Config::parse("[api]\nadmin_key = \"k\"\n[ws]\nmax_message_bytes = 10\n").unwrap();
        assert_eq!(c.api.max_body_bytes, 1 << 20);
        assert_eq!(c.ws.heartbeat_interval_ms, 25_000);
        assert_eq!(c.ws.max_message_bytes, 10);
    }

    #[test]
    fn the_default_body_limit_is_deliverable_through_the_default_queue() {
        let mut c = Config::default();
        assert_eq!(c.largest_deliverable_body(), None);
        c.ws.max_outbound_queue_bytes = 1 << 20;
        assert_eq!(
            c.largest_deliverable_body(),
            Some((1 << 20) - crate::ws::frame::MESSAGE_FRAME_OVERHEAD)
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[ws]\nmax_mesage_bytes = 3\n").unwrap_err();
        assert!(err.contains("max_mesage_bytes"), "{err}");
    }

    #[test]
    fn parse_errors_give_the_position_and_key_but_never_the_value() {
        // A syntax error on a secret's line: the line's text stays out.
        let err = Config::parse("[api]\nadmin_key = \"hunter2-secret\" x\n").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.starts_with("line 2, column "), "{err}");
        assert!(err.contains("key `admin_key`"), "{err}");
        // A type error quoting the value.
        let text = "[[projects]]\nid = \"p\"\nleeway_secs = \"hunter2-secret\"\n";
        let err = Config::parse(text).unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("line 3, column 15"), "{err}");
        assert!(err.contains("invalid type: string, expected u64"), "{err}");
        assert!(err.contains("leeway_secs"), "{err}");
        // A secret given as a number.
        let err = Config::parse("[api]\nadmin_key = 987654321\n").unwrap_err();
        assert!(!err.contains("987654321"), "{err}");
        assert!(err.contains("invalid type: integer"), "{err}");
        // A line inside a multi-line string is not taken for a key.
        let text = "[api]\nadmin_key = \"\"\"\nhunter2secret=\\q\n\"\"\"\n";
        let err = Config::parse(text).unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.starts_with("line 3, column 16: "), "{err}");
        // An enum value.
        let err = Config::parse("[log]\nformat = \"hunter2-secret\"\n").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("unknown variant, expected"), "{err}");
    }

    /// `server.write_batch` takes `io_uring` (the default) or `sendmsg`, and names both when
    /// given anything else.
    #[test]
    fn write_batch_is_io_uring_or_sendmsg() {
        assert_eq!(Config::default().server.write_batch, WriteBatch::IoUring);
        let c = Config::parse("[server]\nwrite_batch = \"sendmsg\"\n").unwrap();
        assert_eq!(c.server.write_batch, WriteBatch::Sendmsg);
        let c = Config::parse("[server]\nwrite_batch = \"io_uring\"\n").unwrap();
        assert_eq!(c.server.write_batch, WriteBatch::IoUring);
        let err = Config::parse("[server]\nwrite_batch = \"uring\"\n").unwrap_err();
        assert_eq!(
            err,
            "line 2, column 15, key `server.write_batch`: unknown variant, expected `io_uring` \
             or `sendmsg`"
        );
    }

    /// `server.write_coalesce_ms` defaults to 5, takes 0 (never wait) up to 100, and a longer
    /// wait is refused naming the key.
    #[test]
    fn write_coalesce_is_bounded() {
        assert_eq!(Config::default().server.write_coalesce_ms, 5);
        let c = Config::parse("[server]\nwrite_coalesce_ms = 0\n").unwrap();
        assert_eq!(c.server.write_coalesce_ms, 0);
        let mut c = Config::development();
        c.server.write_coalesce_ms = MAX_WRITE_COALESCE_MS;
        c.validate().unwrap();
        c.server.write_coalesce_ms = MAX_WRITE_COALESCE_MS + 1;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "invalid `server.write_coalesce_ms`: at most 100"
        );
    }

    #[test]
    fn serde_json_messages_lose_the_value_too() {
        let e = serde_json::from_str::<KeyConfig>(r#"{"kid": "k", "secret": 987654321}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("987654321"), "serde quotes it: {e}");
        let r = crate::redact::redact_values(&e);
        assert!(!r.contains("987654321"), "{r}");
        assert!(r.starts_with("invalid type: integer, expected"), "{r}");
        assert!(r.ends_with("at line 1 column 32"), "{r}");
        // A value that looks like the message around it.
        let r =
            crate::redact::redact_values(r#"invalid type: string "a, expected b", expected u64"#);
        assert_eq!(r, "invalid type: string, expected u64");
        let r = crate::redact::redact_values(
            "unknown variant `a`b, expected c`, expected `text` or `json`",
        );
        assert_eq!(r, "unknown variant, expected `text` or `json`");
    }

    #[test]
    fn restart_only_changes_are_named() {
        let running = Config::development();
        let mut new = running.clone();
        assert!(restart_only_changes(&running, &new).is_empty());
        new.ws.max_message_bytes += 1;
        new.server.drain_timeout_ms += 1;
        new.api.max_body_bytes += 1;
        new.limits.connections_per_ip += 1;
        new.log.level = "debug".into();
        // Applied by a reload: not named.
        new.api.admin_key = Some(Secret("another-admin-key".into()));
        new.access.deny = vec!["10.0.0.0/8".into()];
        new.projects[0].leeway_secs = 5;
        assert_eq!(
            restart_only_changes(&running, &new),
            [
                "server.drain_timeout_ms",
                "ws.max_message_bytes",
                "api.max_body_bytes",
                "limits.connections_per_ip",
                "log.level",
            ]
        );
        keep_restart_only_settings(&running, &mut new);
        assert!(restart_only_changes(&running, &new).is_empty());
        assert_eq!(new.api.admin_key, Some(Secret("another-admin-key".into())));
        assert_eq!(new.projects[0].leeway_secs, 5);
    }

    #[test]
    fn dev_keys_refuse_public_bind() {
        let mut c = Config::development();
        c.server.listen = "0.0.0.0:8080".parse().unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("server.listen"), "{err}");
    }

    /// One bit per shard in the interest table's masks.
    #[test]
    fn at_most_64_shards() {
        let mut c = Config::development();
        c.server.shards = 64;
        c.validate().unwrap();
        assert_eq!(c.nr_shards(), 64);
        c.server.shards = 65;
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("server.shards") && err.contains("at most 64"),
            "{err}"
        );
        c.server.shards = 0;
        assert!((1..=64).contains(&c.nr_shards()));
    }

    #[test]
    fn bad_alg_is_named() {
        let mut c = Config::development();
        c.projects[0].keys[0].alg = "HS999".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("projects[0].keys[0].alg"), "{err}");
    }

    #[test]
    fn bad_cidrs_are_named() {
        let mut c = Config::development();
        c.access.deny = vec!["10.0.0.0/8".into(), "2001:db8::/200".into()];
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("access.deny[1]"), "{err}");
        let mut c = Config::development();
        c.projects[0].allow_ips = vec!["::1".into(), "nope".into()];
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("projects[0].allow_ips[1]"), "{err}");
    }

    #[test]
    fn a_fresh_install_is_protected() {
        let l = Config::default().limits;
        assert!(l.handshakes_per_ip_per_sec > 0);
        assert!(l.connections_per_ip > 0);
        assert!(l.max_pending_handshakes > 0);
        // A hundred addresses cannot hold every handshake slot.
        assert!(l.max_pending_handshakes_per_ip > 0);
        assert!(l.max_pending_handshakes_per_ip as usize * 100 <= l.max_pending_handshakes);
        assert!(l.messages_per_conn_per_sec > 0);
        assert!(l.api_requests_per_key_per_sec > 0);
        let t = Config::parse(&production_template()).unwrap();
        assert_eq!(t.limits, l, "genconfig writes the defaults");
        assert!(
            Config::default().proxy.trusted.is_empty(),
            "no proxy trusted by default"
        );
    }

    #[test]
    fn limit_rules_are_named() {
        let mut c = Config::development();
        c.limits.messages_per_conn_per_sec = 2;
        c.limits.message_burst_per_conn = 121;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("limits.message_burst_per_conn"), "{err}");
        let mut c = Config::development();
        c.proxy.trusted = vec!["10.0.0.0/8".into(), "10.0.0.0/99".into()];
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("proxy.trusted[1]"), "{err}");
        let mut c = Config::development();
        c.ws.heartbeat_interval_ms = 1_800_001;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("ws.heartbeat_interval_ms"), "{err}");
        let mut c = Config::development();
        c.limits.refreshes_per_conn_per_min = 2;
        c.limits.refresh_burst_per_conn = 121;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("limits.refresh_burst_per_conn"), "{err}");
        c.limits.refresh_burst_per_conn = 0;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("limits.refresh_burst_per_conn"), "{err}");
        for bad in [0, MAX_TOKEN_LIFETIME_SECS + 1] {
            let mut c = Config::development();
            c.projects[0].max_token_lifetime_secs = bad;
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("projects[0].max_token_lifetime_secs"), "{err}");
        }
    }

    /// A huge leeway made every token expired (`now - leeway` wrapped); deadlines out of any
    /// sane range are refused too, each naming its key.
    #[test]
    fn a_project_has_at_most_32_keys() {
        let mut c = development_with_keys(MAX_KEYS_PER_PROJECT);
        assert!(c.validate().is_ok());
        let one_more = c.projects[0].keys[0].clone();
        c.projects[0].keys.push(one_more);
        assert_eq!(
            c.validate().err().map(|e| e.to_string()).as_deref(),
            Some(
                "invalid `projects[0].keys`: 33 keys, more than 32 (the most a project may \
                 have, with its JWKS and the keys added through the API)"
            )
        );
    }

    #[test]
    fn leeway_and_deadlines_are_bounded() {
        type Tweak = fn(&mut Config);
        let cases: [(Tweak, &str); 6] = [
            (
                |c| c.projects[0].leeway_secs = u64::MAX,
                "projects[0].leeway_secs",
            ),
            (
                |c| c.projects[0].leeway_secs = 301,
                "projects[0].leeway_secs",
            ),
            (
                |c| c.ws.handshake_timeout_ms = 300_001,
                "ws.handshake_timeout_ms",
            ),
            (
                |c| c.ws.handshake_timeout_ms = 99,
                "ws.handshake_timeout_ms",
            ),
            (
                |c| c.ws.heartbeat_interval_ms = 99,
                "ws.heartbeat_interval_ms",
            ),
            (
                |c| c.server.drain_timeout_ms = 3_600_001,
                "server.drain_timeout_ms",
            ),
        ];
        for (tweak, key) in cases {
            let mut c = Config::development();
            tweak(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        let mut c = Config::development();
        c.projects[0].leeway_secs = 300;
        c.ws.handshake_timeout_ms = 300_000;
        c.server.drain_timeout_ms = 3_600_000;
        c.validate().unwrap();
    }

    #[test]
    fn bad_project_id_is_named() {
        let mut c = Config::development();
        c.projects[0].id = "Shop!".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("projects[0].id"), "{err}");
    }
}
