#!/usr/bin/env python3
"""Builds the markdown ratio table of benches/compare from herald-bench's --json files.

Reads DIR/json/<scenario>.<server>.r<round>.json, takes the median over rounds of each figure,
and prints markdown: the figures of every server, then the reference server's (`--reference`,
default herald) ratio to each other one.
Standard library only.
"""

import argparse
import glob
import json
import os
import re
import statistics
import subprocess

# (key, scenario, label, unit, path in the JSON, better: "high" | "low")
FIGURES = [
    ("hold.rss", "hold", "idle: server RSS per connection", "bytes",
     ("memory", "server_rss_per_conn_bytes"), "low"),
    ("hold.anon", "hold", "idle: server anonymous RSS per connection", "bytes",
     ("memory", "server_anon_per_conn_bytes"), "low"),
    ("hold.slope", "hold", "idle: server RSS slope while connecting", "bytes",
     ("memory", "server_rss_slope_bytes_per_conn"), "low"),
    ("hold.connect", "hold", "idle: connects per second (5000 conns)", "/s",
     ("connect", "rate_per_s"), "high"),
    ("bf.dps", "bcast-flat", "broadcast flat out: delivered msgs/s", "/s",
     ("delivery", "delivered_per_s"), "high"),
    ("bf.pubs", "bcast-flat", "broadcast flat out: publishes/s", "/s",
     ("publish", "rate_per_s"), "high"),
    ("bf.c50", "bcast-flat", "broadcast flat out: completion p50", "µs",
     ("delivery", "completion", "p50_us"), "low"),
    ("bf.cmax", "bcast-flat", "broadcast flat out: completion max", "µs",
     ("delivery", "completion", "max_us"), "low"),
    ("bf.l50", "bcast-flat", "broadcast flat out: latency p50", "µs",
     ("delivery", "latency", "p50_us"), "low"),
    ("bf.l99", "bcast-flat", "broadcast flat out: latency p99", "µs",
     ("delivery", "latency", "p99_us"), "low"),
    ("bf.cpu", "bcast-flat", "broadcast flat out: server CPU per 1M deliveries", "s",
     None, "low"),
    ("bf.tail", "bcast-flat", "broadcast flat out: last publish → last delivery", "µs",
     ("delivery", "tail_s"), "low"),
    ("bb.dps", "bcast-bounded", "broadcast at p99 ≤ 100 ms: delivered msgs/s", "/s",
     ("bounded", "delivered_per_s"), "high"),
    ("bb.rate", "bcast-bounded", "broadcast at p99 ≤ 100 ms: publishes/s", "/s",
     ("bounded", "rate_per_s"), "high"),
    ("bb.p99", "bcast-bounded", "broadcast at p99 ≤ 100 ms: latency p99", "µs",
     ("bounded", "p99_us"), "low"),
    ("bb.fdps", "bcast-bounded", "broadcast flat out (same N): delivered msgs/s", "/s",
     ("bounded", "flat_delivered_per_s"), "high"),
    ("bb.fp99", "bcast-bounded", "broadcast flat out (same N): latency p99", "µs",
     ("bounded", "flat_p99_us"), "low"),
    ("bb.tail", "bcast-bounded", "broadcast flat out (same N): last publish → last delivery", "µs",
     ("bounded", "flat_tail_s"), "low"),
    ("br.c50", "bcast-rate", "broadcast 50/s: completion p50", "µs",
     ("delivery", "completion", "p50_us"), "low"),
    ("br.cmax", "bcast-rate", "broadcast 50/s: completion max", "µs",
     ("delivery", "completion", "max_us"), "low"),
    ("br.l50", "bcast-rate", "broadcast 50/s: latency p50", "µs",
     ("delivery", "latency", "p50_us"), "low"),
    ("br.l99", "bcast-rate", "broadcast 50/s: latency p99", "µs",
     ("delivery", "latency", "p99_us"), "low"),
    ("br.cpu", "bcast-rate", "broadcast 50/s: server CPU per 1M deliveries", "s",
     None, "low"),
    ("b5.dps", "bcast-5k", "broadcast 100/s to 5,000: delivered msgs/s", "/s",
     ("delivery", "delivered_per_s"), "high"),
    ("b5.c50", "bcast-5k", "broadcast 100/s to 5,000: completion p50", "µs",
     ("delivery", "completion", "p50_us"), "low"),
    ("b5.cmax", "bcast-5k", "broadcast 100/s to 5,000: completion max", "µs",
     ("delivery", "completion", "max_us"), "low"),
    ("b5.l50", "bcast-5k", "broadcast 100/s to 5,000: latency p50", "µs",
     ("delivery", "latency", "p50_us"), "low"),
    ("b5.l99", "bcast-5k", "broadcast 100/s to 5,000: latency p99", "µs",
     ("delivery", "latency", "p99_us"), "low"),
    ("b5.cpu", "bcast-5k", "broadcast 100/s to 5,000: server CPU per 1M deliveries", "s",
     None, "low"),
    ("h10.rss", "hold-10k", "idle 10,000: server RSS per connection", "bytes",
     ("memory", "server_rss_per_conn_bytes"), "low"),
    ("b10.dps", "bcast-10k", "broadcast flat out to 10,000: delivered msgs/s", "/s",
     ("delivery", "delivered_per_s"), "high"),
    ("b10.pubs", "bcast-10k", "broadcast flat out to 10,000: publishes/s", "/s",
     ("publish", "rate_per_s"), "high"),
    ("b10.l50", "bcast-10k", "broadcast flat out to 10,000: latency p50", "µs",
     ("delivery", "latency", "p50_us"), "low"),
    ("b10.cpu", "bcast-10k", "broadcast flat out to 10,000: server CPU per 1M deliveries", "s",
     None, "low"),
    ("b10r.dps", "bcast-rate-10k", "broadcast 10/s to 10,000: delivered msgs/s", "/s",
     ("delivery", "delivered_per_s"), "high"),
    ("b10r.l50", "bcast-rate-10k", "broadcast 10/s to 10,000: latency p50", "µs",
     ("delivery", "latency", "p50_us"), "low"),
    ("b10r.l99", "bcast-rate-10k", "broadcast 10/s to 10,000: latency p99", "µs",
     ("delivery", "latency", "p99_us"), "low"),
    ("b10r.cpu", "bcast-rate-10k", "broadcast 10/s to 10,000: server CPU per 1M deliveries",
     "s", None, "low"),
    ("uc.dps", "unicast", "unicast flat out: delivered msgs/s", "/s",
     ("delivery", "delivered_per_s"), "high"),
    ("uc.l50", "unicast", "unicast flat out: latency p50", "µs",
     ("delivery", "latency", "p50_us"), "low"),
    ("uc.l99", "unicast", "unicast flat out: latency p99", "µs",
     ("delivery", "latency", "p99_us"), "low"),
    ("gr.dps", "groups", "groups flat out: delivered msgs/s", "/s",
     ("delivery", "delivered_per_s"), "high"),
    ("gr.l50", "groups", "groups flat out: latency p50", "µs",
     ("delivery", "latency", "p50_us"), "low"),
    ("gr.l99", "groups", "groups flat out: latency p99", "µs",
     ("delivery", "latency", "p99_us"), "low"),
    ("hs.rate", "handshake", "handshakes/s (64 loops, flat out)", "/s",
     ("load", "rate_per_s"), "high"),
    ("hs.l50", "handshake", "handshake: connect to welcome p50", "µs",
     ("load", "latency", "p50_us"), "low"),
    ("hs.l99", "handshake", "handshake: connect to welcome p99", "µs",
     ("load", "latency", "p99_us"), "low"),
    ("hs.cpu", "handshake", "handshake: server CPU per handshake", "µs",
     None, "low"),
]

