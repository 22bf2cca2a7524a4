//! The Prometheus exposition of the node's counters (`GET /metrics`): a `prometheus-client`
//! collector that reads the shards' [`ShardStats`] and the hub's gauges on each scrape, in
//! OpenMetrics or the Prometheus text format. It sits above the [`Hub`] and the counters it
//! reads; nothing on the hot path knows about Prometheus.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::hub::Hub;
use crate::metrics::{ShardStats, read};
use crate::ws::close::CLOSE_CODES;
use crate::ws::handshake::HandshakeOutcome;

/// The `/metrics` collector: reads the hub's counters on each scrape.
#[derive(Debug)]
struct HubCollector(Arc<Hub>);

/// One counter summed over the shards.
fn sum(hub: &Hub, pick: impl Fn(&ShardStats) -> &AtomicU64) -> u64 {
    hub.stats.iter().map(|s| read(pick(s))).sum()
}

/// A gauge kept by each shard, one sample per shard.
fn shard_gauge(
    enc: &mut DescriptorEncoder<'_>,
    hub: &Hub,
    name: &str,
    help: &str,
    pick: impl Fn(&ShardStats) -> &AtomicU64,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (i, s) in hub.stats.iter().enumerate() {
        m.encode_family(&[("shard", i.to_string().as_str())])?
            .encode_gauge(&read(pick(s)))?;
    }
    Ok(())
}

fn counter(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    enc.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&value, None)
}

