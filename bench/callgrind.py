#!/usr/bin/env python3
"""Instructions per letter of the release binary under `valgrind --tool=callgrind` (issue 23's method).

A machine-independent CPU figure: instruction counts do not depend on the machine's load or clock, so two
commits (or two machines) compare. Run through `bench/run.sh callgrind`, which builds the service and starts a
private stack; this script takes the same paths as bench.py.

Per run: the service starts under callgrind, a warm-up batch goes through (group joined, connections open),
then `callgrind_control --dump` closes the start-up part; 5 s idle and a second dump give the idle rate; then
N letters are produced at once and, when their status messages are in (plus 1 s for the last outcomes to be
marked reported), a third dump closes the letters' part. Two sizes (default 500 and 2,500 letters); the figure
is the difference of the letters' parts divided by the difference of the letter counts, so whatever a run
costs once (start-up, the first claim, the last flush) cancels out. Beside it, the same with the idle rate
times each window's length taken out first: under callgrind a letter takes ~50 times its native wall time,
and the timers that tick meanwhile (Kafka's polls, the chores) would otherwise be charged to the letters.
Letters: 2 recipients, a ~1.3 KB newsletter-like HTML body, batches of 100 (as figure 1).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench as B  # noqa: E402

# A newsletter as campaigns send it: a heading, paragraphs with links, a list, a footer; ~1.3 KB.
NEWSLETTER = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Weekly news</title></head>
<body style="font-family: Arial, sans-serif; color: #333">
<table width="100%" cellpadding="0" cellspacing="0"><tr><td align="center">
<h1>This week at Example &amp; Co.</h1>
<p>Hello, here is what happened this week. Our new catalogue is out, with more than
two hundred products for the season, and free delivery on every order over 30 euros.</p>
<p><a href="https://www.example.com/catalogue?utm_source=newsletter&amp;utm_medium=email">Read the catalogue</a>
or <a href="https://www.example.com/stores">find a store near you</a>.</p>
<h2>In this issue</h2>
<ul>
<li><a href="https://www.example.com/news/1">Spring collection: what is new</a></li>
<li><a href="https://www.example.com/news/2">Five ideas for a weekend in the garden</a></li>
<li><a href="https://www.example.com/news/3">Interview: the people behind our workshop</a></li>
</ul>
<p>Prices include VAT. Offers are valid while stocks last and cannot be combined with other discounts.
Questions? Write to <a href="mailto:help@example.com">help@example.com</a>, we answer within a day.</p>
<p style="font-size: 11px; color: #888">You receive this letter because you subscribed at example.com.
Example &amp; Co., 1 Main Street, 75000 Paris.</p>
</td></tr></table>
</body></html>
"""


