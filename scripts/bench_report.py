#!/usr/bin/env python3
"""Turns scripts/bench-vs-rabbitmq.sh's results (one JSON report of
`sluice bench` per line, with the broker's CPU and RSS added) into the
side-by-side section of docs/performance.md and two SVG plots.

usage: bench_report.py results.jsonl docs/performance.md docs/performance [cluster]
The section between the bench-vs-rabbitmq markers (with `cluster`: the
bench-cluster markers, from scripts/bench-cluster-vs-rabbitmq.sh) is
replaced; the rest of the document (the microbenchmarks) is kept.
"""
import json
import os
import statistics
import sys
import time

CLUSTER = len(sys.argv) > 4 and sys.argv[4] == "cluster"
MARK = "bench-cluster" if CLUSTER else "bench-vs-rabbitmq"
START, END = f"<!-- {MARK}:start -->", f"<!-- {MARK}:end -->"
BROKERS = ["sluice", "rabbitmq"]
COLORS = {"sluice": "#2b7bba", "rabbitmq": "#f28e2b"}
WHAT = {
    "transient": "1 KiB transient, auto-ack, 1 producer → 1 consumer",
    "persistent": "1 KiB persistent, confirms (window 200), manual acks (every 50), prefetch 500",
    "small": "16 B transient, auto-ack",
    "large": "64 KiB transient, auto-ack",
    "queues100": "100 queues, 1 producer and 1 consumer each, 1 KiB transient, auto-ack",
    "fanout10": "fan-out exchange to 10 queues, 1 consumer each, 1 KiB transient",
    "fixed_rate": "1 KiB persistent with confirms at a fixed 5,000 msg/s: latency",
    "stomp": "STOMP 1.2: 1 KiB persistent SEND with receipts (window 200), SUBSCRIBE with client acks (every 50), prefetch 500",
    "backlog-fill": "1,000,000 × 1 KiB persistent published (confirmed) with no consumer",
    "backlog-drain": "the same backlog drained by one consumer (manual acks, prefetch 1000)",
}
if CLUSTER:
    WHAT.update({
        "persistent": "1 KiB persistent, confirms (window 200), manual acks (every 50), prefetch 500, 1 producer → 1 consumer",
        "queues10": "10 queues, 1 producer (confirms, window 100) and 1 consumer (manual acks) each, 1 KiB persistent",
        "fixed_rate": "1 KiB persistent with confirms at a fixed 2,000 msg/s: latency",
    })


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, unit=""):
    if x is None:
        return "–"
    if abs(x) >= 100:
        return f"{x:,.0f}{unit}"
    return f"{x:.2f}{unit}"


def ratio(a, b, higher_better=True):
    if not a or not b:
        return "–"
    r = a / b if higher_better else b / a
    return f"**{r:.2f}×**"


