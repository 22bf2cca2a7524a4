//! The publisher: plays the project backend, sending the plan's publishes over HTTP at a
//! fixed rate or flat out, stamping each payload with the shared monotonic clock.
//!
//! Per-topic order is what the receivers check, so every topic is owned by one publisher
//! task (by its slot in the round), which sends its publishes one request at a time.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::plan::Plan;
use crate::stats::{Counts, Summary, new_hist, record_ns};
use crate::sys::mono_ns;
use crate::target::Target;

/// How to publish.
#[derive(Debug, Clone)]
pub struct PublishOpts {
    /// The publish API, resolved.
    pub api: SocketAddr,
    /// `Host` header value.
    pub host: String,
    /// Publishes per second in total (0 = flat out).
    pub rate: f64,
    /// Publisher tasks (each with its own HTTP connection).
    pub publishers: usize,
    /// Publishes per request (herald's batch endpoint; peers take 1).
    pub batch: usize,
    /// Extra payload bytes (a `pad` string), to test larger messages.
    pub pad_bytes: usize,
    /// The bench's epoch on the monotonic clock.
    pub epoch_ns: u64,
}

/// Publisher counters, readable while it runs.
#[derive(Default)]
pub struct PublishStats {
    /// Publishes the server accepted.
    pub published: AtomicU64,
    /// Publishes given up (after retries), by reason.
    pub failures: Mutex<Counts>,
    /// Retries after `503`/`429` (server busy) or a lost API connection.
    pub retries: AtomicU64,
    /// Request round trips, µs.
    pub request_latency: Mutex<Option<Histogram<u64>>>,
    /// First request sent, ns since the epoch.
    pub first_ns: AtomicU64,
    /// Last answer received, ns since the epoch.
    pub last_ns: AtomicU64,
}

/// What the publisher reports.
#[derive(Debug, Clone, Serialize)]
pub struct PublishReport {
    /// Publishes accepted by the server.
    pub published: u64,
    /// Publishes planned.
    pub planned: u64,
    /// Given up, by reason (must be empty).
    pub failures: Counts,
    /// Retries after a busy answer or a lost API connection.
    pub retries: u64,
    /// Seconds from the first request to the last answer.
    pub elapsed_s: f64,
    /// Publishes per second achieved.
    pub rate_per_s: f64,
    /// Requested rate (0 = flat out).
    pub target_rate_per_s: f64,
    /// Publishes per request.
    pub batch: usize,
    /// HTTP request round trip.
    pub request_latency: Summary,
    /// First request sent, ns since the bench's epoch.
    pub first_ns: u64,
    /// Last answer received (the last publish), ns since the bench's epoch.
    pub last_ns: u64,
}