impl Collector for HubCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let hub = &*self.0;
        let shards: Vec<String> = (0..hub.nr_shards()).map(|i| i.to_string()).collect();

        let mut m = enc.encode_descriptor(
            "herald_connections",
            "Open (authenticated) connections, per shard.",
            None,
            MetricType::Gauge,
        )?;
        for (i, s) in hub.stats.iter().enumerate() {
            let v = s.connections.load(Ordering::Relaxed).max(0);
            m.encode_family(&[("shard", shards[i].as_str())])?
                .encode_gauge(&v)?;
        }

        let mut m = enc.encode_descriptor(
            "herald_project_connections",
            "Open connections, per project.",
            None,
            MetricType::Gauge,
        )?;
        for p in hub.registry.load().projects() {
            let v = p.nr_connections.load(Ordering::Relaxed) as u64;
            m.encode_family(&[("project", &*p.id)])?.encode_gauge(&v)?;
        }

        let gauge = |enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64| {
            enc.encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&v)
                .map(|_| ())
        };
        let node = hub.nr_connections.load(Ordering::Relaxed);
        gauge(
            &mut enc,
            "herald_connection_cap",
            "server.max_connections (0 = no cap).",
            hub.max_connections as u64,
        )?;
        gauge(
            &mut enc,
            "herald_connections_near_cap",
            "1 while open connections are at or above 90% of server.max_connections.",
            u64::from(crate::protection::limiter::near_cap(
                node,
                hub.max_connections,
            )),
        )?;
        let registry = hub.registry.load();
        let mut m = enc.encode_descriptor(
            "herald_project_connection_cap",
            "Each project's max_connections (0 = no cap).",
            None,
            MetricType::Gauge,
        )?;
        for p in registry.projects() {
            m.encode_family(&[("project", &*p.id)])?
                .encode_gauge(&(p.max_connections as u64))?;
        }
        let mut m = enc.encode_descriptor(
            "herald_project_connections_near_cap",
            "1 while a project's connections are at or above 90% of its max_connections.",
            None,
            MetricType::Gauge,
        )?;
        for p in registry.projects() {
            let n = p.nr_connections.load(Ordering::Relaxed);
            m.encode_family(&[("project", &*p.id)])?
                .encode_gauge(&u64::from(crate::protection::limiter::near_cap(
                    n,
                    p.max_connections,
                )))?;
        }
        shard_gauge(
            &mut enc,
            hub,
            "herald_pending_handshakes",
            "Handshakes in progress per shard (as of its last sweep tick).",
            |s| &s.pending_handshakes,
        )?;
        shard_gauge(
            &mut enc,
            hub,
            "herald_expiry_entries",
            "Token-expiry entries per shard, live and stale (as of its last sweep tick); at most \
             twice the shard's connections plus 64.",
            |s| &s.expiry_entries,
        )?;
        counter(
            &mut enc,
            "herald_write_coalesce_waits",
            "Times a shard waited server.write_coalesce_ms before writing a publication to many \
             connections, its previous such write being less than two waits old (publications \
             arriving meanwhile share its sends).",
            sum(hub, |s| &s.coalesce_waits),
        )?;
        counter(
            &mut enc,
            "herald_ring_sends",
            "Sends submitted through the shards' write rings (server.write_batch = \"io_uring\"), \
             one per connection written at the end of a batch.",
            sum(hub, |s| &s.ring_sends),
        )?;
        counter(
            &mut enc,
            "herald_ring_sends_unfinished",
            "Of those sends, the ones that left bytes queued (a partial write, a full socket \
             buffer, an interruption or an error); the connection then waits for writability.",
            sum(hub, |s| &s.ring_sends_unfinished),
        )?;
        counter(
            &mut enc,
            "herald_allocator_collects",
            "Times a shard's sweep asked the allocator to return the memory the shard's arrays \
             freed when they changed size (at most once per sweep tick, only after a change).",
            sum(hub, |s| &s.allocator_collects),
        )?;
        enc.encode_descriptor(
            "herald_allocator_collect_seconds",
            "Time those requests took, in all.",
            None,
            MetricType::Counter,
        )?
        .encode_counter::<NoLabelSet, _, u64>(
            &(sum(hub, |s| &s.allocator_collect_us) as f64 / 1e6),
            None,
        )?;
        gauge(
            &mut enc,
            "herald_api_connections",
            "Open API connections (bounded by api.max_connections).",
            read(&hub.api_connections),
        )?;
        gauge(
            &mut enc,
            "herald_client_addresses",
            "Client addresses holding connections or handshakes (counted while \
             limits.connections_per_ip or limits.max_pending_handshakes_per_ip is on).",
            hub.ip_conns.addresses() as u64,
        )?;

        let mut m = enc.encode_descriptor(
            "herald_handshakes",
            "Handshakes by outcome (accepted or the refusal reason).",
            None,
            MetricType::Counter,
        )?;
        for outcome in HandshakeOutcome::ALL {
            let v = sum(hub, |s| &s.handshakes[outcome.index()]);
            m.encode_family(&[("outcome", outcome.label())])?
                .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
        }

        let published = read(&hub.api_published) + sum(hub, |s| &s.published);
        counter(
            &mut enc,
            "herald_messages_published",
            "Publishes accepted (API and client), each counted once.",
            published,
        )?;
        counter(
            &mut enc,
            "herald_api_rate_limited",
            "API requests refused 429 for their key's request rate.",
            read(&hub.api_rate_limited),
        )?;
        counter(
            &mut enc,
            "herald_messages_delivered",
            "Messages queued to a connection.",
            sum(hub, |s| &s.delivered),
        )?;
        counter(
            &mut enc,
            "herald_messages_dropped",
            "Messages not queued: connection closing or over its queue cap.",
            sum(hub, |s| &s.dropped),
        )?;
        counter(
            &mut enc,
            "herald_slow_consumer_closes",
            "Connections closed (4008) for a full outbound queue.",
            sum(hub, |s| &s.slow_consumer_closes),
        )?;

        let mut m = enc.encode_descriptor(
            "herald_closes",
            "Close frames sent, by close code.",
            None,
            MetricType::Counter,
        )?;
        for (i, code) in CLOSE_CODES.iter().enumerate() {
            let v = sum(hub, |s| &s.closes[i]);
            m.encode_family(&[("code", code.to_string())])?
                .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
        }

        counter(
            &mut enc,
            "herald_bytes_in",
            "Bytes read from clients.",
            sum(hub, |s| &s.bytes_in),
        )?;
        counter(
            &mut enc,
            "herald_bytes_out",
            "Bytes written to clients.",
            sum(hub, |s| &s.bytes_out),
        )?;

        let mut m = enc.encode_descriptor(
            "herald_shard_inbox_depth",
            "Messages waiting in each shard's inbox.",
            None,
            MetricType::Gauge,
        )?;
        for (i, mb) in hub.mailboxes.iter().enumerate() {
            m.encode_family(&[("shard", shards[i].as_str())])?
                .encode_gauge(&(mb.depth() as u64))?;
        }

        let mut m = enc.encode_descriptor(
            "herald_publish_enqueue_seconds",
            "Time from accepting a publish to queueing it to the shard's last subscriber.",
            None,
            MetricType::Histogram,
        )?;
        for (i, s) in hub.stats.iter().enumerate() {
            let (total, count, buckets) = s.publish_enqueue.snapshot();
            m.encode_family(&[("shard", shards[i].as_str())])?
                .encode_histogram::<NoLabelSet>(total, count, &buckets, None)?;
        }
        encode_history(&mut enc, &hub.history.stats)?;
        if let Some(engine) = hub.broker.engine() {
            encode_engine(&mut enc, engine)?;
        }
        if let Some(control) = hub.broker.control() {
            counter(
                &mut enc,
                "herald_engine_control_requests_dropped",
                "Connection-management requests from other nodes dropped because this node's \
                 queue of them was full (the askers report this node as not answering).",
                read(&control.dropped_requests),
            )?;
        }
        encode_flow(&mut enc, hub)
    }
}

