//! A worker: holds a share of the connections and measures what arrives on them.
//!
//! The parent drives workers with [`Cmd`]s and reads [`Event`]s back. A worker runs either as
//! a task of the parent (`--workers 0`) or as a child process (`--workers K`), in which case
//! the spec is the first line of its stdin, commands follow as JSON lines on stdin, and events
//! are JSON lines on its stdout (see [`child_main`]). Both use the same [`run`].
//!
//! Phases: connect the share (bounded concurrency, optional pacing) → `Connected` →
//! on `Start`, run the load (churn, handshake) → `LoadDone` → on `Report`, report deliveries
//! and closes → on `Close`, close every connection politely → `Closed`.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::net::{self, Dial, Ws};
use crate::plan::{Kind, Plan};
use crate::stats::{Counts, HistB64, new_hist, record_ns};
use crate::sys::mono_ns;
use crate::target::{Frame, Target, TargetSpec};

/// Everything a worker needs, sent once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// Worker number (0-based).
    pub index: usize,
    /// The server under test.
    pub target: TargetSpec,
    /// The run's shape.
    pub plan: Plan,
    /// Held connections of this worker: numbers `conns.start..conns.end` of the plan.
    pub conns: Range<u64>,
    /// The server's client port, resolved.
    pub addr: SocketAddr,
    /// Source addresses, used round-robin by connection number (empty: the kernel chooses).
    pub sources: Vec<IpAddr>,
    /// Connection attempts in flight at once.
    pub connect_concurrency: usize,
    /// This worker's share of the connect rate, per second (0: as fast as possible).
    pub connect_rate: f64,
    /// Deadline of one opening (connect, upgrade, welcome, subscribes), in milliseconds.
    pub connect_timeout_ms: u64,
    /// The churn or handshake load, started by [`Cmd::Start`].
    pub load: Option<Load>,
    /// `CLOCK_MONOTONIC` ns at the bench's start: payload times are relative to it.
    pub epoch_ns: u64,
    /// Interval between progress events, in milliseconds.
    pub progress_ms: u64,
}

/// The churn or handshake load of one worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Load {
    /// Churn: new connections per second for this worker.
    pub rate: f64,
    /// Handshake: connection loops running at once.
    pub concurrency: usize,
    /// How long the load runs, in milliseconds.
    pub duration_ms: u64,
    /// Churn: how long each new connection stays open, in milliseconds.
    pub hold_ms: u64,
    /// Churn: most churned connections open at once (more are skipped and counted).
    pub max_inflight: usize,
    /// First connection number of this worker's load (distinct across workers).
    pub id_base: u64,
}

/// Parent → worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Cmd {
    /// Start the churn/handshake load.
    Start,
    /// Report deliveries and connection states.
    Report,
    /// Close every connection and stop.
    Close,
}

/// Running totals, sent every `progress_ms`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Held connections opened.
    pub connected: u64,
    /// Held connections that failed to open.
    pub failed: u64,
    /// Deliveries received.
    pub delivered: u64,
    /// Load operations done (churn or handshake connections opened).
    pub ops: u64,
    /// Load operations failed.
    pub ops_failed: u64,
}

/// Worker → parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    /// Running totals.
    Progress(Progress),
    /// The connect phase is over.
    Connected(ConnectReport),
    /// The load is over.
    LoadDone(LoadReport),
    /// Deliveries and connection states.
    Report(Box<DeliveryReport>),
    /// Every connection is closed; the worker is done.
    Closed,
    /// The worker cannot go on.
    Fatal {
        /// What went wrong.
        message: String,
    },
}

/// Outcome of opening the held connections.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectReport {
    /// Attempts.
    pub attempted: u64,
    /// Successes.
    pub connected: u64,
    /// Failures by reason.
    pub failures: Counts,
    /// Time to open one connection (connect → ready), µs.
    pub latency: HistB64,
    /// First attempt, ns since the epoch.
    pub first_ns: u64,
    /// Last success or failure, ns since the epoch.
    pub last_ns: u64,
}

