//! Results for machines (`--json`) and for people (`--markdown` with `--plots`, and the same
//! summary on stdout).

use std::fmt::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cli::Common;
use crate::run::Results;
use crate::stats::{Counts, Summary};
use crate::svg::{self, Series, XAxis};

/// Writes `--json`, `--plots` and `--markdown` as asked, and prints the summary on stdout.
///
/// # Errors
/// A file could not be written.
pub fn write_all(r: &Results, common: &Common) -> Result<()> {
    if let Some(p) = &common.json {
        let text = serde_json::to_string_pretty(r)?;
        std::fs::write(p, text + "\n").with_context(|| format!("writing {}", p.display()))?;
    }
    let plots = match &common.plots {
        Some(dir) => write_plots(r, dir)?,
        None => Vec::new(),
    };
    let md_dir = common
        .markdown
        .as_ref()
        .and_then(|p| p.parent().map(Path::to_owned))
        .unwrap_or_default();
    let md = markdown(r, &plots, &md_dir);
    if let Some(p) = &common.markdown {
        std::fs::write(p, &md).with_context(|| format!("writing {}", p.display()))?;
    }
    println!("{}", markdown(r, &[], Path::new("")));
    Ok(())
}

/// Formats µs for people.
pub fn dur(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{:.2} s", us as f64 / 1e6)
    } else if us >= 1_000 {
        format!("{:.2} ms", us as f64 / 1e3)
    } else {
        format!("{us} µs")
    }
}