impl PublishStats {
    /// The report, once publishing is over.
    pub fn report(&self, plan: &Plan, opts: &PublishOpts) -> PublishReport {
        let published = self.published.load(SeqCst);
        let elapsed_s = self
            .last_ns
            .load(SeqCst)
            .saturating_sub(self.first_ns.load(SeqCst)) as f64
            / 1e9;
        let hist = lock(&self.request_latency).clone().unwrap_or_else(new_hist);
        PublishReport {
            published,
            planned: plan.nr_publishes(),
            failures: lock(&self.failures).clone(),
            retries: self.retries.load(SeqCst),
            elapsed_s,
            rate_per_s: if elapsed_s > 0.0 {
                published as f64 / elapsed_s
            } else {
                0.0
            },
            target_rate_per_s: opts.rate,
            batch: opts.batch,
            request_latency: Summary::of(&hist),
            first_ns: self.first_ns.load(SeqCst),
            last_ns: self.last_ns.load(SeqCst),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The payload of publish `k` of round `s`, stamped now.
pub fn payload(k: u64, s: u64, epoch_ns: u64, pad_bytes: usize) -> String {
    let t = mono_ns().saturating_sub(epoch_ns);
    if pad_bytes == 0 {
        format!(r#"{{"k":{k},"s":{s},"t":{t}}}"#)
    } else {
        format!(
            r#"{{"k":{k},"s":{s},"t":{t},"pad":"{}"}}"#,
            "x".repeat(pad_bytes)
        )
    }
}

/// Runs [`run`] on a thread and runtime of its own; the receiver resolves when it is done (an
/// error if the thread failed). Its pacing then does not depend on how busy the receivers
/// are: two runs that differ only in what the receivers read (herald.v1 or STOMP) publish
/// the same way.
///
/// # Errors
/// The thread could not be started.
pub fn spawn(
    target: Arc<dyn Target>,
    plan: Arc<Plan>,
    opts: PublishOpts,
    stats: Arc<PublishStats>,
) -> Result<tokio::sync::oneshot::Receiver<()>> {
    let (done, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("publisher".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("publisher runtime");
            rt.block_on(run(target, plan, opts, stats));
            let _ = done.send(());
        })
        .context("publisher thread")?;
    Ok(rx)
}

/// Publishes the whole plan; returns when every publish was answered or given up.
pub async fn run(
    target: Arc<dyn Target>,
    plan: Arc<Plan>,
    opts: PublishOpts,
    stats: Arc<PublishStats>,
) {
    *lock(&stats.request_latency) = Some(new_hist());
    let per = plan.per_round().max(1);
    let tasks = opts.publishers.clamp(1, per as usize);
    let batch = opts.batch.clamp(1, target.max_batch());
    let mut set = tokio::task::JoinSet::new();
    let start = Instant::now();
    for p in 0..tasks as u64 {
        let (target, plan, opts, stats) =
            (target.clone(), plan.clone(), opts.clone(), stats.clone());
        set.spawn(async move {
            // This task's publishes: slots p, p + tasks, ... of every round, in order.
            let mine = (0..plan.nr_publishes()).filter(move |k| (k % per) % tasks as u64 == p);
            let rate = opts.rate / tasks as f64;
            let mut client = None;
            let mut sent = 0u64;
            let mut items = Vec::with_capacity(batch);
            let mut keys = mine.peekable();
            while keys.peek().is_some() {
                if rate > 0.0 {
                    tokio::time::sleep_until(start + Duration::from_secs_f64(sent as f64 / rate))
                        .await;
                }
                items.clear();
                for k in keys.by_ref().take(batch) {
                    let (topic, round) = plan.publish(k);
                    items.push((topic, payload(k, round, opts.epoch_ns, opts.pad_bytes)));
                }
                sent += items.len() as u64;
                send(&*target, &opts, &stats, &mut client, &items).await;
            }
        });
    }
    while set.join_next().await.is_some() {}
}

/// Most attempts of one request before it is given up.
const MAX_ATTEMPTS: u32 = 200;

/// Sends one request, retrying busy answers and lost connections.
async fn send(
    target: &dyn Target,
    opts: &PublishOpts,
    stats: &PublishStats,
    client: &mut Option<SendRequest<Full<Bytes>>>,
    items: &[(String, String)],
) {
    let req = target.publish_request(items);
    let body = Bytes::from(req.body);
    let _ = stats.first_ns.compare_exchange(
        0,
        mono_ns().saturating_sub(opts.epoch_ns).max(1),
        SeqCst,
        SeqCst,
    );
    let mut last_reason = String::new();
    for attempt in 0..MAX_ATTEMPTS {
        if attempt > 0 {
            stats.retries.fetch_add(1, SeqCst);
            tokio::time::sleep(Duration::from_millis(u64::from(attempt.min(50)))).await;
        }
        if client.is_none() {
            match connect(opts.api).await {
                Ok(c) => *client = Some(c),
                Err(e) => {
                    last_reason = format!("api_connect: {e}");
                    continue;
                }
            }
        }
        let Some(sender) = client.as_mut() else {
            continue;
        };
        let mut builder = hyper::Request::post(&req.path).header("host", &opts.host);
        for (k, v) in &req.headers {
            builder = builder.header(*k, v);
        }
        let Ok(request) = builder.body(Full::new(body.clone())) else {
            last_reason = "bad_request_setup".into();
            break;
        };
        let t0 = mono_ns();
        if sender.ready().await.is_err() {
            *client = None;
            last_reason = "api_connection_lost".into();
            continue;
        }
        let resp = match sender.send_request(request).await {
            Ok(r) => r,
            Err(_) => {
                *client = None;
                last_reason = "api_connection_lost".into();
                continue;
            }
        };
        let status = resp.status();
        // Drain the body so the connection can carry the next request.
        let _ = resp.into_body().collect().await;
        if let Some(h) = lock(&stats.request_latency).as_mut() {
            record_ns(h, mono_ns() - t0);
        }
        stats
            .last_ns
            .fetch_max(mono_ns().saturating_sub(opts.epoch_ns), SeqCst);
        match status.as_u16() {
            200..=299 => {
                stats.published.fetch_add(items.len() as u64, SeqCst);
                return;
            }
            429 | 503 => {
                last_reason = format!("http_{}", status.as_u16());
                continue;
            }
            s => {
                last_reason = format!("http_{s}");
                break;
            }
        }
    }
    *lock(&stats.failures).entry(last_reason).or_default() += items.len() as u64;
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_shape() {
        let p: serde_json::Value = serde_json::from_str(&payload(3, 1, 0, 4)).unwrap();
        assert_eq!(p["k"], 3);
        assert_eq!(p["s"], 1);
        assert_eq!(p["pad"], "xxxx");
        assert!(p["t"].as_u64().unwrap() > 0);
    }
}
