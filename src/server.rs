//! Starting and stopping a node: shards, listeners, the API, and the drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tracing::info;

use crate::api::{self, ApiHandle, ApiSettings};
use crate::auth::Registry;
use crate::config::{Config, ConfigError};
use crate::hub::{Hub, Phase};
use crate::metrics::ShardStats;
use crate::net::listener::bind_reuseport;
use crate::shard::{self, Limits, ShardSpec, mailbox};

/// Capacity of each shard's inbox, in messages; a full inbox answers publishes with 503.
pub const INBOX_CAPACITY: usize = 65_536;

/// Why the server did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A shard did not start.
    #[error("{0}")]
    Shard(String),
}

/// A running node.
pub struct ServerHandle {
    /// Client WebSocket address (the real port when 0 was asked).
    pub listen: SocketAddr,
    /// API address.
    pub api_listen: SocketAddr,
    /// Node-wide handle.
    pub hub: Arc<Hub>,
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
    cfg.validate()?;
    let registry = Registry::from_config(cfg)?;
    let nr_shards = cfg.nr_shards();
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
        let (m, i) = mailbox::channel(INBOX_CAPACITY)
            .map_err(|e| StartError::Shard(format!("eventfd: {e}")))?;
        mailboxes.push(m);
        inboxes.push(i);
    }
    let stats = (0..nr_shards)
        .map(|_| Arc::new(ShardStats::default()))
        .collect();
    let hub = Arc::new(Hub::new(
        mailboxes,
        stats,
        Arc::new(ArcSwap::from_pointee(registry)),
        cfg.server.max_connections,
    ));
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
    let api = api::start(
        hub.clone(),
        cfg.server.api_listen,
        ApiSettings {
            max_body_bytes: cfg.api.max_body_bytes,
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
        shards,
        api: Some(api),
    })
}
