//! The settings a running node applies, derived once from its validated config by
//! [`Settings::from_config`]: the shards' [`Limits`], the API's [`ApiSettings`], the trusted
//! proxies (parsed once, shared by every shard), the listeners and the node-wide bounds.
//!
//! Everything computed from the config lives here (rates turned into intervals, shares of a
//! node-wide cap, caps lowered to what the open-files limit allows), so the server only wires
//! what it is given and no other module reads these keys from the config again. Nothing here
//! logs or starts anything: [`Settings::log_adjustments`] says what was lowered, once, at start.
//!
//! A SIGHUP reload validates the re-read file with the same rules ([`Config::validate`]) and
//! changes none of these: every key they come from needs a restart
//! ([`crate::config::restart_only_changes`]), so the settings built at start stay in force.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, ConfigError, IoDriver};
use crate::protection::proxy::TrustedProxies;
use crate::system::hostcheck;

/// What the node applies, from one validated config.
#[derive(Debug, Clone)]
pub struct Settings {
    /// What each shard applies (each shard holds a copy).
    pub limits: Limits,
    /// What the API applies.
    pub api: ApiSettings,
    /// The trusted reverse proxies (`[proxy]`), parsed once: `limits.proxies` is this same
    /// allocation.
    pub proxies: Arc<TrustedProxies>,
    /// Shards to start ([`Config::nr_shards`], resolved once).
    pub nr_shards: usize,
    /// Client WebSocket address (`server.listen`; port 0 is resolved at bind).
    pub listen: SocketAddr,
    /// Listen backlog per shard listener (`server.listen_backlog`).
    pub listen_backlog: u32,
    /// Share the client port with a node already listening there (`server.handover`).
    pub handover: bool,
    /// API address (`server.api_listen`).
    pub api_listen: SocketAddr,
    /// Pin each shard to a core (`server.pin_cores`).
    pub pin_cores: bool,
    /// The shards' I/O driver (`server.io_driver`).
    pub io_driver: IoDriver,
    /// Where API-made projects and keys persist (`server.state_dir` or its default).
    pub state_dir: PathBuf,
    /// Authenticated connections on the node at most (`server.max_connections`; 0 = no cap).
    pub max_connections: usize,
    /// Node-wide bounds per client address.
    pub per_ip: PerIpLimits,
    /// The engine shared with the other nodes of the cluster (`[engine]`); `None`: the node
    /// runs on its own.
    pub engine: Option<EngineSettings>,
    /// Node-wide flow control (`[flow]`): the budget for queued outbound data (the memory
    /// share resolved) and the lag target.
    pub flow: (u64, Duration),
    /// The node's message history: its byte cap (`server.history_max_bytes`) and the most
    /// messages one recovery replays (`server.history_max_replay`).
    pub history: (usize, u64),
    /// `api.max_connections` as configured, before [`ApiSettings::max_connections`] was
    /// lowered to the descriptors the open-files limit leaves the API.
    configured_api_connections: usize,
    /// `Some(bytes)`: `api.max_body_bytes` is over what the outbound queue cap can deliver,
    /// and `bytes` is the largest body that always fits ([`Config::largest_deliverable_body`]).
    largest_deliverable_body: Option<usize>,
}

/// The engine a cluster shares publishes through, from `[engine]`.
#[derive(Clone)]
pub struct EngineSettings {
    /// Where Redis listens, parsed (it may hold a password: never logged).
    pub address: redis::ConnectionInfo,
    /// Prefix of every channel name (`engine.prefix`).
    pub prefix: Arc<str>,
    /// The node's name (`engine.node`); `None`: the host name and the client port, known
    /// once the listener is bound.
    pub node: Option<String>,
    /// `engine.connect_timeout_ms`.
    pub connect_timeout: Duration,
    /// `engine.command_timeout_ms`.
    pub command_timeout: Duration,
    /// `engine.unsubscribe_linger_ms`.
    pub unsubscribe_linger: Duration,
    /// `engine.probe_interval_ms`.
    pub probe_interval: Duration,
}

impl std::fmt::Debug for EngineSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineSettings")
            .field("address", &"<redacted>")
            .field("prefix", &self.prefix)
            .field("node", &self.node)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("unsubscribe_linger", &self.unsubscribe_linger)
            .field("probe_interval", &self.probe_interval)
            .finish()
    }
}