SCENARIO_TEXT = {
    "hold": "hold",
    "bcast-rate": "broadcast (50 publishes/s)",
    "bcast-flat": "broadcast (flat out)",
    "bcast-5k": "broadcast (100 publishes/s to 5,000)",
    "bcast-bounded": "broadcast (rate search, p99 ≤ 100 ms; flat-out run shown)",
    "unicast": "unicast",
    "groups": "groups",
    "handshake": "handshake",
}


def dig(d, path):
    for p in path:
        if not isinstance(d, dict) or d.get(p) is None:
            return None
        d = d[p]
    return d


def value(doc, key, path):
    if key == "hs.cpu":
        cpu = dig(doc, ("cpu", "server_s"))
        done = dig(doc, ("load", "succeeded"))
        return cpu / done * 1e6 if cpu is not None and done else None
    if key.endswith(".tail"):
        tail = dig(doc, path)
        return tail * 1e6 if tail is not None else None
    if key.endswith(".cpu"):
        cpu = dig(doc, ("cpu", "server_s"))
        delivered = dig(doc, ("delivery", "delivered"))
        if cpu is None or not delivered:
            return None
        return cpu / delivered * 1e6
    return dig(doc, path)


def fmt(v, unit):
    if v is None:
        return "—"
    if unit == "bytes":
        return f"{v / 1024:,.1f} KiB" if abs(v) >= 1024 else f"{v:,.0f} B"
    if unit == "µs":
        return f"{v / 1000:,.2f} ms" if v >= 1000 else f"{v:,.0f} µs"
    if unit == "/s":
        return f"{v:,.0f}"
    if unit == "s":
        return f"{v:.2f} s"
    return f"{v}"