/// Outcome of a churn or handshake load.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadReport {
    /// Attempts.
    pub attempted: u64,
    /// Connections that became ready.
    pub succeeded: u64,
    /// Failures by reason.
    pub failures: Counts,
    /// Churn: attempts skipped because too many churned connections were open.
    pub skipped: u64,
    /// Connect → ready, µs.
    pub latency: HistB64,
    /// Load start and end, ns since the epoch.
    pub start_ns: u64,
    /// End of the load (every attempt finished), ns since the epoch.
    pub end_ns: u64,
    /// Churned connections the server closed or dropped before we did, by code or reason.
    pub early_closes: Counts,
}

/// Completion (time until a publish reached all its recipients), as a worker knows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CompletionReport {
    /// Not a delivery scenario.
    #[default]
    None,
    /// Recipients span workers (broadcast): per publish, recipients seen here and the latest
    /// arrival (ns after the publish). The parent combines workers.
    Global {
        /// Recipients seen, per publish.
        count: Vec<u32>,
        /// Latest arrival, per publish.
        max_ns: Vec<u64>,
    },
    /// Every recipient of each publish is in this worker (groups, unicast).
    Local {
        /// Completion times of the complete publishes, µs.
        hist: HistB64,
        /// Publishes that reached all their recipients.
        complete: u64,
        /// Publishes that did not.
        incomplete: u64,
    },
}

/// Deliveries and connection states of one worker.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeliveryReport {
    /// Deliveries received.
    pub delivered: u64,
    /// Deliveries expected on this worker's connected connections.
    pub expected: u64,
    /// Missing deliveries on connections still open (must be 0).
    pub lost_open: u64,
    /// Missing deliveries on connections the server closed or dropped (reported, excused
    /// only when closed with a policy code).
    pub lost_closed: u64,
    /// Deliveries that arrived with a sequence number not above the previous one.
    pub reordered: u64,
    /// Connections with at least one missing delivery.
    pub conns_with_loss: u64,
    /// Connections still open.
    pub open: u64,
    /// Held connections that ended before we closed them: by close code (`"4008"`), or
    /// `dropped` (EOF or error without a close frame).
    pub closes: Counts,
    /// Frames that should not have arrived (error replies, unparsable frames).
    pub unexpected: Counts,
    /// Delivery latency (publish → receipt), µs.
    pub latency: HistB64,
    /// Broadcast completion.
    pub completion: CompletionReport,
    /// Latest receipt, ns since the epoch.
    pub last_delivery_ns: u64,
}

/// Connection state values in [`Slot::state`] below 1000; from 1000 up it is the close code
/// the server sent.
const NEVER: u32 = 0;
const OPEN: u32 = 1;
const CLOSED_BY_US: u32 = 2;
const DROPPED: u32 = 3;

/// What one held connection has seen. Written only by its own task; read by reports.
struct Slot {
    received: AtomicU64,
    last_seq: AtomicI64,
    reordered: AtomicU64,
    state: AtomicU32,
}

impl Slot {
    fn new() -> Self {
        Self {
            received: AtomicU64::new(0),
            last_seq: AtomicI64::new(-1),
            reordered: AtomicU64::new(0),
            state: AtomicU32::new(NEVER),
        }
    }
}

/// Per-publish completion tracking.
enum Completion {
    None,
    Global {
        count: Vec<AtomicU32>,
        max_ns: Vec<AtomicU64>,
    },
    Local {
        /// First group of this worker.
        first: u64,
        /// Groups of this worker.
        nr_local: u64,
        count: Vec<AtomicU32>,
        max_ns: Vec<AtomicU64>,
        hist: Mutex<Histogram<u64>>,
    },
    Direct {
        hist: Mutex<Histogram<u64>>,
    },
}