impl EngineSettings {
    /// From a config's `[engine]`.
    ///
    /// # Errors
    /// A broken rule of the section, naming its key.
    pub fn new(e: &crate::config::EngineConfig) -> Result<Self, ConfigError> {
        Ok(Self {
            address: e.validate()?,
            prefix: e.prefix.as_str().into(),
            node: e.node.clone(),
            connect_timeout: Duration::from_millis(e.connect_timeout_ms),
            command_timeout: Duration::from_millis(e.command_timeout_ms),
            unsubscribe_linger: Duration::from_millis(e.unsubscribe_linger_ms),
            probe_interval: Duration::from_millis(e.probe_interval_ms),
        })
    }
}

/// The node-wide bounds per client address, counted across every shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerIpLimits {
    /// Connections (handshakes included) per address (`limits.connections_per_ip`; 0 = off).
    pub connections: u32,
    /// Sockets past `connections` that are still read and answered 429
    /// (`limits.handshake_burst_per_ip`).
    pub handshake_burst: u32,
    /// Handshakes in progress per address (`limits.max_pending_handshakes_per_ip`; 0 = off).
    pub max_pending_handshakes: u32,
}

/// Limits and timings a shard applies, taken from the config once.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Handshake deadline.
    pub handshake_timeout: Duration,
    /// Largest upgrade request.
    pub max_handshake_bytes: usize,
    /// Largest client message.
    pub max_message_bytes: usize,
    /// Outbound queue cap per connection.
    pub max_outbound_queue_bytes: usize,
    /// Explicit subscriptions per connection.
    pub max_topics_per_connection: usize,
    /// Error replies before 1008.
    pub max_bad_requests: u32,
    /// Drain grace period.
    pub drain_timeout: Duration,
    /// Handshakes per second per address (0 = off).
    pub handshakes_per_ip_per_sec: u32,
    /// Handshake burst per address.
    pub handshake_burst_per_ip: u32,
    /// Addresses the handshake limiter remembers.
    pub limiter_max_ips: usize,
    /// Per-connection message limit: microseconds between messages at the sustained rate
    /// (0 = off).
    pub msg_interval_us: u32,
    /// How far ahead of the sustained rate a connection may run (the burst), microseconds.
    pub msg_tolerance_us: u32,
    /// Per-connection `refresh` limit: milliseconds between refreshes at the sustained rate
    /// (0 = off).
    pub refresh_interval_ms: u32,
    /// How far ahead of the sustained refresh rate a connection may run, milliseconds.
    pub refresh_tolerance_ms: u32,
    /// `limits.refreshes_per_conn_per_min` and `limits.refresh_burst_per_conn`, for messages.
    pub refreshes_per_min: u32,
    /// See `refreshes_per_min`.
    pub refresh_burst: u32,
    /// Handshakes this shard may have in progress (its share of
    /// `limits.max_pending_handshakes`); 0 = no cap.
    pub max_pending_handshakes: usize,
    /// Trusted reverse proxies.
    pub proxies: Arc<TrustedProxies>,
    /// A client socket whose descriptor number is at or above this is closed at accept:
    /// the descriptors above it are the API's ([`crate::system::hostcheck::client_fd_ceiling`]). `None`: no limit known.
    pub max_client_fd: Option<u64>,
    /// How the shard submits a batch's sends (`server.write_batch`).
    pub write_batch: crate::config::WriteBatch,
    /// How long a dense fan-out's write waits for more to share it (`server.write_coalesce_ms`).
    pub write_coalesce: Duration,
}

/// Settings of the API.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Largest body.
    pub max_body_bytes: usize,
    /// Requests one key may make per second (`limits.api_requests_per_key_per_sec`); 0 = off.
    pub requests_per_key_per_sec: u32,
    /// Requests one key may make at once (`limits.api_burst_per_key`).
    pub burst_per_key: u32,
    /// Open API connections at most (`api.max_connections`).
    pub max_connections: usize,
    /// Time to receive a request head, counted from when the connection starts waiting for
    /// one (`api.header_read_timeout_ms`).
    pub header_read_timeout: Duration,
    /// Time without a byte moved before a connection is closed (`api.idle_timeout_ms`).
    pub idle_timeout: Duration,
    /// Time to receive a whole request body (`api.body_read_timeout_ms`).
    pub body_read_timeout: Duration,
    /// The client port (`server.listen`'s, the bound one once the node listens): where the
    /// console's live tail connects.
    pub client_port: u16,
}