def ratio(h, p, better):
    """herald ÷ peer, marked ✓ when herald is at least as good."""
    if h is None or p is None or p == 0 or (h <= 0 and better == "low"):
        return "—"
    r = h / p
    good = r >= 1 if better == "high" else r <= 1
    if better == "high":
        word = f"{r:.2f}×"
    else:
        word = f"{r:.2f}×"
    return f"{word} {'✓' if good else '✗'}"


def loss_cell(docs):
    if not docs:
        return "—"
    lost = sum((dig(d, ("delivery", "lost_open")) or 0) + (dig(d, ("delivery", "lost_closed")) or 0)
               for d in docs)
    reo = sum(dig(d, ("delivery", "reordered")) or 0 for d in docs)
    exp = sum(dig(d, ("delivery", "expected")) or 0 for d in docs)
    fails = sum((dig(d, ("connect", "attempted")) or 0) - (dig(d, ("connect", "connected")) or 0)
                for d in docs)
    closed = sum(sum((dig(d, ("held", "closes")) or {}).values()) for d in docs)
    if not any(d.get("delivery") for d in docs):
        return f"{fails} connect failures, {closed} closed by server"
    return f"{lost}/{exp} lost, {reo} reordered, {fails} connect failures, {closed} closed by server"


def version(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--servers", nargs="+", required=True)
    ap.add_argument("--command", default="benches/compare")
    ap.add_argument("--reference", default="herald",
                    help="the server whose ratio to every other one is tabled")
    a = ap.parse_args()

    runs = {}  # (scenario, server) -> [doc]
    for f in sorted(glob.glob(os.path.join(a.dir, "json", "*.json"))):
        m = re.match(r"(.+)\.([^.]+)\.r\d+\.json$", os.path.basename(f))
        if not m:
            continue
        with open(f) as fh:
            runs.setdefault((m.group(1), m.group(2)), []).append(json.load(fh))

    def med(scen, server, key, path):
        vals = [value(d, key, path) for d in runs.get((scen, server), [])]
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    servers = a.servers
    ref = a.reference
    peers = [s for s in servers if s != ref]
    table = {(k, s): med(scen, s, k, path) for (k, scen, _, _, path, _) in FIGURES for s in servers}
    shown = [f for f in FIGURES if any(table[(f[0], s)] is not None for s in servers)]

    any_doc = next(iter(d for docs in runs.values() for d in docs), None)
    o = []
    o.append("# herald and its peers, side by side\n")
    if any_doc:
        m = any_doc.get("machine", {})
        o.append(f"Machine: {m.get('cpu_model', '?')}, {m.get('nr_cpus', '?')} CPUs, "
                 f"{(m.get('mem_total_bytes') or 0) / 2**30:.1f} GiB RAM, Linux {m.get('kernel', '?')}, "
                 f"open files {m.get('nofile_limit', '?')}. Loopback only: the bench, the server "
                 "and anything else running share the same cores.\n")
    info = os.path.join(a.dir, "run-info.txt")
    if os.path.exists(info):
        with open(info) as fh:
            o.append("```\n" + fh.read().strip() + "\n```\n")
    o.append(f"Command: `{a.command.strip()}`\n")
    rounds = max((len(v) for v in runs.values()), default=0)
    o.append(f"Each figure is the median of {rounds} run(s); each run is a fresh server process. "
             "Scenarios (same herald-bench client options for every server): "
             "`hold -n 5000 --hold-secs 2`; `broadcast -n 2000 -m 100 --rate 50`; "
             "`broadcast -n 2000 -m 100` (flat out, one publisher); "
             "`broadcast -n 5000 -m 500 --rate 100`; `unicast -n 1000 -m 10` "
             "(4 publishers); `groups -n 1000 -m 50 --group-size 10` (4 publishers); "
             "`handshake --concurrency 64 --duration-secs 10 --source 127.0.0.2-127.0.0.60`; "
             "bcast-bounded: `broadcast -n $COMPARE_BOUNDED_N` flat out, then a bisected search "
             "for the highest rate with p99 publish → receipt ≤ 100 ms (benches/bounded_rate.py); all with "
             "`--settle-ms 1000 --drain-timeout-secs 5`. herald: 2 shards, generated config, "
             "JWT-authenticated connections; peers: no auth.\n")
    vers = [
        f"herald {version(['git', 'rev-parse', '--short', 'HEAD'])}"
        + (" (+ uncommitted changes)" if version(['git', 'status', '--porcelain', '--', 'src'])
           else ""),
        f"bun {version([os.path.join(os.path.dirname(__file__), 'node_modules', '.bin', 'bun'), '--version'])}",
        f"node {version(['node', '--version'])}",
    ]
    try:
        with open(os.path.join(os.path.dirname(__file__), "node_modules", "ws", "package.json")) as fh:
            vers.append(f"ws {json.load(fh)['version']}")
    except OSError:
        pass
    vers.append("tokio-tungstenite 0.30 (tokio multi-thread, hyper 1)")
    o.append("Versions: " + ", ".join(vers) + ".\n")

    o.append(f"## Ratios: {ref} ÷ other\n")
    o.append(f"✓ = {ref} at least as good (higher is better for rates, lower for times, memory and "
             f"CPU); ✗ = {ref} behind.\n")
    o.append("| figure | better | " + " | ".join(f"{ref} ÷ {p}" for p in peers) + " |")
    o.append("|---|---|" + "---:|" * len(peers))
    for k, _, label, _, _, better in shown:
        cells = [ratio(table[(k, ref)], table[(k, p)], better) for p in peers]
        o.append(f"| {label} | {'higher' if better == 'high' else 'lower'} | " + " | ".join(cells) + " |")
    o.append("")

    o.append("## Figures\n")
    o.append("| figure | " + " | ".join(servers) + " |")
    o.append("|---|" + "---:|" * len(servers))
    for k, _, label, unit, _, _ in shown:
        o.append(f"| {label} | " + " | ".join(fmt(table[(k, s)], unit) for s in servers) + " |")
    o.append("")

    o.append("## Loss, order and failures (all runs summed)\n")
    o.append("| scenario | " + " | ".join(servers) + " |")
    o.append("|---|" + "---|" * len(servers))
    for scen in ["hold", "bcast-rate", "bcast-flat", "bcast-5k", "bcast-bounded", "unicast", "groups",
                 "handshake"]:
        if not any((scen, s) in runs for s in servers):
            continue
        o.append(f"| {SCENARIO_TEXT[scen]} | "
                 + " | ".join(loss_cell(runs.get((scen, s), [])) for s in servers) + " |")
    o.append("")

    o.append("## Server CPU seconds in the measured phase (median)\n")
    o.append("| scenario | " + " | ".join(servers) + " |")
    o.append("|---|" + "---:|" * len(servers))
    for scen in ["bcast-rate", "bcast-flat", "bcast-5k", "unicast", "groups"]:
        cells = []
        for s in servers:
            docs = runs.get((scen, s), [])
            vals = [dig(d, ("cpu", "server_s")) for d in docs]
            vals = [v for v in vals if v is not None]
            phase = [dig(d, ("cpu", "phase_s")) for d in docs]
            phase = [v for v in phase if v is not None]
            cells.append(f"{statistics.median(vals):.2f} of {statistics.median(phase):.2f} s"
                         if vals and phase else "—")
        if any(c != "—" for c in cells):
            o.append(f"| {SCENARIO_TEXT[scen]} | " + " | ".join(cells) + " |")
    o.append("")
    problems = [(k, p) for k, docs in runs.items() for d in docs for p in (d.get("problems") or [])]
    if problems:
        o.append("## Problems reported by herald-bench\n")
        for (scen, s), p in problems:
            o.append(f"- {s} / {scen}: {p}")
        o.append("")
    o.append("Raw results: `json/<scenario>.<server>.r<round>.json`; bench output and server logs: "
             "`logs/`.")
    print("\n".join(o))


if __name__ == "__main__":
    main()