/// Node-wide flow control ([`crate::flow`]): what is queued, the budget, and the refusals.
fn encode_flow(enc: &mut DescriptorEncoder<'_>, hub: &Hub) -> Result<(), std::fmt::Error> {
    let gauge = |enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64| {
        enc.encode_descriptor(name, help, None, MetricType::Gauge)?
            .encode_gauge(&v)
    };
    gauge(
        enc,
        "herald_outbound_queued_bytes",
        "Outbound bytes queued on the node: every connection's queue plus the shards' inboxes.",
        crate::flow::Flow::queued_bytes(&hub.stats, &hub.mailboxes),
    )?;
    gauge(
        enc,
        "herald_outbound_budget_bytes",
        "flow.max_queued_bytes in force: publishes are refused 503 overloaded at or above it.",
        hub.flow.max_queued_bytes,
    )?;
    let mut m = enc.encode_descriptor(
        "herald_publish_rejected",
        "Publications refused 503 overloaded (API) or error limit (client), by reason.",
        None,
        MetricType::Counter,
    )?;
    for (reason, v) in crate::flow::Overload::REASONS
        .iter()
        .zip(hub.flow.rejected())
    {
        m.encode_family(&[("reason", *reason)])?
            .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
    }
    counter(
        enc,
        "herald_engine_deliveries_over_budget",
        "Publications from the engine delivered while the node was over its budget or behind.",
        hub.flow.engine_over(),
    )
}

/// The message history's metrics.
fn encode_history(
    enc: &mut DescriptorEncoder<'_>,
    h: &crate::history::HistoryStats,
) -> Result<(), std::fmt::Error> {
    for (name, help, v) in [
        (
            "herald_history_bytes",
            "Bytes the message history holds (messages and topics, as counted against \
             server.history_max_bytes).",
            &h.bytes,
        ),
        (
            "herald_history_entries",
            "Messages the message history holds.",
            &h.entries,
        ),
        (
            "herald_history_streams",
            "Topics the message history holds messages of.",
            &h.streams,
        ),
    ] {
        enc.encode_descriptor(name, help, None, MetricType::Gauge)?
            .encode_gauge(&read(v))?;
    }
    counter(
        enc,
        "herald_history_evicted",
        "Messages dropped from the history, oldest first, to stay under \
         server.history_max_bytes.",
        read(&h.evicted_cap),
    )?;
    let mut m = enc.encode_descriptor(
        "herald_history_recoveries",
        "Recoveries (subscribe with since, recover) by outcome: recovered, or why nothing \
         was replayed (epoch_changed, expired, too_many, over_limit).",
        None,
        MetricType::Counter,
    )?;
    m.encode_family(&[("outcome", "recovered")])?
        .encode_counter::<NoLabelSet, _, u64>(&read(&h.recovered), None)?;
    for (why, v) in crate::history::Unrecoverable::ALL
        .iter()
        .zip(&h.not_recovered)
    {
        m.encode_family(&[("outcome", why.as_str())])?
            .encode_counter::<NoLabelSet, _, u64>(&read(v), None)?;
    }
    Ok(())
}