impl Settings {
    /// Validates `c` and derives everything the node applies from it. Reads the open-files
    /// limit now (raise it first: `process::prepare`).
    ///
    /// # Errors
    /// The first broken rule of the config ([`Config::validate`]), naming its key.
    pub fn from_config(c: &Config) -> Result<Self, ConfigError> {
        let proxies = Arc::new(c.validate_parsing_proxies()?);
        let nr_shards = c.nr_shards();
        let nofile = hostcheck::nofile().map(|(soft, _)| soft);
        let reserve = hostcheck::reserved_fds(c);
        let max_client_fd = nofile.map(|soft| hostcheck::client_fd_ceiling(soft, reserve));
        Ok(Self {
            limits: Limits::new(c, nr_shards, max_client_fd, proxies.clone()),
            api: ApiSettings {
                max_body_bytes: c.api.max_body_bytes,
                requests_per_key_per_sec: c.limits.api_requests_per_key_per_sec,
                burst_per_key: c.limits.api_burst_per_key,
                max_connections: hostcheck::api_connection_cap(
                    nofile,
                    reserve,
                    c.api.max_connections,
                ),
                header_read_timeout: Duration::from_millis(c.api.header_read_timeout_ms),
                idle_timeout: Duration::from_millis(c.api.idle_timeout_ms),
                body_read_timeout: Duration::from_millis(c.api.body_read_timeout_ms),
                client_port: c.server.listen.port(),
            },
            proxies,
            nr_shards,
            listen: c.server.listen,
            listen_backlog: c.server.listen_backlog,
            handover: c.server.handover,
            api_listen: c.server.api_listen,
            pin_cores: c.server.pin_cores,
            io_driver: c.server.io_driver,
            state_dir: c
                .server
                .state_dir
                .clone()
                .unwrap_or_else(crate::store::default_dir),
            max_connections: c.server.max_connections,
            per_ip: PerIpLimits {
                connections: c.limits.connections_per_ip,
                handshake_burst: c.limits.handshake_burst_per_ip,
                max_pending_handshakes: c.limits.max_pending_handshakes_per_ip,
            },
            engine: c.engine.as_ref().map(EngineSettings::new).transpose()?,
            flow: (
                c.flow.budget_bytes(),
                Duration::from_millis(c.flow.max_delivery_lag_ms),
            ),
            history: (c.server.history_max_bytes, c.server.history_max_replay),
            configured_api_connections: c.api.max_connections,
            largest_deliverable_body: c.largest_deliverable_body(),
        })
    }

    /// Warns about the settings that differ from what the config asks: a body cap over what
    /// the outbound queue cap delivers, and API connections lowered to fit the open-files
    /// limit.
    pub fn log_adjustments(&self) {
        if let Some(largest) = self.largest_deliverable_body {
            tracing::warn!(
                api_max_body_bytes = self.api.max_body_bytes,
                ws_max_outbound_queue_bytes = self.limits.max_outbound_queue_bytes,
                "api.max_body_bytes is over what ws.max_outbound_queue_bytes can deliver: a \
                 publish whose frame is over the queue cap is refused with 413 \
                 `message_too_large` (bodies up to {largest} bytes always fit)"
            );
        }
        if self.api.max_connections < self.configured_api_connections {
            tracing::warn!(
                configured = self.configured_api_connections,
                effective = self.api.max_connections,
                "api.max_connections lowered to fit the descriptors the open-files limit leaves \
                 the API (at most half of RLIMIT_NOFILE, less 256 for the node itself); raise \
                 the limit to allow more"
            );
        }
    }
}

/// A shard's share of `limits.max_pending_handshakes` (0 = no cap), and at most of half the
/// client descriptors: idle unauthenticated sockets then never hold every client descriptor,
/// and the eviction at the cap keeps serving newcomers (sockets evicted in a burst close a
/// little later, in the other half).
fn pending_share(c: &Config, nr_shards: usize, max_client_fd: Option<u64>) -> usize {
    let nr_shards = nr_shards.max(1);
    let share = c.limits.max_pending_handshakes.div_ceil(nr_shards);
    let Some(max_fd) = max_client_fd else {
        return share;
    };
    let fd_share = usize::try_from(max_fd / 2)
        .unwrap_or(usize::MAX)
        .div_ceil(nr_shards)
        .max(1);
    if share == 0 {
        fd_share
    } else {
        share.min(fd_share)
    }
}

