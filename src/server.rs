//! Starting and stopping a node: shards, listeners, the API, and the drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tracing::info;

use crate::admin::Admin;
use crate::api::{self, ApiHandle, ApiSettings};
use crate::auth::Registry;
use crate::config::{Config, ConfigError};
use crate::hub::{Hub, Phase};
use crate::metrics::ShardStats;
use crate::net::listener::{bind_reuseport, probe_free};
use crate::shard::{self, Limits, ShardSpec, mailbox};
use crate::store::Store;

/// Capacity of each shard's inbox, in messages; a publish (or batch) that does not fit every
/// shard's inbox is refused whole with 503.
pub const INBOX_CAPACITY: usize = 65_536;
/// Capacity of each shard's inbox in bytes of publications (their data, envelopes and
/// topics): what a lagging shard may hold back (an empty inbox still takes one publish or
/// batch of any size). Past it a publish is refused whole with 503 `busy`, as at
/// [`INBOX_CAPACITY`].
pub const INBOX_MAX_BYTES: usize = 256 << 20;

/// Why the server did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A project or key does not load.
    #[error(transparent)]
    Registry(#[from] crate::auth::RegistryError),
    /// The state directory cannot be used.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Another process already listens on the client address.
    #[error(
        "cannot listen on {addr}: another process already listens there (another herald?); \
         stop it, or start with --handover (server.handover = true) to share the port with it \
         during an upgrade"
    )]
    ListenInUse {
        /// The address.
        addr: SocketAddr,
    },
    /// A shard did not start.
    #[error("{0}")]
    Shard(String),
}

/// How a node was started, beyond its config.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The config file, re-read on SIGHUP (`None` for a config made in code).
    pub config_path: Option<std::path::PathBuf>,
    /// Settings given on the command line, already applied to the config: a reload applies
    /// them to the re-read file too.
    pub overrides: crate::config::Overrides,
}

/// A running node.
pub struct ServerHandle {
    /// Client WebSocket address (the real port when 0 was asked).
    pub listen: SocketAddr,
    /// API address.
    pub api_listen: SocketAddr,
    /// Node-wide handle.
    pub hub: Arc<Hub>,
    /// Project and key management.
    pub admin: Arc<Admin>,
    shards: Vec<std::thread::JoinHandle<()>>,
    api: Option<ApiHandle>,
}

impl ServerHandle {
    /// Starts draining: no new connections, close 1001 to every client. Returns at once;
    /// [`ServerHandle::join`] waits for the end.
    pub fn shutdown(&self) {
        self.hub.drain();
    }

    /// Waits for every shard to finish (after a drain), then stops the API.
    pub fn join(mut self) {
        for t in self.shards.drain(..) {
            let _ = t.join();
        }
        if let Some(api) = self.api.take() {
            api.stop();
        }
        self.hub.set_phase(Phase::Stopped);
    }
}

/// Starts a node from a config and returns once every shard listens and the API is up.
///
/// # Errors
/// [`StartError`].
pub fn start(cfg: &Config) -> Result<ServerHandle, StartError> {
    start_with(cfg, Options::default())
}