/// The engine's metrics, present only on a node with `[engine]`.
fn encode_engine(
    enc: &mut DescriptorEncoder<'_>,
    e: &crate::broker::EngineStats,
) -> Result<(), std::fmt::Error> {
    enc.encode_descriptor(
        "herald_engine_up",
        "1 while connected to the engine with the node's subscriptions in place.",
        None,
        MetricType::Gauge,
    )?
    .encode_gauge(&u64::from(e.up.load(Ordering::Relaxed)))?;
    enc.encode_descriptor(
        "herald_engine_channels",
        "Engine channels the node is subscribed to (topics with local subscribers, and \
         lingering ones).",
        None,
        MetricType::Gauge,
    )?
    .encode_gauge(&read(&e.channels))?;
    enc.encode_descriptor(
        "herald_history_engine_reads_pending",
        "Reads of streams of topics with history waiting for the node's engine subscription \
         of their topic (while the engine is away, until it is back).",
        None,
        MetricType::Gauge,
    )?
    .encode_gauge(&read(&e.reads_pending))?;
    for (name, help, v) in [
        (
            "herald_engine_connects",
            "Connections to the engine made (the first and every reconnection).",
            &e.connects,
        ),
        (
            "herald_engine_disconnects",
            "Connections to the engine lost.",
            &e.disconnects,
        ),
        (
            "herald_engine_published",
            "Messages (one per topic) the engine acknowledged.",
            &e.published,
        ),
        (
            "herald_engine_received",
            "Messages received from the node's engine subscriptions.",
            &e.received,
        ),
        (
            "herald_engine_interest_overflows",
            "Interest changes that found the queue to the engine full (each makes the node \
             reconcile its subscriptions with its whole interest table).",
            &e.changes_overflowed,
        ),
    ] {
        counter(enc, name, help, read(v))?;
    }
    let mut m = enc.encode_descriptor(
        "herald_engine_dropped",
        "Messages from the engine not delivered, by reason: queue_full (the queue to the \
         delivery loop), inbox_full (per shard), draining, unknown_project, malformed.",
        None,
        MetricType::Counter,
    )?;
    for (reason, v) in [
        ("queue_full", &e.dropped_queue_full),
        ("inbox_full", &e.dropped_inbox_full),
        ("draining", &e.dropped_draining),
        ("unknown_project", &e.dropped_unknown),
        ("malformed", &e.dropped_malformed),
    ] {
        m.encode_family(&[("reason", reason)])?
            .encode_counter::<NoLabelSet, _, u64>(&read(v), None)?;
    }
    for (name, help, label, values) in [
        (
            "herald_history_engine_reads",
            "Streams of topics with history read from the engine (for a subscribe, a recover \
             or a welcome), by outcome: ok, or error (failed or no answer in time: the node's \
             copy answered).",
            "outcome",
            [
                ("ok", &e.history_reads_ok),
                ("error", &e.history_reads_failed),
            ],
        ),
        (
            "herald_history_repairs",
            "Gaps in topics with history (messages the node missed) by outcome: repaired \
             (delivered from the stream), or resync (the stream no longer held them: \
             subscribers told to resync).",
            "outcome",
            [("repaired", &e.repairs_done), ("resync", &e.repairs_resync)],
        ),
    ] {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (outcome, v) in values {
            m.encode_family(&[(label, outcome)])?
                .encode_counter::<NoLabelSet, _, u64>(&read(v), None)?;
        }
    }
    Ok(())
}

/// The two text formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text (`application/openmetrics-text`), what prometheus-client writes.
    OpenMetrics,
    /// The Prometheus text format 0.0.4 (`text/plain; version=0.0.4`).
    PrometheusText,
}

