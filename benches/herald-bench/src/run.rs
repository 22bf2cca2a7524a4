//! The parent: resolves the target, starts the server if asked, starts the workers, drives
//! the scenario's phases, publishes, measures the server and merges the workers' reports into
//! the results (which `main` writes).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::auth::{self, TokenSpec};
use crate::cli::{Common, TargetKind};
use crate::fleet::Fleet;
use crate::plan::{Kind, Plan, split};
use crate::publish::{self, PublishOpts, PublishReport, PublishStats};
use crate::server;
use crate::stats::{Counts, Summary, add_counts, merge, new_hist, record_ns, total};
use crate::sys::{self, KernelTcp, Machine, ProcMemory, mono_ns};
use crate::target::TargetSpec;
use crate::worker::{
    Cmd, CompletionReport, ConnectReport, DeliveryReport, Event, Load, LoadReport, WorkerSpec,
};

/// A scenario, as the parent runs it.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Which one.
    pub kind: Kind,
    /// Shared options.
    pub common: Common,
    /// The run's shape.
    pub plan: Plan,
    /// Delivery scenarios: how to publish.
    pub delivery: Option<DeliveryOpts>,
    /// hold: seconds to hold after measuring.
    pub hold_secs: u64,
    /// churn/handshake.
    pub load: Option<LoadOpts>,
    /// Scenario options as given, for the report.
    pub args: serde_json::Value,
}

/// Publishing options of a delivery scenario.
#[derive(Debug, Clone)]
pub struct DeliveryOpts {
    /// Publishes per second (0 = flat out).
    pub rate: f64,
    /// Publisher tasks.
    pub publishers: usize,
    /// Publishes per request.
    pub batch: usize,
    /// Payload padding.
    pub pad_bytes: usize,
    /// Quiet time that ends the wait for missing deliveries.
    pub drain_timeout: Duration,
}

/// Churn/handshake options (totals; split among workers).
#[derive(Debug, Clone)]
pub struct LoadOpts {
    /// Churn: new connections per second.
    pub rate: f64,
    /// Handshake: loops at once.
    pub concurrency: usize,
    /// Duration.
    pub duration: Duration,
    /// Churn: time each connection stays.
    pub hold_ms: u64,
    /// Churn: cap of churned connections open at once per worker.
    pub max_inflight: usize,
    /// Distinct users the connections cycle over.
    pub token_pool: usize,
}

/// Where the run went.
#[derive(Debug, Clone, Serialize)]
pub struct TargetInfo {
    /// `herald` or `peer`.
    pub kind: TargetKind,
    /// Client port.
    pub url: String,
    /// Publish API.
    pub api: String,
    /// herald project.
    pub project: Option<String>,
    /// JWT algorithm.
    pub alg: Option<String>,
    /// Shards, from the ready line of a spawned herald.
    pub shards: Option<u64>,
    /// Server pid measured.
    pub server_pid: Option<u32>,
    /// Binary the bench started.
    pub spawned: Option<String>,
    /// Its log.
    pub server_log: Option<String>,
    /// How it exited.
    pub server_exit: Option<String>,
}

/// Connect phase.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ConnectSection {
    /// Attempts.
    pub attempted: u64,
    /// Successes.
    pub connected: u64,
    /// Failures by reason.
    pub failures: Counts,
    /// First attempt to last outcome, seconds.
    pub elapsed_s: f64,
    /// Connections opened per second.
    pub rate_per_s: f64,
    /// Time to open one (TCP + upgrade + welcome + subscribes).
    pub latency: Summary,
}

/// One reading taken while connecting.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MemorySample {
    /// Connections open at the time (as last reported by the workers).
    pub conns: u64,
    /// Server RSS.
    pub server_rss_bytes: Option<u64>,
    /// Kernel slab (system-wide).
    pub kernel_slab_bytes: Option<u64>,
}

