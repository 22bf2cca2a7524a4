#!/usr/bin/env python3
"""Deliveries per second at bounded latency: the highest publish rate at which the p99 of
publish → receipt stays under a target (default 100 ms), found by a bisected rate search, next
to the flat-out figure and the time from the last publish to the last delivery.

Runs herald-bench's `broadcast` against a server that is already running (herald or a peer),
once flat out, then at paced rates between a floor and the flat-out publish rate, bisecting in
log space. A step passes when its p99 is within the target, nothing was lost, no publish was
given up, and the publisher kept at least 90 % of the asked rate (a server that answers slower
than asked is not keeping up). Every step is a fresh herald-bench run (connect, publish,
drain), so each starts from an empty server queue.

    benches/bounded_rate.py --bench target/release/herald-bench --json out.json -- \\
        broadcast -n 10000 --drain-timeout-secs 5 --target peer --url ws://127.0.0.1:9000 \\
        --api http://127.0.0.1:9000 --server-pid 1234 --quiet --settle-ms 1000

The arguments after `--` are herald-bench's, without `-m` and `--rate` (set here). The JSON
written is the flat-out run's herald-bench document plus a `bounded` section (see `main`).
Standard library only.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile


def dig(d, *path):
    for p in path:
        if not isinstance(d, dict) or d.get(p) is None:
            return None
        d = d[p]
    return d


def run_bench(bench, args, messages, rate, timeout_s):
    """One herald-bench run; its JSON document (None when it failed to produce one)."""
    fd, path = tempfile.mkstemp(suffix=".json", prefix="bounded-rate.")
    os.close(fd)
    cmd = [bench, *args, "-m", str(messages), "--rate", f"{rate:.3f}", "--json", path]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if r.returncode != 0:
            sys.stderr.write(f"bounded-rate: herald-bench exited {r.returncode}: "
                             f"{r.stderr.strip()[-500:]}\n")
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError, subprocess.TimeoutExpired) as e:
        sys.stderr.write(f"bounded-rate: step at {rate:.1f}/s failed: {e}\n")
        return None
    finally:
        os.unlink(path)


def step_of(doc, rate, messages, p99_target_us):
    """The figures of one run and whether it passed."""
    p99 = dig(doc, "delivery", "latency", "p99_us")
    lost = (dig(doc, "delivery", "lost_open") or 0) + (dig(doc, "delivery", "lost_closed") or 0)
    failures = sum((dig(doc, "publish", "failures") or {}).values())
    achieved = dig(doc, "publish", "rate_per_s") or 0.0
    passed = (doc is not None and p99 is not None and p99 <= p99_target_us and lost == 0
              and failures == 0 and (rate == 0 or achieved >= 0.9 * rate))
    return {
        "rate_per_s": rate,
        "messages": messages,
        "achieved_rate_per_s": achieved,
        "p99_us": p99,
        "delivered_per_s": dig(doc, "delivery", "delivered_per_s"),
        "tail_s": dig(doc, "delivery", "tail_s"),
        "lost": lost,
        "failed_publishes": failures,
        "passed": passed,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", required=True, help="the herald-bench binary")
    ap.add_argument("--json", required=True, help="where to write the result")
    ap.add_argument("--p99-ms", type=float, default=100.0, help="the latency bound (p99)")
    ap.add_argument("--flat-messages", type=int, default=100,
                    help="messages of the flat-out run")
    ap.add_argument("--step-secs", type=float, default=3.0,
                    help="how long each paced step publishes")
    ap.add_argument("--min-messages", type=int, default=30, help="fewest messages of a step")
    ap.add_argument("--max-messages", type=int, default=3000, help="most messages of a step")
    ap.add_argument("--floor-ratio", type=float, default=64.0,
                    help="the search's lowest rate is the flat-out rate divided by this")
    ap.add_argument("--steps", type=int, default=6, help="bisection steps after the floor")
    ap.add_argument("--step-timeout-secs", type=float, default=300.0)
    ap.add_argument("bench_args", nargs=argparse.REMAINDER,
                    help="-- then herald-bench's arguments (scenario first)")
    a = ap.parse_args()
    args = a.bench_args[1:] if a.bench_args[:1] == ["--"] else a.bench_args
    target_us = a.p99_ms * 1000.0

    def log(msg):
        sys.stderr.write(f"bounded-rate: {msg}\n")

    flat = run_bench(a.bench, args, a.flat_messages, 0.0, a.step_timeout_secs)
    if flat is None:
        log("the flat-out run failed")
        return 1
    first = step_of(flat, 0.0, a.flat_messages, target_us)
    steps = [first]
    flat_rate = first["achieved_rate_per_s"]
    log(f"flat out: {flat_rate:.1f} publishes/s, {first['delivered_per_s'] or 0:,.0f} deliveries/s, "
        f"p99 {first['p99_us']} µs, tail {first['tail_s']} s")

    best = None
    if first["passed"]:
        # Flat out is already within the bound: that is the bounded figure.
        best = dict(first, rate_per_s=flat_rate)
    elif flat_rate > 0:

        def try_rate(rate):
            messages = max(a.min_messages, min(a.max_messages, math.ceil(rate * a.step_secs)))
            doc = run_bench(a.bench, args, messages, rate, a.step_timeout_secs)
            s = step_of(doc, rate, messages, target_us)
            steps.append(s)
            log(f"{rate:.1f}/s: p99 {s['p99_us']} µs, achieved {s['achieved_rate_per_s']:.1f}/s, "
                f"lost {s['lost']} → {'pass' if s['passed'] else 'fail'}")
            return s

        lo, hi = math.log(flat_rate / a.floor_ratio), math.log(flat_rate)
        s = try_rate(math.exp(lo))
        if s["passed"]:
            best = s
            for _ in range(a.steps):
                mid = (lo + hi) / 2
                s = try_rate(math.exp(mid))
                if s["passed"]:
                    best, lo = s, mid
                else:
                    hi = mid

    flat["bounded"] = {
        "p99_target_us": target_us,
        # The highest passing publish rate and its figures (null: not even the floor passed).
        "rate_per_s": best["rate_per_s"] if best else None,
        "delivered_per_s": best["delivered_per_s"] if best else None,
        "p99_us": best["p99_us"] if best else None,
        "tail_s": best["tail_s"] if best else None,
        # The flat-out run of the same search.
        "flat_rate_per_s": flat_rate,
        "flat_delivered_per_s": first["delivered_per_s"],
        "flat_p99_us": first["p99_us"],
        "flat_tail_s": first["tail_s"],
        "steps": steps,
    }
    with open(a.json, "w") as fh:
        json.dump(flat, fh, indent=1)
    b = flat["bounded"]
    log(f"bounded (p99 ≤ {a.p99_ms:g} ms): {b['rate_per_s'] or 0:.1f} publishes/s, "
        f"{b['delivered_per_s'] or 0:,.0f} deliveries/s; flat out {first['delivered_per_s'] or 0:,.0f} "
        f"deliveries/s, last publish → last delivery {first['tail_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