impl Limits {
    /// From the config, for `nr_shards` shards, client descriptors below `max_client_fd`, and
    /// the parsed `[proxy]` settings.
    fn new(
        c: &Config,
        nr_shards: usize,
        max_client_fd: Option<u64>,
        proxies: Arc<TrustedProxies>,
    ) -> Self {
        // Rounded up: the sustained rate never exceeds the configured one.
        let msg_interval_us = match c.limits.messages_per_conn_per_sec {
            0 => 0,
            rate => 1_000_000u32.div_ceil(rate),
        };
        let refresh_interval_ms = match c.limits.refreshes_per_conn_per_min {
            0 => 0,
            rate => 60_000u32.div_ceil(rate),
        };
        Self {
            heartbeat: Duration::from_millis(c.ws.heartbeat_interval_ms),
            handshake_timeout: Duration::from_millis(c.ws.handshake_timeout_ms),
            max_handshake_bytes: c.ws.max_handshake_bytes,
            max_message_bytes: c.ws.max_message_bytes,
            max_outbound_queue_bytes: c.ws.max_outbound_queue_bytes,
            max_topics_per_connection: c.ws.max_topics_per_connection,
            max_bad_requests: c.ws.max_bad_requests,
            drain_timeout: Duration::from_millis(c.server.drain_timeout_ms),
            handshakes_per_ip_per_sec: c.limits.handshakes_per_ip_per_sec,
            handshake_burst_per_ip: c.limits.handshake_burst_per_ip,
            limiter_max_ips: c.limits.limiter_max_ips,
            max_pending_handshakes: pending_share(c, nr_shards, max_client_fd),
            proxies,
            max_client_fd,
            write_batch: c.server.write_batch,
            write_coalesce: Duration::from_millis(u64::from(c.server.write_coalesce_ms)),
            msg_interval_us,
            // Exactly `burst` messages back to back: the first at the bucket's start, then
            // `burst - 1` intervals ahead. Validation bounds the burst to 60 s of the rate,
            // so this fits a u32.
            msg_tolerance_us: (u64::from(c.limits.message_burst_per_conn.max(1) - 1)
                * u64::from(msg_interval_us))
            .min(u64::from(u32::MAX / 4)) as u32,
            refresh_interval_ms,
            // Validation bounds the burst to 60 minutes of the rate: at most 3.6e6 ms.
            refresh_tolerance_ms: (u64::from(c.limits.refresh_burst_per_conn.max(1) - 1)
                * u64::from(refresh_interval_ms))
            .min(u64::from(u32::MAX / 4)) as u32,
            refreshes_per_min: c.limits.refreshes_per_conn_per_min,
            refresh_burst: c.limits.refresh_burst_per_conn,
        }
    }