impl Format {
    /// The format an `Accept` header asks for: the supported media range with the highest
    /// `q` (`application/openmetrics-text`, or `text/plain`); on a tie, OpenMetrics. With no
    /// `Accept`, or one naming neither (`*/*`), OpenMetrics.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let mut best = (0.0f32, Self::OpenMetrics);
        for range in accept.unwrap_or_default().split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .and_then(|(_, v)| v.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            let format = match media.as_str() {
                "application/openmetrics-text" => Self::OpenMetrics,
                "text/plain" => Self::PrometheusText,
                _ => continue,
            };
            if q > best.0 || (q == best.0 && format == Self::OpenMetrics && q > 0.0) {
                best = (q, format);
            }
        }
        best.1
    }

    /// The `Content-Type` of an answer in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => CONTENT_TYPE,
            Self::PrometheusText => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// The exposition of the node's counters, read now, in `format`.
///
/// # Errors
/// Formatting failed (never, for a `String`).
pub fn encode_as(hub: &Arc<Hub>, format: Format) -> Result<String, std::fmt::Error> {
    let text = encode(hub)?;
    Ok(match format {
        Format::OpenMetrics => text,
        Format::PrometheusText => openmetrics_to_prometheus_text(&text),
    })
}

/// Rewrites prometheus-client's OpenMetrics text as the Prometheus text format 0.0.4, which
/// prometheus-client does not write: a counter family is named after its samples (`x_total`,
/// where OpenMetrics names it `x`), `# UNIT` lines, `_created` samples and the `# EOF`
/// terminator go, `unknown` is `untyped`. Everything else (label escaping, histograms, gauges,
/// sample lines) is the same in both formats.
fn openmetrics_to_prometheus_text(om: &str) -> String {
    let lines: Vec<&str> = om.lines().collect();
    let mut out = String::with_capacity(om.len());
    let mut counters = std::collections::HashSet::new();
    for l in &lines {
        if let Some(rest) = l.strip_prefix("# TYPE ")
            && let Some((name, "counter")) = rest.split_once(' ')
        {
            counters.insert(name);
        }
    }
    for l in lines {
        if l == "# EOF" || l.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| l.strip_prefix(p).map(|rest| (p, rest)));
        if let Some((prefix, rest)) = meta {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let tail = if prefix == "# TYPE " && tail == "unknown" {
                "untyped"
            } else {
                tail
            };
            let suffix = if counters.contains(name) {
                "_total"
            } else {
                ""
            };
            out.push_str(&format!("{prefix}{name}{suffix} {tail}\n"));
            continue;
        }
        let name = l.split(['{', ' ']).next().unwrap_or_default();
        if name.ends_with("_created") {
            continue;
        }
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// The Prometheus (OpenMetrics text) exposition of the node's counters, read now.
///
/// # Errors
/// Formatting failed (never, for a `String`).
pub fn encode(hub: &Arc<Hub>) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(HubCollector(hub.clone())));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// Content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_picks_the_format() {
        use Format::*;
        assert_eq!(Format::negotiate(None), OpenMetrics);
        assert_eq!(Format::negotiate(Some("*/*")), OpenMetrics);
        assert_eq!(
            Format::negotiate(Some("text/plain;version=0.0.4")),
            PrometheusText
        );
        assert_eq!(Format::negotiate(Some("text/plain")), PrometheusText);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text; version=1.0.0")),
            OpenMetrics
        );
        // What Prometheus sends: OpenMetrics preferred.
        assert_eq!(
            Format::negotiate(Some(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                 version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
            )),
            OpenMetrics
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0.2, text/plain;q=0.9")),
            PrometheusText
        );
    }

    #[test]
    fn openmetrics_becomes_prometheus_text() {
        let om = "# HELP a_x Things.\n# TYPE a_x counter\na_x_total{k=\"v\"} 3\n\
                  a_x_created 1.5\n# HELP g A gauge.\n# TYPE g gauge\n# UNIT g seconds\ng 2\n\
                  # HELP u U.\n# TYPE u unknown\nu 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_prometheus_text(om),
            "# HELP a_x_total Things.\n# TYPE a_x_total counter\na_x_total{k=\"v\"} 3\n\
             # HELP g A gauge.\n# TYPE g gauge\ng 2\n# HELP u U.\n# TYPE u untyped\nu 1\n"
        );
    }
}
