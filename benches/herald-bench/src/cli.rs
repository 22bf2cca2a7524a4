//! The command line. One subcommand per scenario; the options every scenario shares are in
//! [`Common`]. `--alg` already names every JWT algorithm (the server decides which it accepts).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

/// Capacity load generator for herald and its peers.
#[derive(Debug, Parser)]
#[command(name = "herald-bench", version, about, long_about = None)]
pub struct Cli {
    /// The scenario.
    #[command(subcommand)]
    pub command: Command,
}

/// Scenarios.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Hold N idle authenticated connections; report server memory per connection.
    Hold(HoldArgs),
    /// N subscribers of one topic; publish M messages; latency, completion, loss, order.
    Broadcast(BroadcastArgs),
    /// Every connection in its personal topic and a group topic of ~10; publish to the groups.
    Groups(GroupsArgs),
    /// N connections with distinct users; publish to `user.<sub>`.
    Unicast(DeliveryArgs),
    /// Steady connect/disconnect rate; connects per second achieved, failures by reason.
    Churn(ChurnArgs),
    /// Connections per second: connect + upgrade + welcome, then close, flat out.
    Handshake(HandshakeArgs),
    /// N clients of a topic with history leave, M messages are published, all reconnect at
    /// once with `since`: the time until every client has what it missed.
    Recover(RecoverArgs),
    /// (internal) a worker process: spec and commands on stdin, events on stdout.
    #[command(hide = true)]
    Worker {
        /// Runtime threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
}

/// The server under test.
#[derive(Debug, Clone, Copy, ValueEnum, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// herald: `/ws/{project}` with a JWT, subscribe ops, `/api/v1/publish`.
    Herald,
    /// A peer server: `/ws?topic=T`, `POST /publish?topic=T`.
    Peer,
}

/// The client protocol spoken to herald.
#[derive(Debug, Clone, Copy, ValueEnum, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// herald.v1 JSON at `/ws/{project}`.
    #[default]
    HeraldV1,
    /// STOMP 1.2 at `/stomp/{project}`: CONNECT, SUBSCRIBE with a receipt per topic
    /// (`/topic/<t>`, `/user/queue/notice` for `user.<sub>`), MESSAGE deliveries.
    Stomp,
}

/// Options every scenario shares.
#[derive(Debug, Clone, Args, Serialize)]
pub struct Common {
    /// Server under test.
    #[arg(long, value_enum, default_value_t = TargetKind::Herald)]
    pub target: TargetKind,
    /// Client protocol spoken to herald (`--target herald`).
    #[arg(long, value_enum, default_value_t = Protocol::HeraldV1)]
    pub protocol: Protocol,
    /// Client port, `ws://HOST:PORT` [default: from --herald-config, else ws://127.0.0.1:8080
    /// (herald) or ws://127.0.0.1:9000 (peer)].
    #[arg(long)]
    pub url: Option<String>,
    /// Publish API, `http://HOST:PORT` [default: from --herald-config, else
    /// http://127.0.0.1:8081 (herald), or the --url host and port (peer)].
    #[arg(long)]
    pub api: Option<String>,
    /// herald project [default: the first project of --herald-config, else `demo`].
    #[arg(long)]
    pub project: Option<String>,
    /// HMAC secret to sign tokens with [default: the project's first HS* key in
    /// --herald-config, else herald's public development secret].
    #[arg(long, env = "HERALD_BENCH_SECRET", hide_env_values = true)]
    #[serde(skip)]
    pub secret: Option<String>,
    /// JWT algorithm: HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256,
    /// ES384, EdDSA [default: the config key's, else HS256].
    #[arg(long)]
    pub alg: Option<String>,
    /// PEM private key for RS*/PS*/ES*/EdDSA tokens.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// `kid` header of the tokens [default: the config key's].
    #[arg(long)]
    pub kid: Option<String>,
    /// Token lifetime, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub token_ttl_secs: u64,
    /// Bearer key of the publish API [default: the project's api_key, else the admin key of
    /// --herald-config, else herald's development admin key].
    #[arg(long, env = "HERALD_BENCH_API_KEY", hide_env_values = true)]
    #[serde(skip)]
    pub api_key: Option<String>,
    /// herald config file to read the project, its secret, the API key and addresses from.
    #[arg(long)]
    pub herald_config: Option<PathBuf>,
    /// Start this herald binary (`PATH serve [--config FILE] --listen 127.0.0.1:0
    /// --api-listen 127.0.0.1:0`), read its ready line, measure it, and stop it at the end.
    #[arg(long)]
    pub spawn_herald: Option<PathBuf>,
    /// Extra argument for the spawned herald (repeatable), e.g. `--herald-arg=--shards=2`.
    #[arg(long, allow_hyphen_values = true)]
    pub herald_arg: Vec<String>,
    /// Where the spawned herald's stderr goes [default: a file in the temp dir].
    #[arg(long)]
    pub herald_log: Option<PathBuf>,
    /// pid of the server, to measure its memory and CPU (implied by --spawn-herald).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Connections held for the whole run.
    #[arg(short = 'n', long)]
    pub connections: Option<u64>,
    /// Source addresses, round-robin per connection: `127.0.0.2-127.0.0.60` or a comma list.
    #[arg(long)]
    pub source: Option<String>,
    /// Worker processes (0 = connections live in this process). Each worker holds its share
    /// of the connections under its own open-files limit.
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Runtime threads per process [default: cores, divided among workers].
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Connection attempts in flight at once, per worker.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Connections opened per second in total (0 = as fast as the concurrency allows).
    #[arg(long, default_value_t = 0.0)]
    pub connect_rate: f64,
    /// Deadline of one opening (TCP, upgrade, welcome, subscribes), in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub connect_timeout_ms: u64,
    /// Pause after the connect phase before measuring or publishing, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub settle_ms: u64,
    /// Write every figure, the machine and the configuration as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a summary for people (markdown) here.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Write SVG plots into this directory (linked from --markdown).
    #[arg(long)]
    pub plots: Option<PathBuf>,
    /// No progress bars (they are also hidden when stderr is not a terminal).
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Free text recorded with the results (e.g. the tuning profile).
    #[arg(long)]
    pub label: Option<String>,
}