def totals(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("totals:") or line.startswith("summary:"):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


# The allocator's entry points whose calls are counted: Rust's (whatever allocator is behind them; with LTO the
# shims are inlined, so also the `#[global_allocator]` crates' own entry points, mimalloc's and jemalloc's, which
# nothing else calls) and the C library's (librdkafka's and, with the system allocator, Rust's too).
RUST_ALLOC = {"__rust_alloc", "__rust_alloc_zeroed", "__rust_realloc",
              "mi_malloc_aligned", "mi_zalloc_aligned", "mi_realloc_aligned",
              "_rjem_malloc", "_rjem_mallocx", "_rjem_calloc", "_rjem_realloc", "_rjem_rallocx"}
C_ALLOC = {"malloc", "calloc", "realloc", "posix_memalign", "aligned_alloc", "memalign"}


def alloc_calls(path):
    """{function: calls} for the allocation functions, from the calls= lines of a callgrind part."""
    names, counts, target = {}, {}, None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("fn=") or line.startswith("cfn="):
                value = line.split("=", 1)[1].strip()
                m = re.match(r"\((\d+)\)(?: (.*))?$", value)
                name = value
                if m:
                    if m.group(2) is not None:
                        names[m.group(1)] = m.group(2)
                    name = names.get(m.group(1), "?")
                target = name if line.startswith("cfn=") else None
            elif line.startswith("calls=") and target is not None:
                base = target.split("'")[0]
                if base in RUST_ALLOC or base in C_ALLOC:
                    counts[base] = counts.get(base, 0) + int(line[6:].split()[0])
                target = None
    return counts


def dump(pid, parts_dir, seen):
    """Asks the process's callgrind for a dump; returns the new part's path once it is written."""
    out = subprocess.run(["callgrind_control", "--dump", str(pid)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"callgrind_control --dump {pid}: {out.stdout} {out.stderr}")

    def new_part():
        parts = sorted(p for p in os.listdir(parts_dir) if re.search(rf"\.{pid}\.\d+$", p))
        fresh = [p for p in parts if p not in seen]
        return os.path.join(parts_dir, fresh[0]) if fresh else None
    path = B.wait_until("callgrind dump", 60, new_part, interval=0.1)
    seen.add(os.path.basename(path))
    # The part is written before the reply; a short wait makes sure its last line is there.
    B.wait_until("callgrind dump complete", 30, lambda: totals(path), interval=0.1)
    return path


def run(ctx, letters, index):
    name = f"cg{letters}-{index}"
    out_dir = os.path.join(ctx.work, name)
    os.makedirs(out_dir, exist_ok=True)
    for p in os.listdir(out_dir):
        if p.startswith("callgrind.out"):
            os.remove(os.path.join(out_dir, p))
    ctx.wrapper = ["valgrind", "--tool=callgrind", "--quiet", f"--callgrind-out-file={out_dir}/callgrind.out.%p"]
    sink = B.Sink(ctx, name)
    svc = collector = None
    try:
        svc = B.Service(ctx, name, sink.port)
        load = B.Load(ctx, ctx.brokers)
        load.body = NEWSLETTER
        collector = B.Collector(ctx.brokers, svc.topic_out)
        B.warm_up(ctx, load, collector, svc)
        seen = set()
        start_part = dump(svc.pid, out_dir, seen)
        t0 = time.monotonic()
        time.sleep(ctx.idle_seconds)
        idle_part = dump(svc.pid, out_dir, seen)
        idle_rate = totals(idle_part) / (time.monotonic() - t0)
        t1 = time.monotonic()
        tag = "cg" + svc.tag[-6:]
        if ctx.backlog:
            post(svc, "/pause")
        sent = load.produce(svc.topic_in, tag, letters, ctx.per_batch)
        if ctx.backlog:
            # Every letter stored before the first is claimed: each claim then takes a full batch, as a
            # replica does under load, where letters trickling in as they are stored made the claims' sizes
            # (and so the figure) vary by +-10 % from one run to the next.
            B.wait_until("letters stored", ctx.timeout, lambda: awaiting(ctx, svc) >= letters, interval=0.5)
            post(svc, "/resume")
        rows = collector.wait_keys(sent.keys(), letters, ctx.timeout)
        time.sleep(1.0)
        letters_part = dump(svc.pid, out_dir, seen)
        window = time.monotonic() - t1
        sent_ok = sum(1 for r in rows if r[1] == "sent")
        if sent_ok != letters:
            raise RuntimeError(f"{sent_ok} of {letters} letters sent")
        exit_code = svc.stop(timeout=300)
        if ctx.keep_parts:
            os.makedirs(ctx.keep_parts, exist_ok=True)
            kept = os.path.join(ctx.keep_parts, f"{name}.letters")
            shutil.copyfile(letters_part, kept)
            letters_part = kept
        allocs = alloc_calls(letters_part)
        return {"letters": letters, "start_instr": totals(start_part), "idle_instr_per_s": round(idle_rate),
                "rust_allocs": sum(v for k, v in allocs.items() if k in RUST_ALLOC),
                "c_allocs": sum(v for k, v in allocs.items() if k in C_ALLOC), "allocs": allocs,
                "letters_instr": totals(letters_part), "window_s": round(window, 2),
                "letters_part": letters_part, "exit": exit_code}
    finally:
        B.teardown(collector, svc)
        sink.stop()


def post(svc, path):
    req = B.urllib.request.Request(svc.url(path), method="POST", data=b"")
    with B.urllib.request.urlopen(req, timeout=30) as r:
        if r.status != 200:
            raise RuntimeError(f"POST {path}: {r.status}")


def awaiting(ctx, svc):
    import pymongo
    with pymongo.MongoClient(ctx.mongo_uri, serverSelectionTimeoutMS=5000) as client:
        return client[svc.database]["letters"].count_documents({"status": "awaiting"})


def top_inclusive(part, count):
    """(total, [(instructions, share, function)]): the functions with the most inclusive instructions, leaving
    out the runtime's frames that hold everything (main, block_on, the task polls: over half of the total)."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=99", part],
                         capture_output=True, text=True, timeout=300)
    total, rows, seen = None, [], set()
    for line in out.stdout.splitlines():
        m = re.match(r"\s*([\d,]+)\s+(?:\(\s*[\d.]+%\)\s+)?PROGRAM TOTALS", line)
        if m:
            total = int(m.group(1).replace(",", ""))
            continue
        # "N (p%)  file:function [object]"; lines without the object are a function's inlined code by file.
        m = re.match(r"\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.*?):(\S.*?)\s+\[.*\]$", line)
        if not m or not total:
            continue
        n, fn = int(m.group(1).replace(",", "")), m.group(3)
        if n * 2 > total or fn in seen:
            continue
        seen.add(fn)
        rows.append((n, 100.0 * n / total, fn))
    return total, rows[:count]


def revision(repo):
    try:
        rev = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "src", "Cargo.toml"],
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"
    return rev + (" + uncommitted changes in src/" if dirty else "")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    for name in ("--repo", "--binary", "--stack-env", "--tansu", "--work", "--out"):
        p.add_argument(name, required=name in ("--binary", "--stack-env", "--work"))
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--runs", type=int, default=1, help="runs per size; the medians are taken")
    p.add_argument("--sizes", default="500,2500", help="the two run sizes in letters")
    p.add_argument("--top", type=int, default=25, help="inclusive functions shown")
    p.add_argument("--senders", type=int, default=8)
    p.add_argument("--service-env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--live", action="store_true",
                   help="letters claimed as they are stored (the method before 2026-12-03's eighth round), "
                        "not from a backlog stored while sending is paused")
    p.add_argument("--keep-parts", metavar="DIR",
                   help="copy each run's letters part here (for callgrind_annotate; the stack's work directory "
                        "goes with the stack)")
    p.add_argument("--quick", action="store_true", help="accepted for run.sh's sake: one run per size is the default")
    p.add_argument("--verbose", action="store_true", help="accepted for run.sh's sake")
    a = p.parse_args()

    ctx = B.argparse.Namespace()
    ctx.repo, ctx.binary, ctx.python, ctx.work = a.repo, a.binary, a.python, a.work
    ctx.bench_dir = os.path.dirname(os.path.abspath(__file__))
    ctx.senders = a.senders
    ctx.service_env = dict(kv.split("=", 1) for kv in a.service_env)
    ctx.brokers, ctx.mongo_uri = B.read_stack_env(a.stack_env)
    ctx.per_batch = 100
    ctx.body_bytes = len(NEWSLETTER)
    ctx.idle_seconds = 5
    ctx.timeout = 900
    ctx.backlog = not a.live
    ctx.keep_parts = a.keep_parts
    os.makedirs(ctx.work, exist_ok=True)
    small, large = (int(x) for x in a.sizes.split(","))

    results = {small: [], large: []}
    for i in range(a.runs):
        for n in (small, large):
            res = run(ctx, n, i)
            B.log(f"callgrind {n} letters run {i + 1}: {json.dumps(res)}")
            results[n].append(res)

    def per_letter(key):
        return [(results[large][i][key] - results[small][i][key]) / (large - small) for i in range(a.runs)]

    raw = per_letter("letters_instr")
    rust_allocs, c_allocs = per_letter("rust_allocs"), per_letter("c_allocs")
    for r in results[small] + results[large]:
        r["net"] = r["letters_instr"] - r["idle_instr_per_s"] * r["window_s"]
    net = per_letter("net")
    base = results[large][0]
    total, top = top_inclusive(base["letters_part"], a.top)
    env_note = ", ".join(f"{k}={v}" for k, v in sorted(ctx.service_env.items())) or "defaults (BCC, unsigned)"
    lines = [
        "## Instructions per letter under callgrind",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; commit {revision(a.repo)}",
        f"- {small:,} and {large:,} letters of 2 recipients, {len(NEWSLETTER):,}-byte HTML body; service env: {env_note}; "
        f"{a.runs} run(s) per size; "
        + ("letters claimed as they are stored" if a.live else "letters stored first (sending paused), then sent"),
        f"- **instructions per letter: {B.median(raw):,.0f}** (runs: {', '.join(f'{x:,.0f}' for x in raw)}); "
        f"idle rate taken out: {B.median(net):,.0f} ({', '.join(f'{x:,.0f}' for x in net)})",
        f"- allocations per letter: **{B.median([r + c for r, c in zip(rust_allocs, c_allocs)]):,.1f}**; "
        f"{B.median(rust_allocs):,.1f} through Rust's allocator (`__rust_alloc` and its kin, or the "
        f"`#[global_allocator]`'s `mi_*_aligned` / `_rjem_*`), {B.median(c_allocs):,.1f} calls of the C library's malloc family "
        f"(librdkafka's, and Rust's when the system allocator is behind it)",
        f"- idle rate {base['idle_instr_per_s']:,} instructions/s; start-up and warm-up {base['start_instr']:,}",
        "",
        f"Top inclusive functions of the {large:,}-letter part ({total:,} instructions):",
        "",
        "| instructions | share | function |",
        "|---:|---:|---|",
    ]
    lines += [f"| {n:,} | {share:.1f} % | `{fn[:160]}` |" for n, share, fn in top]
    report = "\n".join(lines) + "\n"
    print(report)
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n" + report)
        B.log(f"appended to {a.out}")


if __name__ == "__main__":
    main()
