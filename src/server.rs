//! Wiring a node: from its [`Settings`] (and the projects and keys of its config), bind the
//! listeners, start the shards, wait for each to accept, start the API, and hand back the
//! [`ServerHandle`]. It computes nothing from the config itself ([`crate::settings`] does)
//! and knows nothing of signals, systemd or the process ([`crate::lifecycle`],
//! [`crate::system::process`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tracing::info;

use crate::admin::Admin;
use crate::api::{self, ApiHandle};
use crate::auth::Registry;
use crate::config::{Config, ConfigError};
use crate::hub::{Hub, Phase};
use crate::metrics::ShardStats;
use crate::net::listener::{bind_reuseport, probe_free};
use crate::settings::{ApiSettings, Settings};
use crate::shard::{self, ShardSpec, mailbox};
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

/// The host name, for the default node name (`localhost` if it cannot be read).
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into our buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name: String = String::from_utf8_lossy(&buf[..end])
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .collect();
    if rc != 0 || name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

/// Starts a node from a config and returns once every shard listens and the API is up.
///
/// # Errors
/// [`StartError`].
pub fn start(cfg: &Config) -> Result<ServerHandle, StartError> {
    start_with(cfg, Options::default())
}

/// [`start`] with [`Options`]: builds the [`Settings`] and [`wire`]s the node.
///
/// # Errors
/// [`StartError`].
pub fn start_with(cfg: &Config, opts: Options) -> Result<ServerHandle, StartError> {
    let settings = Settings::from_config(cfg)?;
    wire(cfg, &settings, opts)
}

/// Starts a node with `settings` (built from `cfg`): the projects and keys from `cfg` and the
/// state directory, the listeners, the shards, the API. Returns once every shard listens and
/// the API is up; the phase is then Running.
///
/// # Errors
/// [`StartError`].
pub fn wire(cfg: &Config, settings: &Settings, opts: Options) -> Result<ServerHandle, StartError> {
    let store = Store::open(&settings.state_dir)?;
    let state = store.load()?;
    let registry = Registry::build(cfg, &state, None)?;
    info!(state_dir = %settings.state_dir.display(), "state directory");
    let nr_shards = settings.nr_shards;
    let listen_error = |source| StartError::Bind {
        addr: settings.listen,
        source,
    };
    if !settings.handover {
        probe_free(settings.listen).map_err(|source| match source.kind() {
            std::io::ErrorKind::AddrInUse => StartError::ListenInUse {
                addr: settings.listen,
            },
            _ => listen_error(source),
        })?;
    }
    let listeners = bind_reuseport(settings.listen, nr_shards, settings.listen_backlog)
        .map_err(listen_error)?;
    let listen = listeners[0].local_addr().map_err(listen_error)?;
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
        settings.max_connections,
    );
    hub.max_frame_bytes = settings.limits.max_outbound_queue_bytes;
    hub.flow = crate::flow::Flow::new(settings.flow.0, settings.flow.1);
    hub.history = crate::history::History::new(settings.history.0, settings.history.1);
    settings.log_adjustments();
    hub.ip_conns = crate::protection::limiter::ConnCounter::new(
        settings.per_ip.connections,
        settings.per_ip.handshake_burst,
        settings.per_ip.max_pending_handshakes,
    );
    let bridge = match &settings.engine {
        Some(engine) => {
            let node = engine
                .node
                .clone()
                .unwrap_or_else(|| format!("{}:{}", host_name(), listen.port()));
            hub.set_node(&node);
            let (broker, bridge) = crate::broker::redis::RedisBroker::new(
                engine,
                &node,
                hub.interest.clone(),
                hub.registry.clone(),
            );
            hub.broker = Box::new(broker);
            info!(node, prefix = %engine.prefix, "sharing publishes through Redis");
            Some(bridge)
        }
        None => None,
    };
    let hub = Arc::new(hub);
    if let Some(bridge) = bridge {
        let deliver: Arc<dyn crate::broker::Deliver + Send + Sync> = hub.clone();
        bridge
            .spawn(Arc::downgrade(&deliver))
            .map_err(|e| StartError::Shard(format!("engine bridge thread: {e}")))?;
    }
    let cores = if settings.pin_cores {
        core_affinity::get_core_ids()
    } else {
        None
    };
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
            limits: settings.limits.clone(),
            listener,
            inbox,
            core,
            driver: settings.io_driver,
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
    let api_settings = ApiSettings {
        client_port: listen.port(),
        ..settings.api.clone()
    };
    let api = api::start(
        hub.clone(),
        admin.clone(),
        settings.api_listen,
        api_settings,
    )
    .map_err(|source| StartError::Bind {
        addr: settings.api_listen,
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