def bars_svg(path, title, groups, series, unit):
    """groups: [label]; series: {broker: [value per group]}."""
    w, h, left, bottom, top = 760, 320, 70, 60, 30
    vmax = max((v for vs in series.values() for v in vs if v), default=1) * 1.1
    gw = (w - left - 20) / max(len(groups), 1)
    bw = gw / (len(series) + 1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="14">{title}</text>']
    for i in range(5):
        v = vmax * i / 4
        y = h - bottom - (h - bottom - top) * i / 4
        out.append(f'<line x1="{left}" y1="{y}" x2="{w - 20}" y2="{y}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 5}" y="{y + 4}" text-anchor="end">{v:,.0f}</text>')
    out.append(f'<text x="14" y="{(h - bottom + top) / 2}" transform="rotate(-90 14 {(h - bottom + top) / 2})" text-anchor="middle">{unit}</text>')
    for gi, g in enumerate(groups):
        x0 = left + gi * gw
        for si, (name, vs) in enumerate(series.items()):
            v = vs[gi] or 0
            bh = (h - bottom - top) * v / vmax
            x = x0 + bw * (si + 0.5)
            out.append(f'<rect x="{x:.1f}" y="{h - bottom - bh:.1f}" width="{bw:.1f}" height="{bh:.1f}" fill="{COLORS.get(name, "#999")}"/>')
        out.append(f'<text x="{x0 + gw / 2:.1f}" y="{h - bottom + 15}" text-anchor="middle">{g}</text>')
    for si, name in enumerate(series):
        out.append(f'<rect x="{left + si * 110}" y="{h - 22}" width="12" height="12" fill="{COLORS.get(name, "#999")}"/>')
        out.append(f'<text x="{left + si * 110 + 16}" y="{h - 12}">{name}</text>')
    out.append("</svg>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")


def main():
    src, doc, plots = sys.argv[1], sys.argv[2], sys.argv[3]
    rows = [json.loads(l) for l in open(src, encoding="utf-8") if l.strip()]
    by = {}
    for r in rows:
        by.setdefault((r["scenario"], r["broker"]), []).append(r)
    scenarios = []
    for r in rows:
        if r["scenario"] not in scenarios:
            scenarios.append(r["scenario"])
    rounds = max((r["round"] for r in rows), default=0)

    def m(scenario, broker, key, f=None):
        rs = by.get((scenario, broker), [])
        return med([(f(r) if f else r.get(key)) for r in rs])

    def cpu_us(r):
        n = r["consumed"] or r["published"]
        return r["broker_cpu_secs"] * 1e6 / n if n else None

    def p(key, q):
        return lambda r: (r.get(key) or {}).get(q)

    lines = ["| scenario | figure | Sluice | RabbitMQ | Sluice's advantage |", "| --- | --- | --- | --- | --- |"]
    for s in scenarios:
        figs = []
        if s == "backlog-fill":
            figs = [("confirmed msg/s", "confirm_rate", None, True),
                    ("broker RSS growth per message (bytes)", None, lambda r: (r["rss_after_kib"] - r["rss_before_kib"]) * 1024 / max(r["published"], 1), False)]
        elif s == "backlog-drain":
            figs = [("drain msg/s", "consume_rate", None, True)]
        elif s == "fixed_rate":
            figs = [("p50 latency (µs)", None, p("latency_us", "p50"), False), ("p99 latency (µs)", None, p("latency_us", "p99"), False),
                    ("p99 confirm latency (µs)", None, p("confirm_latency_us", "p99"), False)]
        else:
            figs = [("consumed msg/s", "consume_rate", None, True)]
            if s in ("persistent", "stomp"):
                figs.append(("confirmed msg/s", "confirm_rate", None, True))
            figs.append(("p99 latency (µs)", None, p("latency_us", "p99"), False))
        figs.append(("broker CPU per message (µs)", None, cpu_us, False))
        for name, key, f, hb in figs:
            a, b = m(s, "sluice", key, f), m(s, "rabbitmq", key, f)
            lines.append(f"| {s} | {name} | {fmt(a)} | {fmt(b)} | {ratio(a, b, hb)} |")
    table = "\n".join(lines)

    os.makedirs(plots, exist_ok=True)
    pre = "cluster-" if CLUSTER else ""
    thr = [s for s in scenarios if s not in ("fixed_rate",)]
    key = {"backlog-fill": "confirm_rate"}
    bars_svg(os.path.join(plots, f"{pre}throughput.svg"), "Throughput (median msg/s)", thr,
             {b: [m(s, b, key.get(s, "consume_rate")) for s in thr] for b in BROKERS}, "msg/s")
    lat_s = "fixed_rate" if "fixed_rate" in scenarios else (scenarios[0] if scenarios else "")
    qs = ["p50", "p95", "p99", "p999"]
    bars_svg(os.path.join(plots, f"{pre}latency.svg"), f"End-to-end latency, {lat_s} (µs)", qs,
             {b: [m(lat_s, b, None, p("latency_us", q)) for q in qs] for b in BROKERS}, "µs")

    rel = os.path.relpath(plots, os.path.dirname(doc))
    if CLUSTER:
        section = cluster_section(rounds, table, scenarios, rel)
    else:
        section = single_section(rounds, table, scenarios, rel)
    text = open(doc, encoding="utf-8").read() if os.path.exists(doc) else "# Performance\n"
    if START in text and END in text:
        text = text[: text.index(START)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(doc, "w", encoding="utf-8") as f:
        f.write(text)
    print(table)


def cluster_section(rounds, table, scenarios, rel):
    return f"""{START}
## Three-node clusters side by side

Generated by `./scripts/bench-cluster-vs-rabbitmq.sh` ({time.strftime('%Y-%m-%d')},
{rounds} round(s) per scenario, the clusters alternately in each round,
medians shown): the same load tool (`sluice bench`, release build) against
a 3-node RabbitMQ 3.10 cluster with quorum queues (Raft, 3 replicas, the
leader on the node the load tool is connected to) and a 3-node Sluice
cluster (release build, 3 replicas per queue, Raft) behind one gateway,
all on this 2-core VM. Broker CPU per message is the CPU time of all the
cluster's processes (3 Erlang VMs; 3 nodes and the gateway) divided by
the messages delivered. "Sluice's advantage" as above: above 1× Sluice is
ahead, below 1× behind.

{table}

Scenarios:

""" + "\n".join(f"- **{s}**: {WHAT.get(s, s)}" for s in scenarios) + f"""

![throughput]({rel}/cluster-throughput.svg)

![latency]({rel}/cluster-latency.svg)

Raw reports: `target/bench/cluster.jsonl`.
{END}"""


def single_section(rounds, table, scenarios, rel):
    return f"""{START}
## Sluice and RabbitMQ side by side

Generated by `./scripts/bench-vs-rabbitmq.sh` ({time.strftime('%Y-%m-%d')},
{rounds} round(s) per scenario, the brokers alternately in each round,
medians shown): the same load tool (`sluice bench`, release build) against
RabbitMQ 3.10 (Debian defaults, classic queues, durable when persistent)
and Sluice `serve` (single node, release build), on this 2-core VM. Broker
CPU per message is the broker process's CPU time during the run divided by
the messages delivered (published, for the fill). "Sluice's advantage" is
Sluice's figure over RabbitMQ's for rates and RabbitMQ's over Sluice's for
latency, CPU and memory: above 1× Sluice is ahead, below 1× behind. The
machine is shared and noisy: compare the ratios, which were measured side
by side, rather than the absolute figures.

{table}

Scenarios:

""" + "\n".join(f"- **{s}**: {WHAT.get(s, s)}" for s in scenarios) + f"""

![throughput]({rel}/throughput.svg)

![latency]({rel}/latency.svg)

Raw reports: `target/bench/results.jsonl` (one `sluice bench --json` report
a line, with `broker`, `round`, `broker_cpu_secs`, `rss_before_kib`,
`rss_after_kib`).
{END}"""


main()
