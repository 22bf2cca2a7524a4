#!/usr/bin/env python3
"""Server CPU per delivery, user and system apart, from a benches/compare output directory.

    benches/cpu_split.py /work/cmp-uring

Reads json/<scenario>.<server>.r<round>.json (herald-bench's `cpu.server_s` and
`cpu.server_system_s`, `delivery.delivered`) and prints, per scenario and server, the median
over the rounds of: deliveries/s, server CPU per delivery (total, user, system) in ns, and
latency p50/p99.
"""
import json
import pathlib
import statistics
import sys

out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/compare")
rows = {}
for f in sorted((out / "json").glob("*.json")):
    scenario, server, _ = f.name.rsplit(".", 3)[:3]
    d = json.load(open(f))
    n = d["delivery"]["delivered"]
    cpu = d["cpu"]
    if not n or cpu.get("server_s") is None or cpu.get("server_system_s") is None:
        continue
    total, system = cpu["server_s"], cpu["server_system_s"]
    lat = d["delivery"]["latency"]
    rows.setdefault((scenario, server), []).append(
        (d["delivery"]["delivered_per_s"], total / n * 1e9, (total - system) / n * 1e9,
         system / n * 1e9, lat["p50_us"] / 1e3, lat["p99_us"] / 1e3))
print("| scenario | server | runs | deliveries/s | CPU ns/delivery | user | system "
      "| latency p50 / p99 |")
print("|---|---|---:|---:|---:|---:|---:|---|")
for (scenario, server), runs in sorted(rows.items()):
    m = [statistics.median(col) for col in zip(*runs)]
    print(f"| {scenario} | {server} | {len(runs)} | {m[0]:,.0f} | {m[1]:,.0f} | {m[2]:,.0f} "
          f"| {m[3]:,.0f} | {m[4]:.1f} / {m[5]:.1f} ms |")