fn atomics32(n: u64) -> Vec<AtomicU32> {
    (0..n).map(|_| AtomicU32::new(0)).collect()
}

fn atomics64(n: u64) -> Vec<AtomicU64> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

impl Completion {
    fn new(plan: &Plan, conns: &Range<u64>) -> Self {
        match plan.kind {
            Kind::Broadcast => Self::Global {
                count: atomics32(plan.nr_publishes()),
                max_ns: atomics64(plan.nr_publishes()),
            },
            Kind::Groups => {
                let g = plan.group_size.max(1);
                let first = conns.start / g;
                let nr_local = conns.end.div_ceil(g) - first;
                let n = nr_local * plan.nr_rounds;
                Self::Local {
                    first,
                    nr_local,
                    count: atomics32(n),
                    max_ns: atomics64(n),
                    hist: Mutex::new(new_hist()),
                }
            }
            Kind::Unicast => Self::Direct {
                hist: Mutex::new(new_hist()),
            },
            _ => Self::None,
        }
    }

    fn record(&self, plan: &Plan, k: u64, lat_ns: u64) {
        match self {
            Self::None => {}
            Self::Global { count, max_ns } => {
                if let (Some(c), Some(m)) = (count.get(k as usize), max_ns.get(k as usize)) {
                    m.fetch_max(lat_ns, SeqCst);
                    c.fetch_add(1, SeqCst);
                }
            }
            Self::Local {
                first,
                nr_local,
                count,
                max_ns,
                hist,
            } => {
                let per = plan.per_round().max(1);
                let (round, g) = (k / per, k % per);
                if g < *first || g >= first + nr_local {
                    return;
                }
                let i = (round * nr_local + (g - first)) as usize;
                let (Some(c), Some(m)) = (count.get(i), max_ns.get(i)) else {
                    return;
                };
                // Max first, then count: whoever brings the count to the recipient number
                // sees every recipient's max (each did its fetch_max before its fetch_add).
                m.fetch_max(lat_ns, SeqCst);
                if u64::from(c.fetch_add(1, SeqCst)) + 1 == plan.recipients(k) {
                    let done = m.load(SeqCst);
                    record_ns(&mut lock(hist), done);
                }
            }
            Self::Direct { hist } => record_ns(&mut lock(hist), lat_ns),
        }
    }

    fn report(&self, plan: &Plan, conns: &Range<u64>) -> CompletionReport {
        match self {
            Self::None => CompletionReport::None,
            Self::Global { count, max_ns } => CompletionReport::Global {
                count: count.iter().map(|c| c.load(SeqCst)).collect(),
                max_ns: max_ns.iter().map(|m| m.load(SeqCst)).collect(),
            },
            Self::Local {
                first,
                nr_local,
                count,
                hist,
                ..
            } => {
                let mut complete = 0;
                let mut incomplete = 0;
                let per = plan.per_round().max(1);
                for (i, c) in count.iter().enumerate() {
                    let (round, g) = (i as u64 / nr_local, first + i as u64 % nr_local);
                    if u64::from(c.load(SeqCst)) >= plan.recipients(round * per + g) {
                        complete += 1;
                    } else {
                        incomplete += 1;
                    }
                }
                CompletionReport::Local {
                    hist: HistB64::encode(&lock(hist)),
                    complete,
                    incomplete,
                }
            }
            Self::Direct { hist } => {
                let h = lock(hist);
                let total = (conns.end - conns.start) * plan.nr_rounds;
                CompletionReport::Local {
                    hist: HistB64::encode(&h),
                    complete: h.len(),
                    incomplete: total.saturating_sub(h.len()),
                }
            }
        }
    }
}

/// Locks a mutex, ignoring poisoning (a panicked task leaves a histogram that is still valid).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counters of the churn/handshake load.
#[derive(Default)]
struct LoadStats {
    attempted: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
    failures: Mutex<Counts>,
    early_closes: Mutex<Counts>,
}