fn bytes(b: f64) -> String {
    let a = b.abs();
    if a >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if a >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if a >= 1024.0 {
        format!("{:.2} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

fn counts(c: &Counts) -> String {
    if c.is_empty() {
        return "none".into();
    }
    c.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn lat_row(name: &str, s: &Summary) -> String {
    format!(
        "| {name} | {} | {} | {} | {} | {} | {} | {} |\n",
        s.count,
        dur(s.p50_us),
        dur(s.p90_us),
        dur(s.p99_us),
        dur(s.p999_us),
        dur(s.max_us),
        dur(s.mean_us as u64)
    )
}

const LAT_HEAD: &str = "| | samples | p50 | p90 | p99 | p99.9 | max | mean |\n|---|---:|---:|---:|---:|---:|---:|---:|\n";

fn write_plots(r: &Results, dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut out = Vec::new();
    let mut save = |name: &str, title: &str, svg: String| -> Result<()> {
        let p = dir.join(format!("{}-{name}.svg", r.scenario));
        std::fs::write(&p, svg).with_context(|| format!("writing {}", p.display()))?;
        out.push((title.to_owned(), p));
        Ok(())
    };
    let h = &r.hists;
    let mut lat = Vec::new();
    if let Some(l) = h.latency.as_ref().filter(|l| !l.is_empty()) {
        lat.push(svg::percentile_series("delivery latency", l));
    }
    if let Some(c) = h.completion.as_ref().filter(|c| !c.is_empty()) {
        lat.push(svg::percentile_series("publish reached all recipients", c));
    }
    if !lat.is_empty() {
        save(
            "latency",
            "Delivery latency by percentile",
            svg::chart(
                &format!("{}: delivery latency by percentile", r.scenario),
                "percentile",
                "ms",
                XAxis::Percentile,
                &lat,
            ),
        )?;
    }
    if let Some(each) = r
        .delivery
        .as_ref()
        .and_then(|d| d.per_publish_completion_us.as_ref())
    {
        let points: Vec<(f64, f64)> = each
            .iter()
            .enumerate()
            .filter_map(|(k, v)| v.map(|us| (k as f64, us as f64 / 1000.0)))
            .collect();
        if !points.is_empty() {
            save(
                "completion",
                "Time until each publish reached every subscriber",
                svg::chart(
                    &format!(
                        "{}: time until each publish reached all subscribers",
                        r.scenario
                    ),
                    "publish number",
                    "ms",
                    XAxis::Linear,
                    &[Series {
                        name: "completion".into(),
                        points,
                    }],
                ),
            )?;
        }
    }
    let rss: Vec<(f64, f64)> = r
        .memory
        .samples
        .iter()
        .filter_map(|m| {
            m.server_rss_bytes
                .map(|b| (m.conns as f64, b as f64 / 1048576.0))
        })
        .collect();
    if rss.len() >= 3 {
        let base = r.memory.samples[0].kernel_slab_bytes.unwrap_or(0) as f64;
        let slab: Vec<(f64, f64)> = r
            .memory
            .samples
            .iter()
            .filter_map(|m| {
                m.kernel_slab_bytes
                    .map(|b| (m.conns as f64, (b as f64 - base) / 1048576.0))
            })
            .collect();
        save(
            "memory",
            "Memory while connecting",
            svg::chart(
                &format!("{}: memory while connecting", r.scenario),
                "connections open",
                "MiB",
                XAxis::Linear,
                &[
                    Series {
                        name: "server RSS".into(),
                        points: rss,
                    },
                    Series {
                        name: "kernel slab growth (both ends, system-wide)".into(),
                        points: slab,
                    },
                ],
            ),
        )?;
    }
    let mut conn = Vec::new();
    if let Some(c) = h.connect.as_ref().filter(|c| !c.is_empty()) {
        conn.push(svg::percentile_series("held connections", c));
    }
    if let Some(l) = h.load.as_ref().filter(|l| !l.is_empty()) {
        conn.push(svg::percentile_series(
            &format!("{} connections", r.scenario),
            l,
        ));
    }
    if !conn.is_empty() {
        save(
            "connect",
            "Time to open a connection by percentile",
            svg::chart(
                &format!(
                    "{}: time to open a connection (TCP + upgrade + ready)",
                    r.scenario
                ),
                "percentile",
                "ms",
                XAxis::Percentile,
                &conn,
            ),
        )?;
    }
    Ok(out)
}

fn relative(p: &Path, base: &Path) -> String {
    let abs = |x: &Path| std::path::absolute(x).unwrap_or_else(|_| x.to_owned());
    let (p2, b2) = (abs(p), abs(base));
    match p2.strip_prefix(&b2) {
        Ok(rel) => rel.display().to_string(),
        Err(_) => p2.display().to_string(),
    }
}

/// The summary in markdown, linking `plots` relative to `md_dir`.
pub fn markdown(r: &Results, plots: &[(String, PathBuf)], md_dir: &Path) -> String {
    let mut s = String::new();
    let m = &r.machine;
    let t = &r.target;
    let _ = writeln!(s, "# herald-bench {}: {}\n", r.scenario, t.kind_name());
    if let Some(l) = &r.label {
        let _ = writeln!(s, "{l}\n");
    }
    let _ = writeln!(s, "- command: `{}`", r.command_line);
    let _ = writeln!(
        s,
        "- machine: {} · {} cores · {} RAM · Linux {} · open files {}",
        m.cpu_model,
        m.nr_cpus,
        bytes(m.mem_total_bytes as f64),
        m.kernel,
        m.nofile_limit
    );
    let _ = writeln!(
        s,
        "- target: {} {} (api {}){}{}",
        t.kind_name(),
        t.url,
        t.api,
        t.shards
            .map(|n| format!(", {n} shards"))
            .unwrap_or_default(),
        t.server_pid
            .map(|p| format!(", pid {p}"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        s,
        "- client: {} worker process(es){}, {} source address(es)\n",
        r.workers,
        if r.workers == 0 { " (in-process)" } else { "" },
        r.sources.max(1)
    );

    let c = &r.connect;
    let _ = writeln!(s, "## Connections\n");
    let _ = writeln!(
        s,
        "{} of {} connected in {:.2} s ({:.0}/s); failures: {}.\n",
        c.connected,
        c.attempted,
        c.elapsed_s,
        c.rate_per_s,
        counts(&c.failures)
    );
    if c.latency.count > 0 {
        s.push_str(LAT_HEAD);
        s.push_str(&lat_row("time to open", &c.latency));
        s.push('\n');
    }
    let mem = &r.memory;
    if mem.server_after.is_some() || mem.kernel_after.is_some() {
        let _ = writeln!(s, "## Memory\n");
        s.push_str("| | before | after connecting | per connection |\n|---|---:|---:|---:|\n");
        if let (Some(b), Some(a)) = (mem.server_before, mem.server_after) {
            let _ = writeln!(
                s,
                "| server RSS | {} | {} | {} |",
                bytes(b.rss_bytes as f64),
                bytes(a.rss_bytes as f64),
                mem.server_rss_per_conn_bytes.map(bytes).unwrap_or_default()
            );
            let _ = writeln!(
                s,
                "| server anonymous RSS | {} | {} | {} |",
                bytes(b.rss_anon_bytes as f64),
                bytes(a.rss_anon_bytes as f64),
                mem.server_anon_per_conn_bytes
                    .map(bytes)
                    .unwrap_or_default()
            );
        }
        if let (Some(b), Some(a)) = (mem.kernel_before, mem.kernel_after) {
            let _ = writeln!(
                s,
                "| kernel TCP buffers (sockstat mem) | {} | {} | {} |",
                bytes(b.mem_bytes as f64),
                bytes(a.mem_bytes as f64),
                mem.kernel_tcp_mem_per_conn_bytes
                    .map(bytes)
                    .unwrap_or_default()
            );
            let _ = writeln!(
                s,
                "| kernel slab | {} | {} | {} |",
                bytes(b.slab_bytes as f64),
                bytes(a.slab_bytes as f64),
                mem.kernel_slab_per_conn_bytes
                    .map(bytes)
                    .unwrap_or_default()
            );
            let _ = writeln!(s, "| TCP sockets in use | {} | {} | |", b.inuse, a.inuse);
        }
        if mem.server_rss_slope_bytes_per_conn.is_some()
            || mem.kernel_slab_slope_bytes_per_conn.is_some()
        {
            let _ = writeln!(
                s,
                "| marginal cost (slope over {} readings while connecting) | | | server RSS {} · kernel slab {} |",
                mem.samples.len(),
                mem.server_rss_slope_bytes_per_conn
                    .map(bytes)
                    .unwrap_or("n/a".into()),
                mem.kernel_slab_slope_bytes_per_conn
                    .map(bytes)
                    .unwrap_or("n/a".into())
            );
        }
        if let Some(h) = mem.server_after_hold {
            let _ = writeln!(
                s,
                "| server RSS after the hold | | {} | |",
                bytes(h.rss_bytes as f64)
            );
        }
        let _ = writeln!(
            s,
            "\nBench processes' own RSS: {}. Kernel figures are system-wide: on loopback they \
             include the bench's client sockets (both ends of each connection).\n",
            bytes(mem.client_rss_bytes as f64)
        );
    }
    if let Some(p) = &r.publish {
        let _ = writeln!(s, "## Publishing\n");
        let _ = writeln!(
            s,
            "{} of {} publishes accepted in {:.2} s ({:.0}/s{}, {} per request); retries {}; \
             failures: {}. Request round trip p50 {}, p99 {}, max {}.\n",
            p.published,
            p.planned,
            p.elapsed_s,
            p.rate_per_s,
            if p.target_rate_per_s > 0.0 {
                format!(", asked {:.0}/s", p.target_rate_per_s)
            } else {
                ", flat out".into()
            },
            p.batch,
            p.retries,
            counts(&p.failures),
            dur(p.request_latency.p50_us),
            dur(p.request_latency.p99_us),
            dur(p.request_latency.max_us)
        );
    }
    if let Some(d) = &r.delivery {
        let _ = writeln!(s, "## Delivery\n");
        let _ = writeln!(
            s,
            "| expected | delivered | lost (open conns) | lost (closed by server) | reordered | delivered/s | last publish → last receipt |\n|---:|---:|---:|---:|---:|---:|---:|\n| {} | {} | {} | {} | {} | {:.0} | {:.3} s |\n",
            d.expected,
            d.delivered,
            d.lost_open,
            d.lost_closed,
            d.reordered,
            d.delivered_per_s,
            d.tail_s
        );
        s.push_str(LAT_HEAD);
        s.push_str(&lat_row("publish → receipt", &d.latency));
        s.push_str(&lat_row("publish → all recipients", &d.completion));
        let _ = writeln!(
            s,
            "\n{} publishes reached all their recipients, {} did not. Latency includes the \
             publish request, the server's fan-out and the bench's own reading (same machine).\n",
            d.complete_publishes, d.incomplete_publishes
        );
    }
    if let Some(l) = &r.load {
        let _ = writeln!(s, "## {}\n", r.scenario);
        let _ = writeln!(
            s,
            "{} of {} connections ready in {:.2} s: **{:.0}/s**{}; failures: {}; skipped: {}; \
             closed early by the server: {}.\n",
            l.succeeded,
            l.attempted,
            l.elapsed_s,
            l.rate_per_s,
            if l.target_rate_per_s > 0.0 {
                format!(" (asked {:.0}/s)", l.target_rate_per_s)
            } else {
                String::new()
            },
            counts(&l.failures),
            l.skipped,
            counts(&l.early_closes)
        );
        s.push_str(LAT_HEAD);
        s.push_str(&lat_row("time to ready", &l.latency));
        s.push('\n');
    }
    let h = &r.held;
    let _ = writeln!(
        s,
        "Held connections open at the end: {}; ended by the server: {}; unexpected frames: {}.\n",
        h.open_at_end,
        counts(&h.closes),
        counts(&h.unexpected)
    );
    let cpu = &r.cpu;
    if cpu.phase_s > 0.0 && (cpu.server_s.is_some() || cpu.bench_s.is_some()) {
        let _ = writeln!(
            s,
            "CPU in the measured phase ({:.2} s): server {}, bench {}.\n",
            cpu.phase_s,
            cpu.server_s
                .map(|v| format!("{v:.2} s"))
                .unwrap_or("n/a".into()),
            cpu.bench_s
                .map(|v| format!("{v:.2} s"))
                .unwrap_or("n/a".into())
        );
    }
    for (title, p) in plots {
        let _ = writeln!(s, "![{title}]({})\n", relative(p, md_dir));
    }
    if r.problems.is_empty() {
        let _ = writeln!(s, "No loss, no reordering, no failures.");
    } else {
        let _ = writeln!(s, "## Problems\n");
        for p in &r.problems {
            let _ = writeln!(s, "- {p}");
        }
    }
    s
}

impl crate::run::TargetInfo {
    fn kind_name(&self) -> &'static str {
        match self.kind {
            crate::cli::TargetKind::Herald => "herald",
            crate::cli::TargetKind::Peer => "peer",
        }
    }
}