    /// Period of the sweep timer.
    pub fn tick(&self) -> Duration {
        (self.heartbeat / 8).clamp(Duration::from_millis(20), Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GCRA parameters allow exactly `burst` events back to back and never more than
    /// `rate` per period sustained, also where the period is not a whole number of intervals:
    /// messages (per second, in microseconds) and refreshes (per minute, in milliseconds).
    #[test]
    fn limits_allow_exactly_the_burst_and_at_most_the_rate() {
        type Set = fn(&mut Config, u32, u32);
        type Get = fn(&Limits) -> (u32, u32);
        let messages: (Set, Get, u32, &[(u32, u32)]) = (
            |c, rate, burst| {
                c.limits.messages_per_conn_per_sec = rate;
                c.limits.message_burst_per_conn = burst;
            },
            |l| (l.msg_interval_us, l.msg_tolerance_us),
            1_000_000,
            &[
                (100, 200),
                (7000, 1000),
                (300, 18_000),
                (400_000, 5),
                (3, 1),
            ],
        );
        let refreshes: (Set, Get, u32, &[(u32, u32)]) = (
            |c, rate, burst| {
                c.limits.refreshes_per_conn_per_min = rate;
                c.limits.refresh_burst_per_conn = burst;
            },
            |l| (l.refresh_interval_ms, l.refresh_tolerance_ms),
            60_000,
            &[(6, 3), (7, 1), (60_000, 100), (1, 60)],
        );
        for (set, get, period, cases) in [messages, refreshes] {
            for &(rate, burst) in cases {
                let mut c = Config::development();
                set(&mut c, rate, burst);
                let (interval, tolerance) = get(&Settings::from_config(&c).unwrap().limits);
                assert_eq!(tolerance / interval + 1, burst, "rate {rate} burst {burst}");
                assert!(period / interval <= rate, "rate {rate}");
            }
            let mut c = Config::development();
            set(&mut c, 0, 1);
            let limits = Settings::from_config(&c).unwrap().limits;
            assert_eq!(get(&limits).0, 0, "0 turns the limit off");
        }
    }

    #[test]
    fn handshakes_in_progress_take_at_most_half_the_client_descriptors() {
        let mut c = Config::development();
        c.limits.max_pending_handshakes = 10_000;
        assert_eq!(pending_share(&c, 2, None), 5_000);
        assert_eq!(pending_share(&c, 2, Some(1_000_000)), 5_000);
        assert_eq!(pending_share(&c, 2, Some(600)), 150);
        c.limits.max_pending_handshakes = 0;
        assert_eq!(pending_share(&c, 2, None), 0, "no cap");
        assert_eq!(pending_share(&c, 2, Some(600)), 150);
    }

    /// The `[proxy]` list is parsed once: every shard's limits hold the settings' own
    /// allocation, and what it parsed is what the config says.
    #[test]
    fn trusted_proxies_are_parsed_once_and_shared() {
        let mut c = Config::development();
        c.proxy.trusted = vec!["10.0.0.0/8".into()];
        c.proxy.proxy_protocol = true;
        let s = Settings::from_config(&c).unwrap();
        assert!(Arc::ptr_eq(&s.proxies, &s.limits.proxies));
        assert!(s.proxies.trusts("10.1.2.3".parse().unwrap()));
        assert!(!s.proxies.trusts("192.0.2.1".parse().unwrap()));
        assert!(s.proxies.proxy_protocol);
    }

    /// Settings are only ever built from a valid config: a bad entry is refused naming its
    /// key, as `check-config` names it.
    #[test]
    fn settings_refuse_an_invalid_config_naming_the_key() {
        let mut c = Config::development();
        c.proxy.trusted = vec!["not-a-net".into()];
        let e = Settings::from_config(&c).unwrap_err().to_string();
        assert!(e.contains("proxy.trusted[0]"), "{e}");
        assert_eq!(
            e,
            c.validate().unwrap_err().to_string(),
            "the same error as validation"
        );
        let mut c = Config::development();
        c.ws.max_message_bytes = 0;
        assert!(Settings::from_config(&c).is_err());
    }

    /// The API's cap is `api.max_connections` unless the open-files limit leaves less, and
    /// every other API setting is the config's own value in its unit.
    #[test]
    fn api_settings_come_from_the_config() {
        let mut c = Config::development();
        c.api.max_body_bytes = 12_345;
        c.api.header_read_timeout_ms = 1_500;
        c.api.idle_timeout_ms = 2_500;
        c.api.body_read_timeout_ms = 3_500;
        c.limits.api_requests_per_key_per_sec = 7;
        c.limits.api_burst_per_key = 9;
        let s = Settings::from_config(&c).unwrap();
        assert_eq!(s.api.max_body_bytes, 12_345);
        assert_eq!(s.api.header_read_timeout, Duration::from_millis(1_500));
        assert_eq!(s.api.idle_timeout, Duration::from_millis(2_500));
        assert_eq!(s.api.body_read_timeout, Duration::from_millis(3_500));
        assert_eq!(
            (s.api.requests_per_key_per_sec, s.api.burst_per_key),
            (7, 9)
        );
        assert_eq!(
            s.api.max_connections,
            hostcheck::api_connection_cap(
                hostcheck::nofile().map(|(soft, _)| soft),
                hostcheck::reserved_fds(&c),
                c.api.max_connections
            )
        );
        assert!(s.api.max_connections <= c.api.max_connections);
    }
}