/// State shared by the worker's tasks.
struct Shared {
    spec: WorkerSpec,
    target: Box<dyn Target>,
    slots: Vec<Slot>,
    connected: AtomicU64,
    failed: AtomicU64,
    delivered: AtomicU64,
    last_delivery_ns: AtomicU64,
    first_attempt_ns: AtomicU64,
    last_connect_ns: AtomicU64,
    failures: Mutex<Counts>,
    unexpected: Mutex<Counts>,
    connect_hist: Mutex<Histogram<u64>>,
    latency: Mutex<Histogram<u64>>,
    completion: Completion,
    load: LoadStats,
    load_hist: Mutex<Histogram<u64>>,
    stop: watch::Sender<bool>,
}

impl Shared {
    fn now(&self) -> u64 {
        mono_ns().saturating_sub(self.spec.epoch_ns)
    }

    fn dial(&self, conn: u64) -> Dial<'_> {
        let source = if self.spec.sources.is_empty() {
            None
        } else {
            Some(self.spec.sources[(conn % self.spec.sources.len() as u64) as usize])
        };
        Dial {
            target: &*self.target,
            addr: self.spec.addr,
            source,
            timeout: Duration::from_millis(self.spec.connect_timeout_ms),
        }
    }

    fn topics(&self, conn: u64) -> Vec<String> {
        self.spec.plan.topics(conn, &self.target.sub(conn))
    }

    fn on_text(&self, slot: &Slot, text: &str) {
        match self.target.classify(text) {
            Frame::Delivery(p) => {
                let now = self.now();
                let lat = now.saturating_sub(p.t);
                slot.received.fetch_add(1, Relaxed);
                if (p.s as i64) <= slot.last_seq.load(Relaxed) {
                    slot.reordered.fetch_add(1, Relaxed);
                } else {
                    slot.last_seq.store(p.s as i64, Relaxed);
                }
                record_ns(&mut lock(&self.latency), lat);
                self.completion.record(&self.spec.plan, p.k, lat);
                self.delivered.fetch_add(1, Relaxed);
                self.last_delivery_ns.fetch_max(now, Relaxed);
            }
            Frame::Error(code) => {
                *lock(&self.unexpected)
                    .entry(format!("error_{code}"))
                    .or_default() += 1;
            }
            Frame::Welcome | Frame::Ack(_) | Frame::Other => {}
        }
    }

    fn progress(&self) -> Progress {
        Progress {
            connected: self.connected.load(Relaxed),
            failed: self.failed.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            ops: self.load.succeeded.load(Relaxed),
            ops_failed: self.load.failed.load(Relaxed),
        }
    }

    fn connect_report(&self) -> ConnectReport {
        ConnectReport {
            attempted: self.spec.conns.end - self.spec.conns.start,
            connected: self.connected.load(SeqCst),
            failures: lock(&self.failures).clone(),
            latency: HistB64::encode(&lock(&self.connect_hist)),
            first_ns: self.first_attempt_ns.load(SeqCst),
            last_ns: self.last_connect_ns.load(SeqCst),
        }
    }

    fn delivery_report(&self) -> DeliveryReport {
        let plan = &self.spec.plan;
        let per_conn = plan.expected_per_conn();
        let mut r = DeliveryReport {
            delivered: self.delivered.load(SeqCst),
            unexpected: lock(&self.unexpected).clone(),
            latency: HistB64::encode(&lock(&self.latency)),
            completion: self.completion.report(plan, &self.spec.conns),
            last_delivery_ns: self.last_delivery_ns.load(SeqCst),
            ..DeliveryReport::default()
        };
        for slot in &self.slots {
            let state = slot.state.load(SeqCst);
            if state == NEVER {
                continue;
            }
            r.expected += per_conn;
            let got = slot.received.load(SeqCst);
            let lost = per_conn.saturating_sub(got);
            r.reordered += slot.reordered.load(SeqCst);
            if lost > 0 {
                r.conns_with_loss += 1;
            }
            match state {
                OPEN | CLOSED_BY_US => {
                    r.open += u64::from(state == OPEN);
                    r.lost_open += lost;
                }
                DROPPED => {
                    *r.closes.entry("dropped".into()).or_default() += 1;
                    r.lost_closed += lost;
                }
                code => {
                    *r.closes.entry(code.to_string()).or_default() += 1;
                    r.lost_closed += lost;
                }
            }
        }
        r
    }

    fn load_report(&self, start_ns: u64, end_ns: u64) -> LoadReport {
        LoadReport {
            attempted: self.load.attempted.load(SeqCst),
            succeeded: self.load.succeeded.load(SeqCst),
            failures: lock(&self.load.failures).clone(),
            skipped: self.load.skipped.load(SeqCst),
            latency: HistB64::encode(&lock(&self.load_hist)),
            start_ns,
            end_ns,
            early_closes: lock(&self.load.early_closes).clone(),
        }
    }
}