/// Least-squares slope of `y` over connections: the marginal cost of one more connection,
/// free of fixed costs (runtime, pre-sized tables). `None` with fewer than 3 distinct counts.
fn slope(samples: &[MemorySample], y: impl Fn(&MemorySample) -> Option<u64>) -> Option<f64> {
    let pts: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| y(s).map(|v| (s.conns as f64, v as f64)))
        .collect();
    let mut xs: Vec<u64> = pts.iter().map(|p| p.0 as u64).collect();
    xs.sort_unstable();
    xs.dedup();
    if xs.len() < 3 {
        return None;
    }
    let n = pts.len() as f64;
    let (mx, my) = (
        pts.iter().map(|p| p.0).sum::<f64>() / n,
        pts.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// Memory before and after the connect phase.
#[derive(Debug, Clone, Serialize)]
pub struct MemorySection {
    /// Readings taken while connecting (every 100 ms), and one after settling.
    pub samples: Vec<MemorySample>,
    /// Marginal server RSS per connection: slope of `samples` (least squares).
    pub server_rss_slope_bytes_per_conn: Option<f64>,
    /// Marginal kernel slab per connection (system-wide, both ends on loopback).
    pub kernel_slab_slope_bytes_per_conn: Option<f64>,
    /// Server process before connecting.
    pub server_before: Option<ProcMemory>,
    /// Server process after connecting (and settling).
    pub server_after: Option<ProcMemory>,
    /// Server process at the end of the hold.
    pub server_after_hold: Option<ProcMemory>,
    /// (after − before) RSS / connections.
    pub server_rss_per_conn_bytes: Option<f64>,
    /// (after − before) anonymous RSS / connections.
    pub server_anon_per_conn_bytes: Option<f64>,
    /// Kernel TCP before.
    pub kernel_before: Option<KernelTcp>,
    /// Kernel TCP after.
    pub kernel_after: Option<KernelTcp>,
    /// (after − before) socket buffer memory / connections.
    pub kernel_tcp_mem_per_conn_bytes: Option<f64>,
    /// (after − before) kernel slab / connections.
    pub kernel_slab_per_conn_bytes: Option<f64>,
    /// RSS of the bench's own processes after connecting.
    pub client_rss_bytes: u64,
    /// How to read the kernel figures.
    pub note: &'static str,
}

/// Held connections at the end.
#[derive(Debug, Clone, Serialize, Default)]
pub struct HeldSection {
    /// Still open when the bench closed them.
    pub open_at_end: u64,
    /// Ended by the server before that: by close code, or `dropped`.
    pub closes: Counts,
    /// Frames that should not have arrived.
    pub unexpected: Counts,
}

/// Deliveries.
#[derive(Debug, Clone, Serialize, Default)]
pub struct DeliverySection {
    /// Expected: connected connections × messages per connection.
    pub expected: u64,
    /// Received.
    pub delivered: u64,
    /// Missing on connections that stayed open (must be 0).
    pub lost_open: u64,
    /// Missing on connections the server closed (see `held.closes`).
    pub lost_closed: u64,
    /// Out of order (must be 0).
    pub reordered: u64,
    /// Connections with a missing delivery.
    pub conns_with_loss: u64,
    /// Publish → receipt.
    pub latency: Summary,
    /// Time until a publish reached all its recipients.
    pub completion: Summary,
    /// Publishes that reached all their recipients.
    pub complete_publishes: u64,
    /// Publishes that did not.
    pub incomplete_publishes: u64,
    /// First publish to last receipt, seconds.
    pub elapsed_s: f64,
    /// Deliveries per second over `elapsed_s`.
    pub delivered_per_s: f64,
    /// Last publish answered to last receipt, seconds: what the server still had queued when
    /// the publisher stopped.
    pub tail_s: f64,
    /// Broadcast: completion of each publish in order, µs (null when incomplete).
    pub per_publish_completion_us: Option<Vec<Option<u64>>>,
}

/// Churn or handshake load.
#[derive(Debug, Clone, Serialize, Default)]
pub struct LoadSection {
    /// Seconds the load ran (first start to last end).
    pub elapsed_s: f64,
    /// Attempts.
    pub attempted: u64,
    /// Connections that became ready.
    pub succeeded: u64,
    /// Failures by reason.
    pub failures: Counts,
    /// Churn: attempts skipped at the in-flight cap.
    pub skipped: u64,
    /// Successful connections per second.
    pub rate_per_s: f64,
    /// Requested rate (churn) or 0 (handshake: flat out).
    pub target_rate_per_s: f64,
    /// Connect → ready.
    pub latency: Summary,
    /// Churned connections the server ended before we did.
    pub early_closes: Counts,
}

/// CPU time spent during the measured phase (publishing + draining, or the load).
#[derive(Debug, Clone, Serialize, Default)]
pub struct CpuSection {
    /// Wall time of the phase, seconds.
    pub phase_s: f64,
    /// Server CPU seconds (user + system) in the phase.
    pub server_s: Option<f64>,
    /// Of `server_s`, the seconds spent in the kernel (system time).
    pub server_system_s: Option<f64>,
    /// Bench CPU seconds (parent and workers) in the phase.
    pub bench_s: Option<f64>,
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// `herald-bench`.
    pub tool: &'static str,
    /// Bench version.
    pub version: &'static str,
    /// Scenario name.
    pub scenario: &'static str,
    /// `--label`.
    pub label: Option<String>,
    /// Start, Unix seconds.
    pub started_unix_s: u64,
    /// Command line (secrets redacted).
    pub command_line: String,
    /// Options, as parsed (secrets left out).
    pub config: serde_json::Value,
    /// The machine.
    pub machine: Machine,
    /// The target.
    pub target: TargetInfo,
    /// Worker processes (0 = in-process).
    pub workers: usize,
    /// Source addresses used.
    pub sources: usize,
    /// Connect phase.
    pub connect: ConnectSection,
    /// Memory.
    pub memory: MemorySection,
    /// Held connections at the end.
    pub held: HeldSection,
    /// Publisher.
    pub publish: Option<PublishReport>,
    /// Deliveries.
    pub delivery: Option<DeliverySection>,
    /// Churn/handshake.
    pub load: Option<LoadSection>,
    /// CPU in the measured phase.
    pub cpu: CpuSection,
    /// Everything that should be zero and was not.
    pub problems: Vec<String>,
    /// Histograms for plots (not serialised).
    #[serde(skip)]
    pub hists: Hists,
}

/// Merged histograms, for plots.
#[derive(Debug, Clone, Default)]
pub struct Hists {
    /// Connect latency.
    pub connect: Option<Histogram<u64>>,
    /// Delivery latency.
    pub latency: Option<Histogram<u64>>,
    /// Completion.
    pub completion: Option<Histogram<u64>>,
    /// Load connect latency.
    pub load: Option<Histogram<u64>>,
}

fn host_port(url: &str) -> Result<String> {
    let rest = url
        .split_once("://")
        .map(|(_, r)| r)
        .with_context(|| format!("{url}: expected scheme://HOST:PORT"))?;
    Ok(rest.split('/').next().unwrap_or(rest).to_owned())
}

async fn resolve(url: &str) -> Result<SocketAddr> {
    let hp = host_port(url)?;
    tokio::net::lookup_host(&hp)
        .await
        .with_context(|| format!("resolving {hp}"))?
        .next()
        .with_context(|| format!("{hp} resolves to nothing"))
}

/// The command line with secrets replaced.
fn redacted_command_line() -> String {
    let mut out = Vec::new();
    let mut hide = false;
    for a in std::env::args() {
        if hide {
            out.push("<redacted>".to_owned());
            hide = false;
            continue;
        }
        if a == "--secret" || a == "--api-key" {
            hide = true;
        }
        if a.starts_with("--secret=") || a.starts_with("--api-key=") {
            let flag = a.split('=').next().unwrap_or_default();
            out.push(format!("{flag}=<redacted>"));
            continue;
        }
        out.push(a);
    }
    out.join(" ")
}

fn bar(mp: &MultiProgress, len: u64, msg: &str) -> ProgressBar {
    let pb = mp.add(ProgressBar::new(len));
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} (eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_message(msg.to_owned());
    pb
}

fn per(delta: i128, n: u64) -> Option<f64> {
    (n > 0).then(|| delta as f64 / n as f64)
}

/// Runs a scenario and writes its outputs; returns the results.
///
/// # Errors
/// Setup failures (unreachable server, bad key, a worker that died).
pub async fn run(sc: Scenario) -> Result<Results> {
    let common = &sc.common;
    let epoch_ns = mono_ns();
    let started_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let machine = sys::machine();
    let quiet = common.quiet || !std::io::stderr().is_terminal();
    let mp = MultiProgress::with_draw_target(if quiet {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    });

    // Target.
    let facts = match &common.herald_config {
        Some(p) if common.target == TargetKind::Herald => {
            Some(auth::read_herald_config(p, common.project.as_deref())?)
        }
        _ => None,
    };
    let spawned = match &common.spawn_herald {
        Some(bin) => {
            if common.target != TargetKind::Herald {
                bail!("--spawn-herald needs --target herald");
            }
            let s = server::spawn(
                bin,
                common.herald_config.as_deref(),
                facts.as_ref().is_some_and(|f| f.state_dir.is_some()),
                &common.herald_arg,
                common.herald_log.as_deref(),
            )
            .await?;
            mp.println(format!(
                "herald started: pid {}, client {}, api {}, {} shards",
                s.pid, s.ready.listen, s.ready.api_listen, s.ready.shards
            ))
            .ok();
            Some(s)
        }
        None => None,
    };
    let usable = |a: &Option<String>| a.clone().filter(|a| !a.ends_with(":0"));
    let (url, api) = match (&spawned, common.target) {
        (Some(s), _) => (
            common
                .url
                .clone()
                .unwrap_or(format!("ws://{}", s.ready.listen)),
            common
                .api
                .clone()
                .unwrap_or(format!("http://{}", s.ready.api_listen)),
        ),
        (None, TargetKind::Herald) => (
            common.url.clone().unwrap_or_else(|| {
                usable(&facts.as_ref().and_then(|f| f.listen.clone()))
                    .map_or("ws://127.0.0.1:8080".into(), |a| format!("ws://{a}"))
            }),
            common.api.clone().unwrap_or_else(|| {
                usable(&facts.as_ref().and_then(|f| f.api_listen.clone()))
                    .map_or("http://127.0.0.1:8081".into(), |a| format!("http://{a}"))
            }),
        ),
        (None, TargetKind::Peer) => {
            let url = common
                .url
                .clone()
                .unwrap_or_else(|| "ws://127.0.0.1:9000".into());
            let api = match &common.api {
                Some(a) => a.clone(),
                None => format!("http://{}", host_port(&url)?),
            };
            (url, api)
        }
    };
    let token_pool = sc.load.as_ref().map(|l| l.token_pool.max(1));
    let (target_spec, project, alg) = match common.target {
        TargetKind::Herald => {
            let (cfg_kid, cfg_alg, cfg_secret) = match facts
                .as_ref()
                .and_then(|f| f.key_for(common.alg.as_deref()))
            {
                Some((k, a, s)) => (k, Some(a), s),
                None => (None, None, None),
            };
            let project = common
                .project
                .clone()
                .or(facts.as_ref().map(|f| f.project.clone()))
                .unwrap_or_else(|| auth::DEV_PROJECT.into());
            let alg = common
                .alg
                .clone()
                .or(cfg_alg)
                .unwrap_or_else(|| "HS256".into());
            let secret = common
                .secret
                .clone()
                .or(cfg_secret)
                .or_else(|| facts.is_none().then(|| auth::DEV_SECRET.to_owned()));
            let key_pem = match &common.key_file {
                Some(p) => Some(
                    std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?,
                ),
                None => None,
            };
            let api_key = common
                .api_key
                .clone()
                .or(facts.as_ref().and_then(|f| f.api_key.clone()))
                .or_else(|| facts.is_none().then(|| auth::DEV_ADMIN_KEY.to_owned()));
            let spec = TargetSpec::Herald {
                ws: url.clone(),
                api: api.clone(),
                project: project.clone(),
                token: TokenSpec {
                    alg: alg.clone(),
                    secret,
                    key_pem,
                    kid: common.kid.clone().or(cfg_kid),
                    ttl_secs: common.token_ttl_secs,
                },
                api_key,
                token_pool,
                stomp: common.protocol == crate::cli::Protocol::Stomp,
            };
            (spec, Some(project), Some(alg))
        }
        TargetKind::Peer => (
            TargetSpec::Peer {
                ws: url.clone(),
                api: api.clone(),
            },
            None,
            None,
        ),
    };
    // Fail early on a bad key, before any connection.
    let target = Arc::<dyn crate::target::Target>::from(target_spec.build()?);
    let addr = resolve(&url).await?;
    let server_pid = spawned.as_ref().map(|s| s.pid).or(common.server_pid);
    let sources = match &common.source {
        Some(s) => crate::net::parse_sources(s)?,
        None => Vec::new(),
    };

    // Workers.
    let processes = common.workers > 0;
    let nr_workers = common.workers.max(1);
    let ranges = split(sc.plan.nr_conns, nr_workers, sc.plan.share_align());
    let threads = if common.threads > 0 {
        common.threads
    } else {
        machine.nr_cpus.div_ceil(nr_workers).max(1)
    };
    let nr_specs = nr_workers.max(ranges.len());
    let mut specs = Vec::with_capacity(nr_specs);
    for w in 0..nr_specs {
        let conns = ranges.get(w).cloned().unwrap_or(0..0);
        let share = |x: f64| x / nr_specs as f64;
        let load = sc.load.as_ref().map(|l| Load {
            rate: share(l.rate),
            concurrency: l.concurrency.div_ceil(nr_specs).max(1),
            duration_ms: l.duration.as_millis() as u64,
            hold_ms: l.hold_ms,
            max_inflight: l.max_inflight,
            id_base: sc.plan.nr_conns + (w as u64) * (1 << 40),
        });
        specs.push(WorkerSpec {
            index: w,
            target: target_spec.clone(),
            plan: sc.plan.clone(),
            conns,
            addr,
            sources: sources.clone(),
            connect_concurrency: common.connect_concurrency,
            connect_rate: share(common.connect_rate),
            connect_timeout_ms: common.connect_timeout_ms,
            load,
            epoch_ns,
            progress_ms: 100,
        });
    }

    let mem_now = || server_pid.and_then(sys::proc_memory);
    let server_before = mem_now();
    let kernel_before = sys::kernel_tcp();

    let mut fleet = Fleet::start(specs, processes, threads).await?;
    let n = sc.plan.nr_conns;
    let mut samples: Vec<MemorySample> = Vec::new();
    let pb = bar(&mp, n, "connect");
    let connect_limit = Duration::from_millis(common.connect_timeout_ms)
        .saturating_mul(((n / common.connect_concurrency.max(1) as u64) + 2) as u32)
        + Duration::from_secs(if common.connect_rate > 0.0 {
            (n as f64 / common.connect_rate) as u64 + 60
        } else {
            60
        });
    let connects: Vec<ConnectReport> = fleet
        .expect_all(
            "the connect phase",
            connect_limit,
            |ev| match ev {
                Event::Connected(r) => Some(r),
                _ => None,
            },
            |p| {
                pb.set_position(p.connected + p.failed);
                samples.push(MemorySample {
                    conns: p.connected,
                    server_rss_bytes: server_pid.and_then(sys::proc_memory).map(|m| m.rss_bytes),
                    kernel_slab_bytes: sys::kernel_tcp().map(|k| k.slab_bytes),
                });
            },
        )
        .await?;
    pb.finish();
    let mut connect = ConnectSection::default();
    let mut connect_hist = new_hist();
    let (mut first, mut last) = (u64::MAX, 0);
    for r in &connects {
        connect.attempted += r.attempted;
        connect.connected += r.connected;
        add_counts(&mut connect.failures, &r.failures);
        merge(&mut connect_hist, &r.latency.decode()?);
        if r.attempted > 0 {
            first = first.min(r.first_ns);
            last = last.max(r.last_ns);
        }
    }
    connect.elapsed_s = last.saturating_sub(first) as f64 / 1e9;
    connect.rate_per_s = if connect.elapsed_s > 0.0 {
        connect.connected as f64 / connect.elapsed_s
    } else {
        0.0
    };
    connect.latency = Summary::of(&connect_hist);
    if connect.connected > 0 {
        tokio::time::sleep(Duration::from_millis(common.settle_ms)).await;
    }
    let server_after = mem_now();
    let kernel_after = sys::kernel_tcp();
    let client_rss_bytes = std::iter::once(std::process::id())
        .chain(fleet.pids())
        .filter_map(sys::proc_memory)
        .map(|m| m.rss_bytes)
        .sum();
    let c = connect.connected;
    samples.push(MemorySample {
        conns: c,
        server_rss_bytes: server_after.map(|m| m.rss_bytes),
        kernel_slab_bytes: kernel_after.map(|k| k.slab_bytes),
    });
    let mut memory = MemorySection {
        server_rss_slope_bytes_per_conn: slope(&samples, |m| m.server_rss_bytes),
        kernel_slab_slope_bytes_per_conn: slope(&samples, |m| m.kernel_slab_bytes),
        samples,
        server_before,
        server_after,
        server_after_hold: None,
        server_rss_per_conn_bytes: server_before
            .zip(server_after)
            .and_then(|(b, a)| per(i128::from(a.rss_bytes) - i128::from(b.rss_bytes), c)),
        server_anon_per_conn_bytes: server_before.zip(server_after).and_then(|(b, a)| {
            per(
                i128::from(a.rss_anon_bytes) - i128::from(b.rss_anon_bytes),
                c,
            )
        }),
        kernel_before,
        kernel_after,
        kernel_tcp_mem_per_conn_bytes: kernel_before
            .zip(kernel_after)
            .and_then(|(b, a)| per(i128::from(a.mem_bytes) - i128::from(b.mem_bytes), c)),
        kernel_slab_per_conn_bytes: kernel_before
            .zip(kernel_after)
            .and_then(|(b, a)| per(i128::from(a.slab_bytes) - i128::from(b.slab_bytes), c)),
        client_rss_bytes,
        note: "kernel figures are system-wide: on loopback they include the bench's own \
               client sockets, i.e. both ends of every connection",
    };

    let cpu_now = |fleet: &Fleet| {
        let server = server_pid.and_then(sys::proc_cpu_split);
        let bench = std::iter::once(std::process::id())
            .chain(fleet.pids())
            .map(sys::proc_cpu_secs)
            .sum::<Option<f64>>();
        (mono_ns(), server, bench)
    };
    let mut hists = Hists {
        connect: Some(connect_hist),
        ..Hists::default()
    };
    let mut publish_report = None;
    let mut load_section = None;
    let mut cpu = CpuSection::default();
    let cpu_start = cpu_now(&fleet);

    match sc.kind {
        Kind::Hold => {
            if sc.hold_secs > 0 && connect.connected > 0 {
                let pb = mp.add(ProgressBar::new(sc.hold_secs));
                pb.set_style(
                    ProgressStyle::with_template(
                        "{msg:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} s",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                pb.set_message("hold");
                for _ in 0..sc.hold_secs {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    pb.inc(1);
                }
                pb.finish();
                memory.server_after_hold = mem_now();
            }
        }
        Kind::Broadcast | Kind::Groups | Kind::Unicast => {
            let d = sc.delivery.clone().context("delivery options")?;
            let hp = host_port(&api)?;
            let api_addr = resolve(&api).await?;
            let opts = PublishOpts {
                api: api_addr,
                host: hp,
                rate: d.rate,
                publishers: d.publishers,
                batch: d.batch,
                pad_bytes: d.pad_bytes,
                epoch_ns,
            };
            let stats = Arc::new(PublishStats::default());
            let plan = Arc::new(sc.plan.clone());
            let expected = connect.connected * sc.plan.expected_per_conn();
            let pub_bar = bar(&mp, sc.plan.nr_publishes(), "publish");
            let del_bar = bar(&mp, expected, "deliver");
            let mut task =
                publish::spawn(target.clone(), plan.clone(), opts.clone(), stats.clone())?;
            let mut published_done = false;
            let mut last_seen = (0u64, tokio::time::Instant::now());
            loop {
                tokio::select! {
                    r = &mut task, if !published_done => {
                        r.context("publisher task")?;
                        published_done = true;
                        pub_bar.finish();
                        last_seen.1 = tokio::time::Instant::now();
                    }
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                let delivered = fleet.totals().delivered;
                pub_bar.set_position(stats.published.load(std::sync::atomic::Ordering::Relaxed));
                del_bar.set_position(delivered);
                if delivered != last_seen.0 {
                    last_seen = (delivered, tokio::time::Instant::now());
                }
                if published_done
                    && (delivered >= expected || last_seen.1.elapsed() >= d.drain_timeout)
                {
                    break;
                }
            }
            del_bar.finish();
            publish_report = Some(stats.report(&sc.plan, &opts));
        }
        Kind::Churn | Kind::Handshake => {
            let l = sc.load.clone().context("load options")?;
            fleet.send_all(Cmd::Start);
            let secs = l.duration.as_secs().max(1);
            let pb = bar(&mp, secs, sc.kind.name());
            let t0 = tokio::time::Instant::now();
            let limit = l.duration
                + Duration::from_millis(l.hold_ms + common.connect_timeout_ms)
                + Duration::from_secs(30);
            let reports: Vec<LoadReport> = fleet
                .expect_all(
                    "the load",
                    limit,
                    |ev| match ev {
                        Event::LoadDone(r) => Some(r),
                        _ => None,
                    },
                    |p| {
                        pb.set_position(t0.elapsed().as_secs().min(secs));
                        pb.set_message(format!("{} ok {}", sc.kind.name(), p.ops));
                    },
                )
                .await?;
            pb.finish();
            let mut s = LoadSection {
                target_rate_per_s: l.rate * f64::from(u8::from(sc.kind == Kind::Churn)),
                ..LoadSection::default()
            };
            let mut h = new_hist();
            let (mut first, mut last) = (u64::MAX, 0);
            for r in &reports {
                s.attempted += r.attempted;
                s.succeeded += r.succeeded;
                s.skipped += r.skipped;
                add_counts(&mut s.failures, &r.failures);
                add_counts(&mut s.early_closes, &r.early_closes);
                merge(&mut h, &r.latency.decode()?);
                first = first.min(r.start_ns);
                last = last.max(r.end_ns);
            }
            s.elapsed_s = last.saturating_sub(first) as f64 / 1e9;
            // Churn paces for `duration`; its tail (last connections closing) is not load.
            let rate_window = if sc.kind == Kind::Churn {
                l.duration.as_secs_f64()
            } else {
                s.elapsed_s
            };
            s.rate_per_s = if rate_window > 0.0 {
                s.succeeded as f64 / rate_window
            } else {
                0.0
            };
            s.latency = Summary::of(&h);
            hists.load = Some(h);
            load_section = Some(s);
        }
    }
    let cpu_end = cpu_now(&fleet);
    cpu.phase_s = cpu_end.0.saturating_sub(cpu_start.0) as f64 / 1e9;
    // /proc CPU times are in clock ticks (10 ms): two decimals say all there is.
    let round = |v: f64| (v * 100.0).round() / 100.0;
    cpu.server_s = cpu_start
        .1
        .zip(cpu_end.1)
        .map(|(a, b)| round(b.0 + b.1 - a.0 - a.1));
    cpu.server_system_s = cpu_start.1.zip(cpu_end.1).map(|(a, b)| round(b.1 - a.1));
    cpu.bench_s = cpu_start.2.zip(cpu_end.2).map(|(a, b)| round(b - a));

    fleet.send_all(Cmd::Report);
    let reports: Vec<Box<DeliveryReport>> = fleet
        .expect_all(
            "the reports",
            Duration::from_secs(60),
            |ev| match ev {
                Event::Report(r) => Some(r),
                _ => None,
            },
            |_| {},
        )
        .await?;
    let mut held = HeldSection::default();
    let mut delivery = sc.kind.delivers().then(DeliverySection::default);
    let mut lat = new_hist();
    let mut comp = new_hist();
    let mut global: Option<(Vec<u64>, Vec<u64>)> = None;
    let mut last_delivery = 0;
    for r in &reports {
        held.open_at_end += r.open;
        add_counts(&mut held.closes, &r.closes);
        add_counts(&mut held.unexpected, &r.unexpected);
        if let Some(d) = delivery.as_mut() {
            d.expected += r.expected;
            d.delivered += r.delivered;
            d.lost_open += r.lost_open;
            d.lost_closed += r.lost_closed;
            d.reordered += r.reordered;
            d.conns_with_loss += r.conns_with_loss;
            merge(&mut lat, &r.latency.decode()?);
            last_delivery = last_delivery.max(r.last_delivery_ns);
            match &r.completion {
                CompletionReport::None => {}
                CompletionReport::Local {
                    hist,
                    complete,
                    incomplete,
                } => {
                    merge(&mut comp, &hist.decode()?);
                    d.complete_publishes += complete;
                    d.incomplete_publishes += incomplete;
                }
                CompletionReport::Global { count, max_ns } => {
                    let g =
                        global.get_or_insert_with(|| (vec![0; count.len()], vec![0; count.len()]));
                    for (i, (c, m)) in count.iter().zip(max_ns).enumerate() {
                        if i < g.0.len() {
                            g.0[i] += u64::from(*c);
                            g.1[i] = g.1[i].max(*m);
                        }
                    }
                }
            }
        }
    }
    if let Some(d) = delivery.as_mut() {
        if let Some((count, max_ns)) = &global {
            let mut each = Vec::with_capacity(count.len());
            for (k, (c, m)) in count.iter().zip(max_ns).enumerate() {
                // Complete when every connected recipient has it.
                if *c >= connect.connected.min(sc.plan.recipients(k as u64)) && *c > 0 {
                    record_ns(&mut comp, *m);
                    d.complete_publishes += 1;
                    each.push(Some(m / 1000));
                } else {
                    d.incomplete_publishes += 1;
                    each.push(None);
                }
            }
            if each.len() <= 100_000 {
                d.per_publish_completion_us = Some(each);
            }
        }
        d.latency = Summary::of(&lat);
        d.completion = Summary::of(&comp);
        if let Some(p) = &publish_report {
            d.elapsed_s = last_delivery.saturating_sub(p.first_ns) as f64 / 1e9;
            d.tail_s = last_delivery.saturating_sub(p.last_ns) as f64 / 1e9;
        }
        d.delivered_per_s = if d.elapsed_s > 0.0 {
            d.delivered as f64 / d.elapsed_s
        } else {
            0.0
        };
        hists.latency = Some(lat);
        hists.completion = Some(comp);
    }

    fleet.send_all(Cmd::Close);
    let closed = fleet
        .expect_all(
            "the workers to close",
            Duration::from_secs(60),
            |ev| matches!(ev, Event::Closed).then_some(()),
            |_| {},
        )
        .await;
    fleet.reap().await;
    let shards = spawned.as_ref().map(|s| s.ready.shards);
    let server_exit = match spawned {
        Some(s) => {
            let log = s.log.display().to_string();
            Some((s.stop().await, log))
        }
        None => None,
    };
    closed?;

    let mut problems = Vec::new();
    if connect.connected < connect.attempted {
        problems.push(format!(
            "{} of {} connections failed: {:?}",
            connect.attempted - connect.connected,
            connect.attempted,
            connect.failures
        ));
    }
    if total(&held.closes) > 0 {
        problems.push(format!(
            "held connections ended by the server: {:?}",
            held.closes
        ));
    }
    if total(&held.unexpected) > 0 {
        problems.push(format!("unexpected frames: {:?}", held.unexpected));
    }
    if let Some(p) = &publish_report
        && total(&p.failures) > 0
    {
        problems.push(format!("publishes failed: {:?}", p.failures));
    }
    if let Some(d) = &delivery {
        if d.lost_open > 0 {
            problems.push(format!(
                "{} deliveries lost on open connections",
                d.lost_open
            ));
        }
        if d.lost_closed > 0 {
            problems.push(format!(
                "{} deliveries missing on connections the server closed",
                d.lost_closed
            ));
        }
        if d.reordered > 0 {
            problems.push(format!("{} deliveries out of order", d.reordered));
        }
    }
    if let Some(l) = &load_section {
        if total(&l.failures) > 0 {
            problems.push(format!(
                "{} connections failed: {:?}",
                total(&l.failures),
                l.failures
            ));
        }
        if l.skipped > 0 {
            problems.push(format!(
                "{} churn attempts skipped at the in-flight cap",
                l.skipped
            ));
        }
        if total(&l.early_closes) > 0 {
            problems.push(format!(
                "churned connections ended by the server: {:?}",
                l.early_closes
            ));
        }
    }

    let mut config = serde_json::json!({
        "common": common,
        "scenario": sc.args,
        "plan": sc.plan,
        "threads_per_process": threads,
    });
    if let Some(obj) = config.as_object_mut() {
        obj.insert("secret_given".into(), common.secret.is_some().into());
    }
    let results = Results {
        tool: "herald-bench",
        version: env!("CARGO_PKG_VERSION"),
        scenario: sc.kind.name(),
        label: common.label.clone(),
        started_unix_s,
        command_line: redacted_command_line(),
        config,
        machine,
        target: TargetInfo {
            kind: common.target,
            url,
            api,
            project,
            alg,
            shards,
            server_pid,
            spawned: common
                .spawn_herald
                .as_ref()
                .map(|p| p.display().to_string()),
            server_log: server_exit.as_ref().map(|(_, l)| l.clone()),
            server_exit: server_exit.map(|(e, _)| e),
        },
        workers: common.workers,
        sources: sources.len(),
        connect,
        memory,
        held,
        publish: publish_report,
        delivery,
        load: load_section,
        cpu,
        problems,
        hists,
    };
    Ok(results)
}