/// `hold`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct HoldArgs {
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
    /// How long to hold the connections after measuring, in seconds (a hold past the
    /// server's heartbeat interval checks that idle connections survive it).
    #[arg(long, default_value_t = 5)]
    pub hold_secs: u64,
}

/// Options of the delivery scenarios.
#[derive(Debug, Clone, Args, Serialize)]
pub struct DeliveryArgs {
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
    /// Messages per topic (rounds). Broadcast publishes M messages; groups M per group;
    /// unicast M per user.
    #[arg(short = 'm', long, default_value_t = 100)]
    pub messages: u64,
    /// Publishes per second in total (0 = flat out: each publisher sends its next request
    /// as soon as the previous one is answered).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Publisher tasks, each with its own API connection; a topic always goes through the
    /// same one, so per-topic order is kept (broadcast uses one).
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Publishes per HTTP request (herald's /api/v1/publish/batch; peers take 1).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Extra bytes of padding in each payload.
    #[arg(long, default_value_t = 0)]
    pub pad_bytes: usize,
    /// After the last publish, how long to wait without a new delivery before counting the
    /// missing ones as lost, in seconds.
    #[arg(long, default_value_t = 10)]
    pub drain_timeout_secs: u64,
}

/// `broadcast`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct BroadcastArgs {
    /// Delivery options.
    #[command(flatten)]
    pub delivery: DeliveryArgs,
    /// The topic every connection subscribes to.
    #[arg(long, default_value = "bench")]
    pub topic: String,
}

/// `groups`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct GroupsArgs {
    /// Delivery options.
    #[command(flatten)]
    pub delivery: DeliveryArgs,
    /// Connections per group topic.
    #[arg(long, default_value_t = 10)]
    pub group_size: u64,
}

/// `churn`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct ChurnArgs {
    /// Shared options (`-n` connections are held throughout, as a base population).
    #[command(flatten)]
    pub common: Common,
    /// New connections per second, in total.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// How long the churn runs, in seconds.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// How long each new connection stays open before it closes, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub hold_ms: u64,
    /// Most churned connections open at once, per worker (more are skipped and counted).
    #[arg(long, default_value_t = 10_000)]
    pub max_inflight: usize,
    /// Distinct users (and so distinct tokens, signed once each) the connections cycle over.
    #[arg(long, default_value_t = 1000)]
    pub token_pool: usize,
}

/// `handshake`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct HandshakeArgs {
    /// Shared options (`-n` connections are held throughout, as a base population).
    #[command(flatten)]
    pub common: Common,
    /// Connection loops at once, in total.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// How long the load runs, in seconds.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Distinct users (and so distinct tokens, signed once each before timing) the
    /// connections cycle over; the server still verifies every token.
    #[arg(long, default_value_t = 1000)]
    pub token_pool: usize,
}

/// `recover`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct RecoverArgs {
    /// herald config file (project, its HS* secret, its API key).
    #[arg(long)]
    pub herald_config: PathBuf,
    /// herald project [default: the first of the config].
    #[arg(long)]
    pub project: Option<String>,
    /// Client port, `ws://HOST:PORT`.
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    pub url: String,
    /// Client port the clients reconnect to, `ws://HOST:PORT` (another node of a cluster,
    /// which recovers them from the stream in Redis) [default: `--url`].
    #[arg(long)]
    pub reconnect_url: Option<String>,
    /// Publish API, `http://HOST:PORT`.
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    pub api: String,
    /// Clients.
    #[arg(short = 'n', long, default_value_t = 10_000)]
    pub connections: u64,
    /// Messages published while they are away.
    #[arg(short = 'm', long, default_value_t = 100)]
    pub messages: u64,
    /// The topic (the project must keep its history).
    #[arg(long, default_value = "bench")]
    pub topic: String,
    /// Clients subscribing at once in the first phase (the reconnect is all at once).
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
}