/// Runs a worker until [`Cmd::Close`] (or the command channel closes).
///
/// # Errors
/// The target cannot be built (bad key).
pub async fn run(
    spec: WorkerSpec,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    events: mpsc::UnboundedSender<Event>,
) -> Result<()> {
    let target = spec.target.build()?;
    target.warm()?;
    let n = spec.conns.end - spec.conns.start;
    let (stop, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        completion: Completion::new(&spec.plan, &spec.conns),
        slots: (0..n).map(|_| Slot::new()).collect(),
        spec,
        target,
        connected: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        last_delivery_ns: AtomicU64::new(0),
        first_attempt_ns: AtomicU64::new(0),
        last_connect_ns: AtomicU64::new(0),
        failures: Mutex::new(Counts::new()),
        unexpected: Mutex::new(Counts::new()),
        connect_hist: Mutex::new(new_hist()),
        latency: Mutex::new(new_hist()),
        load: LoadStats::default(),
        load_hist: Mutex::new(new_hist()),
        stop,
    });

    let ticker = {
        let shared = shared.clone();
        let events = events.clone();
        tokio::spawn(async move {
            let mut every =
                tokio::time::interval(Duration::from_millis(shared.spec.progress_ms.max(10)));
            loop {
                every.tick().await;
                if events.send(Event::Progress(shared.progress())).is_err() {
                    return;
                }
            }
        })
    };

    let mut held = JoinSet::new();
    connect_all(&shared, &mut held).await;
    let _ = events.send(Event::Progress(shared.progress()));
    let _ = events.send(Event::Connected(shared.connect_report()));

    while let Some(cmd) = cmds.recv().await {
        match cmd {
            Cmd::Start => {
                let start = shared.now();
                match shared.spec.plan.kind {
                    Kind::Churn => churn(&shared).await,
                    Kind::Handshake => handshake(&shared).await,
                    _ => {}
                }
                let _ = events.send(Event::Progress(shared.progress()));
                let _ = events.send(Event::LoadDone(shared.load_report(start, shared.now())));
            }
            Cmd::Report => {
                let _ = events.send(Event::Report(Box::new(shared.delivery_report())));
            }
            Cmd::Close => break,
        }
    }
    shared.stop.send_replace(true);
    let drained = tokio::time::timeout(Duration::from_secs(15), async {
        while held.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        held.abort_all();
    }
    ticker.abort();
    let _ = events.send(Event::Closed);
    Ok(())
}

