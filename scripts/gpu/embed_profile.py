#!/usr/bin/env python3
"""Where an embedding run's time went, from `llama-cli --log-format json` at
RUST_LOG=info,llama_agent_engine=debug: model load, then per engine thread the time in
llama.cpp's decode, in reading/pooling rows and in admitting (tokenizing) requests.

    embed_profile.py LOG START_EPOCH END_EPOCH

Also the process's own milestones (every line but the per-batch ones), relative to its start.
"""
import collections
import datetime
import json
import sys

log, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
wall = end - start
milestones = []
ts = lambda r: datetime.datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")).timestamp()
first = last_batch = first_batch = None
threads = collections.defaultdict(lambda: collections.Counter())
loaded = None
for line in open(log):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    t, f = ts(r), r.get("fields", {})
    first = t if first is None else first
    msg, th = f.get("message", ""), r.get("threadName", "?")
    if msg not in ("embedding batch", "admitted") and len(milestones) < 16:
        milestones.append(f"    {t - start:6.2f} s  {th}: {msg[:100]}")
    if msg.startswith("model loaded"):
        loaded = t
    elif msg == "embedding batch":
        c = threads[th]
        c["batches"] += 1
        c["ms"] += float(f["ms"])
        c["collect_ms"] += float(f.get("collect_ms", 0))
        c["tokens"] += int(f["tokens"])
        c["seqs"] += int(f["seqs"])
        first_batch = t if first_batch is None else first_batch
        last_batch = t
    elif msg == "admitted":
        threads[th]["admit_ms"] += float(f["ms"])
        threads[th]["requests"] += 1
print(f"  wall {wall:.2f} s; process start to first log line {first - start:.2f} s; "
      f"last batch to exit {end - last_batch:.2f} s")
print("\n".join(milestones))
print(f"  first log line to model loaded {((loaded or first) - first):.2f} s; "
      f"to the first batch {(first_batch - first):.2f} s; first to last batch "
      f"{(last_batch - first_batch):.2f} s")
for th, c in sorted(threads.items()):
    if not c["batches"]:
        continue
    print(f"  {th}: {c['batches']} batches, {c['tokens'] / c['batches']:.0f} tokens and "
          f"{c['seqs'] / c['batches']:.0f} texts each; decode+collect {c['ms'] / 1000:.2f} s "
          f"(collect {c['collect_ms'] / 1000:.2f} s), admit {c['admit_ms'] / 1000:.2f} s "
          f"for {c['requests']} requests")