/// [`start`] with [`Options`].
///
/// # Errors
/// [`StartError`].
pub fn start_with(cfg: &Config, opts: Options) -> Result<ServerHandle, StartError> {
    cfg.validate()?;
    let state_dir = cfg
        .server
        .state_dir
        .clone()
        .unwrap_or_else(crate::store::default_dir);
    let store = Store::open(&state_dir)?;
    let state = store.load()?;
    let registry = Registry::build(cfg, &state, None)?;
    info!(state_dir = %state_dir.display(), "state directory");
    let nr_shards = cfg.nr_shards();
    if !cfg.server.handover {
        probe_free(cfg.server.listen).map_err(|source| match source.kind() {
            std::io::ErrorKind::AddrInUse => StartError::ListenInUse {
                addr: cfg.server.listen,
            },
            _ => StartError::Bind {
                addr: cfg.server.listen,
                source,
            },
        })?;
    }
    let listeners = bind_reuseport(cfg.server.listen, nr_shards, cfg.server.listen_backlog)
        .map_err(|source| StartError::Bind {
            addr: cfg.server.listen,
            source,
        })?;
    let listen = listeners[0]
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: cfg.server.listen,
            source,
        })?;
    let mut mailboxes = Vec::new();
    let mut inboxes = Vec::new();
    for _ in 0..nr_shards {
        let (m, i) = mailbox::channel(INBOX_CAPACITY, INBOX_MAX_BYTES)
            .map_err(|e| StartError::Shard(format!("eventfd: {e}")))?;
        mailboxes.push(m);
        inboxes.push(i);
    }
    let stats = (0..nr_shards)
        .map(|_| Arc::new(ShardStats::default()))
        .collect();
    let mut hub = Hub::new(
        mailboxes,
        stats,
        Arc::new(ArcSwap::from_pointee(registry)),
        cfg.server.max_connections,
    );
    hub.max_frame_bytes = cfg.ws.max_outbound_queue_bytes;
    if let Some(largest) = cfg.largest_deliverable_body() {
        tracing::warn!(
            api_max_body_bytes = cfg.api.max_body_bytes,
            ws_max_outbound_queue_bytes = cfg.ws.max_outbound_queue_bytes,
            "api.max_body_bytes is over what ws.max_outbound_queue_bytes can deliver: a \
             publish whose frame is over the queue cap is refused with 413 \
             `message_too_large` (bodies up to {largest} bytes always fit)"
        );
    }
    hub.ip_conns = crate::limiter::ConnCounter::new(
        cfg.limits.connections_per_ip,
        cfg.limits.handshake_burst_per_ip,
        cfg.limits.max_pending_handshakes_per_ip,
    );
    let hub = Arc::new(hub);
    let cores = if cfg.server.pin_cores {
        core_affinity::get_core_ids()
    } else {
        None
    };
    let limits = Limits::from_config(cfg);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut shards = Vec::new();
    for (id, (listener, inbox)) in listeners.into_iter().zip(inboxes).enumerate() {
        let core = cores
            .as_ref()
            .filter(|c| !c.is_empty())
            .map(|c| c[id % c.len()]);
        let spec = ShardSpec {
            id: id as u16,
            hub: hub.clone(),
            limits: limits.clone(),
            listener,
            inbox,
            core,
            driver: cfg.server.io_driver,
            ready: ready_tx.clone(),
        };
        shards
            .push(shard::spawn(spec).map_err(|e| StartError::Shard(format!("shard thread: {e}")))?);
    }
    for _ in 0..nr_shards {
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(StartError::Shard(e)),
            Err(_) => {
                return Err(StartError::Shard(
                    "a shard did not start within 30 s".into(),
                ));
            }
        }
    }
    let admin = Arc::new(Admin::new(
        hub.clone(),
        store,
        cfg.clone(),
        state,
        opts.config_path,
        opts.overrides,
    ));
    let api_max_connections = crate::hostcheck::api_connection_cap(
        crate::hostcheck::nofile().map(|(soft, _)| soft),
        crate::hostcheck::reserved_fds(cfg),
        cfg.api.max_connections,
    );
    if api_max_connections < cfg.api.max_connections {
        tracing::warn!(
            configured = cfg.api.max_connections,
            effective = api_max_connections,
            "api.max_connections lowered to fit the descriptors the open-files limit leaves \
             the API (at most half of RLIMIT_NOFILE, less 256 for the node itself); raise \
             the limit to allow more"
        );
    }
    let api = api::start(
        hub.clone(),
        admin.clone(),
        cfg.server.api_listen,
        ApiSettings {
            max_body_bytes: cfg.api.max_body_bytes,
            requests_per_key_per_sec: cfg.limits.api_requests_per_key_per_sec,
            burst_per_key: cfg.limits.api_burst_per_key,
            max_connections: api_max_connections,
            header_read_timeout: Duration::from_millis(cfg.api.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(cfg.api.idle_timeout_ms),
            body_read_timeout: Duration::from_millis(cfg.api.body_read_timeout_ms),
        },
    )
    .map_err(|source| StartError::Bind {
        addr: cfg.server.api_listen,
        source,
    })?;
    let api_listen = api.addr;
    hub.set_phase(Phase::Running);
    info!(%listen, %api_listen, shards = nr_shards, "herald is serving");
    Ok(ServerHandle {
        listen,
        api_listen,
        hub,
        admin,
        shards,
        api: Some(api),
    })
}