/// Opens the held connections, each then living in its own task in `held`.
async fn connect_all(shared: &Arc<Shared>, held: &mut JoinSet<()>) {
    let spec = &shared.spec;
    let sem = Arc::new(Semaphore::new(spec.connect_concurrency.max(1)));
    let start = Instant::now();
    shared.first_attempt_ns.store(shared.now(), SeqCst);
    for (i, conn) in spec.conns.clone().enumerate() {
        if spec.connect_rate > 0.0 {
            tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / spec.connect_rate))
                .await;
        }
        // The semaphore is never closed.
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let shared = shared.clone();
        held.spawn(async move {
            let t0 = mono_ns();
            let topics = shared.topics(conn);
            let opened = net::open(&shared.dial(conn), conn, &topics).await;
            shared.last_connect_ns.fetch_max(shared.now(), SeqCst);
            // Count before releasing the permit: the connect phase ends when every permit is
            // back, and its report must include this attempt.
            match opened {
                Ok(ws) => {
                    record_ns(&mut lock(&shared.connect_hist), mono_ns() - t0);
                    shared.slots[i].state.store(OPEN, SeqCst);
                    shared.connected.fetch_add(1, SeqCst);
                    drop(permit);
                    hold(&shared, i, ws).await;
                }
                Err(reason) => {
                    *lock(&shared.failures).entry(reason).or_default() += 1;
                    shared.failed.fetch_add(1, SeqCst);
                    drop(permit);
                }
            }
        });
    }
    // Every attempt has released its permit once all permits are back.
    let all = spec.connect_concurrency.max(1) as u32;
    let _ = sem.acquire_many(all).await;
}

/// Keeps held connection `i` open, reading deliveries, until the server closes it or the
/// worker stops (then closes it politely).
async fn hold(shared: &Shared, i: usize, mut ws: Ws) {
    let slot = &shared.slots[i];
    let mut stop = shared.stop.subscribe();
    loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => shared.on_text(slot, &t),
                Some(Ok(Message::Close(f))) => {
                    let code = f.map_or(1005, |f| u16::from(f.code));
                    let _ = slot.state.compare_exchange(OPEN, u32::from(code), SeqCst, SeqCst);
                    // Keep reading: tungstenite answers the close, then the stream ends.
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    let _ = slot.state.compare_exchange(OPEN, DROPPED, SeqCst, SeqCst);
                    return;
                }
            },
            _ = stopped(&mut stop) => {
                let _ = slot.state.compare_exchange(OPEN, CLOSED_BY_US, SeqCst, SeqCst);
                net::close(ws, Duration::from_secs(5)).await;
                return;
            }
        }
    }
}

/// Resolves once the worker is told to stop.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn count(m: &Mutex<Counts>, reason: String) {
    *lock(m).entry(reason).or_default() += 1;
}

/// Churn: new connections at a steady rate, each held `hold_ms` then closed.
async fn churn(shared: &Arc<Shared>) {
    let Some(load) = shared.spec.load.clone() else {
        return;
    };
    let start = Instant::now();
    let duration = Duration::from_millis(load.duration_ms);
    let mut tasks = JoinSet::new();
    let mut j = 0u64;
    loop {
        let elapsed = start.elapsed();
        if elapsed >= duration {
            break;
        }
        let due = (elapsed.as_secs_f64() * load.rate) as u64;
        while j < due {
            while tasks.try_join_next().is_some() {}
            let id = load.id_base + j;
            j += 1;
            shared.load.attempted.fetch_add(1, SeqCst);
            if tasks.len() >= load.max_inflight {
                shared.load.skipped.fetch_add(1, SeqCst);
                continue;
            }
            let shared = shared.clone();
            let hold_for = Duration::from_millis(load.hold_ms);
            tasks.spawn(async move {
                let t0 = mono_ns();
                let topics = shared.topics(id);
                match net::open(&shared.dial(id), id, &topics).await {
                    Ok(mut ws) => {
                        record_ns(&mut lock(&shared.load_hist), mono_ns() - t0);
                        shared.load.succeeded.fetch_add(1, SeqCst);
                        let mut stop = shared.stop.subscribe();
                        let ended = tokio::time::timeout(hold_for, async {
                            tokio::select! {
                                r = drain_until_end(&mut ws) => Some(r),
                                _ = stopped(&mut stop) => None,
                            }
                        })
                        .await;
                        match ended {
                            Ok(Some(reason)) => count(&shared.load.early_closes, reason),
                            _ => net::close(ws, Duration::from_secs(2)).await,
                        }
                    }
                    Err(reason) => {
                        shared.load.failed.fetch_add(1, SeqCst);
                        count(&shared.load.failures, reason);
                    }
                }
            });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let bound = Duration::from_millis(load.hold_ms + shared.spec.connect_timeout_ms + 5_000);
    if tokio::time::timeout(bound, async { while tasks.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        tasks.abort_all();
    }
}

/// Reads until the server ends the connection; returns how it ended.
async fn drain_until_end(ws: &mut Ws) -> String {
    loop {
        match ws.next().await {
            Some(Ok(Message::Close(f))) => {
                return f.map_or(1005, |f| u16::from(f.code)).to_string();
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return "dropped".into(),
        }
    }
}

/// Handshake: `concurrency` loops of open → close, flat out, for the duration.
async fn handshake(shared: &Arc<Shared>) {
    let Some(load) = shared.spec.load.clone() else {
        return;
    };
    let end = Instant::now() + Duration::from_millis(load.duration_ms);
    let next = Arc::new(AtomicU64::new(load.id_base));
    let mut loops = JoinSet::new();
    for _ in 0..load.concurrency.max(1) {
        let shared = shared.clone();
        let next = next.clone();
        loops.spawn(async move {
            while Instant::now() < end && !*shared.stop.borrow() {
                let id = next.fetch_add(1, SeqCst);
                shared.load.attempted.fetch_add(1, SeqCst);
                let t0 = mono_ns();
                let topics = shared.topics(id);
                match net::open(&shared.dial(id), id, &topics).await {
                    Ok(ws) => {
                        record_ns(&mut lock(&shared.load_hist), mono_ns() - t0);
                        shared.load.succeeded.fetch_add(1, SeqCst);
                        net::close(ws, Duration::from_secs(2)).await;
                    }
                    Err(reason) => {
                        shared.load.failed.fetch_add(1, SeqCst);
                        count(&shared.load.failures, reason);
                        // Do not spin on an instant failure (refused, EMFILE).
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        });
    }
    while loops.join_next().await.is_some() {}
}

/// Entry point of a worker child process: spec on the first stdin line, commands on the
/// next lines, events as JSON lines on stdout.
///
/// # Errors
/// Unreadable spec, or the worker failed to start.
pub async fn child_main() -> Result<()> {
    crate::sys::raise_nofile_limit();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let first = lines
        .next_line()
        .await?
        .context("worker: no spec on stdin")?;
    let spec: WorkerSpec = serde_json::from_str(&first).context("worker: bad spec")?;
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Event>();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<Cmd>(&line) {
                Ok(c) => {
                    if cmd_tx.send(c).is_err() {
                        return;
                    }
                }
                Err(e) => eprintln!("herald-bench worker: bad command {line:?}: {e}"),
            }
        }
        // stdin closed: the parent is gone; close everything.
        let _ = cmd_tx.send(Cmd::Close);
    });
    let writer = tokio::spawn(async move {
        let mut out = tokio::io::stdout();
        while let Some(ev) = ev_rx.recv().await {
            let closed = matches!(ev, Event::Closed);
            let mut line = serde_json::to_string(&ev).unwrap_or_default();
            line.push('\n');
            if out.write_all(line.as_bytes()).await.is_err() || out.flush().await.is_err() {
                return;
            }
            if closed {
                return;
            }
        }
    });
    if let Err(e) = run(spec, cmd_rx, ev_tx.clone()).await {
        let _ = ev_tx.send(Event::Fatal {
            message: format!("{e:#}"),
        });
    }
    drop(ev_tx);
    let _ = writer.await;
    Ok(())
}
